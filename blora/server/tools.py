"""Tool calls for ``/v1/chat/completions``: validate ``tools`` / ``tool_choice``, constrain or prompt the
model, parse its output into OpenAI ``tool_calls``.

- ``tool_choice="none"`` (the default without tools): plain generation; tools are not shown to the model.
- a named function (``{"type": "function", "function": {"name": ...}}``): the output is constrained to that
  function's ``parameters`` schema and becomes the call's ``arguments`` (finish_reason "stop", as OpenAI).
- ``"required"``: the output is constrained to a JSON array of ``{"name", "parameters"}`` objects, one
  schema per tool (at most one item when ``parallel_tool_calls`` is false); finish_reason "tool_calls".
- ``"auto"`` (the default with tools): the model decides. Tools go to the chat template when it renders
  them; otherwise a system message describes them in the Hermes format. The output is parsed for
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes / Qwen style); text outside them
  is the message content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from blora.engine.sampling_params import StructuredOutputsParams
from blora.engine.structured import unsupported_schema_features
from blora.server.errors import InvalidRequestError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
OPEN_TAG = "<tool_call>"
EMPTY_PARAMETERS = {"type": "object", "properties": {}}

HERMES_SYSTEM = (
    "You may call one or more functions to help with the user's request. The functions are described in "
    "JSON within <tools></tools>:\n<tools>\n{tools}\n</tools>\n\nTo call a function, reply with a JSON object "
    "naming the function and its arguments within <tool_call></tool_call> tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass
class Tool:
    name: str
    parameters: dict[str, Any]
    spec: dict[str, Any]  # the request's {"type": "function", "function": {...}}


ToolMode = Literal["none", "auto", "required", "named"]


@dataclass
class ToolPlan:
    """How a chat request uses its tools."""

    mode: ToolMode
    tools: list[Tool] = field(default_factory=list)
    named: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def structured(self) -> StructuredOutputsParams | None:
        """The constraint for ``required`` / ``named`` (None for ``auto`` / ``none``)."""
        if self.mode == "named":
            return StructuredOutputsParams(json=self._tool(self.named).parameters)
        if self.mode != "required":
            return None
        items = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "parameters": t.parameters},
                "required": ["name", "parameters"],
            }
            for t in self.tools
        ]
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def _tool(self, name: str | None) -> Tool:
        return next(t for t in self.tools if t.name == name)

    def template_tools(self, tokenizer: Any) -> list[dict[str, Any]] | None:
        """The tools for the chat template (``auto`` with a template that renders tools)."""
        if self.mode == "auto" and supports_tools(tokenizer):
            return [t.spec for t in self.tools]
        return None

    def system_prompt(self, tokenizer: Any) -> str | None:
        """Hermes-format tool instructions (``auto`` with a template that does not render tools)."""
        if self.mode != "auto" or supports_tools(tokenizer):
            return None
        return HERMES_SYSTEM.format(tools="\n".join(json.dumps(t.spec) for t in self.tools))


def supports_tools(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def _tool(i: int, spec: Any) -> Tool:
    param = "tools"
    where = f"tools[{i}]"
    if not isinstance(spec, dict) or spec.get("type", "function") != "function":
        raise InvalidRequestError(f"{where}.type must be 'function'", param=param)
    fn = spec.get("function")
    if not isinstance(fn, dict):
        raise InvalidRequestError(f"{where}.function must be an object with a name", param=param)
    unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise InvalidRequestError(f"{where}.function.{unknown[0][:40]} is not a function field", param=param)
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidRequestError(
            f"{where}.function.name must be 1-64 letters, digits, '_' or '-'", param=param
        )
    parameters = fn.get("parameters", EMPTY_PARAMETERS)
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise InvalidRequestError(
            f"{where}.function.parameters must be a JSON schema of type 'object'", param=param
        )
    bad = unsupported_schema_features(parameters)
    if bad:
        raise InvalidRequestError(
            f"{where}.function.parameters uses features structured outputs cannot enforce: "
            + "; ".join(bad[:10]),
            param=param,
        )
    parameters = {"type": "object", **parameters}
    return Tool(name, parameters, {"type": "function", "function": {**fn, "parameters": parameters}})


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel: bool) -> ToolPlan:
    """Validate ``tools`` and ``tool_choice``; 400 naming the field otherwise."""
    parsed = [_tool(i, spec) for i, spec in enumerate(tools or [])]
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise InvalidRequestError("tools must have distinct function names", param="tools")
    choice = tool_choice if tool_choice is not None else ("auto" if parsed else "none")
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidRequestError(
                'tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                '{"name": ...}}',
                param="tool_choice",
            )
        if name not in names:
            raise InvalidRequestError(
                f"tool_choice names {name[:64]!r}, which is not in tools", param="tool_choice"
            )
        return ToolPlan("named", parsed, name, parallel)
    if choice not in ("none", "auto", "required"):
        raise InvalidRequestError(
            'tool_choice must be "none", "auto", "required" or a named function', param="tool_choice"
        )
    if choice != "none" and not parsed:
        raise InvalidRequestError(f'tool_choice "{choice}" needs tools', param="tool_choice")
    return ToolPlan(cast(ToolMode, choice), parsed, None, parallel)  # one of the three, checked above


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCalls:
    content: str | None
    calls: list[tuple[str, str]]  # (name, arguments as JSON text)


def parse_output(plan: ToolPlan, text: str) -> ParsedCalls:
    """The message content and tool calls of a finished (or cut) output under ``plan``."""
    if plan.mode == "named":
        return ParsedCalls(None, [(plan.named or "", text)])
    if plan.mode == "required":
        try:
            items = json.loads(text)
            calls = [(item["name"], json.dumps(item["parameters"], ensure_ascii=False)) for item in items]
        except (ValueError, TypeError, KeyError):
            return ParsedCalls(text, [])  # cut by max_tokens: the raw text, no calls
        return ParsedCalls(None, calls)
    if plan.mode == "auto":
        return parse_hermes(text, {t.name for t in plan.tools})
    return ParsedCalls(text, [])


def parse_hermes(text: str, names: set[str]) -> ParsedCalls:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks -> calls; the rest is content.
    A block that does not parse or names an unknown function stays in the content."""
    calls: list[tuple[str, str]] = []
    kept: list[str] = []
    pos = 0
    for m in TOOL_CALL.finditer(text):
        call = _hermes_call(m.group(1), names)
        if call is None:
            continue
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    content = "".join(kept).strip() if calls else text
    return ParsedCalls(content or None, calls)


def _hermes_call(body: str, names: set[str]) -> tuple[str, str] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        return obj["name"], args
    return obj["name"], json.dumps(args, ensure_ascii=False)


def held_back(text: str) -> int:
    """Where streamed content must stop for ``auto``: at a ``<tool_call>`` tag or a tail that may start one."""
    at = text.find(OPEN_TAG)
    if at >= 0:
        return at
    for k in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if OPEN_TAG.startswith(text[-k:]):
            return len(text) - k
    return len(text)
