"""Structured outputs in the engine: every constrained row of a mixed batch (own adapter, own grammar) yields
output its grammar accepts; unconstrained rows are unchanged; grammars survive preemption; a broken grammar
fails only its request; bad constraints are refused with the field named.

A tiny random model writes garbage, so valid JSON comes out only if the grammar is enforced."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from blora.engine import LLM, SamplingParams
from blora.engine.llm_engine import RequestFailedError
from blora.engine.sampling_params import SamplingParamError, StructuredOutputsParams
from blora.engine.structured import StructuredOutputs, unsupported_schema_features
from tests.helpers import make_adapter, tiny_model, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

S = StructuredOutputsParams
MAX_TOKENS = 160
NAME = {"type": "string", "maxLength": 8}

SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"v": {"const": 42}}, "required": ["v"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]},
    {"type": "object", "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["p"]},
    {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20}},
     "required": ["n"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1,
                                               "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"pt": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -5, "maximum": 5}, "y": {"type": "integer", "minimum": -5, "maximum": 5}},
        "required": ["x", "y"]}}, "required": ["pt"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                                                       {"type": "null"}]}}, "required": ["id"]},
    {"type": "object", "properties": {"kind": {"oneOf": [{"const": "a"}, {"const": "b"}]}}, "required": ["kind"]},
    {"type": "object", "properties": {"code": {"type": "string", "minLength": 2, "maxLength": 4,
                                                "pattern": "^[A-Z]+$"}}, "required": ["code"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                         "tag": {"enum": ["a", "b"]}}, "required": ["id", "tag"]}}},
     "required": ["items"]},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 100, "maximum": 200},
    {"type": "object", "$defs": {"pt": {"type": "object", "properties": {"q": {"type": "boolean"}}, "required": ["q"]}},
     "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}, "required": ["a", "b"]},
    {"type": "object", "properties": {"pair": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0,
                                                                                 "maximum": 3}, {"enum": ["u", "v"]}],
                                               "items": False}}, "required": ["pair"]},
    {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"]},
    {"type": "object", "properties": {"s": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                                      "t": {"type": "integer", "minimum": 0, "maximum": 3}},
     "required": ["s", "t"], "additionalProperties": False},
    {"type": "object", "properties": {"nested": {"type": "object", "properties": {"deep": {
        "type": "object", "properties": {"e": {"enum": [1, 2, 3]}}, "required": ["e"]}}, "required": ["deep"]}},
     "required": ["nested"]},
    {"title": "Answer", "description": "annotations are fine", "type": "object",
     "properties": {"yes": {"type": "boolean", "description": "d"}}, "required": ["yes"]},
]  # fmt: skip


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    base = tiny_model("llama")
    return {
        "a": str(
            make_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        ),
        "b": str(
            make_adapter(base, root / "b", seed=2, r=8, lora_alpha=16, target_modules=["o_proj", "up_proj"])
        ),
    }


@pytest.fixture(scope="module")
def llm(adapters):
    return LLM(tiny_model("llama"), tokenizer=tokenizer(), adapters=adapters, block_size=4, max_num_seqs=128)


def check_json(out, schema) -> bool:
    """True if the output is complete valid JSON for ``schema``; a cut must be reported as ``length``."""
    if out.finish_reason == "length":
        assert len(out.token_ids) == MAX_TOKENS
        return False
    assert out.finish_reason == "stop", out.finish_reason
    jsonschema.validate(json.loads(out.text), schema)
    return True


def test_schemas_x_adapters_in_one_mixed_batch(llm):
    """23 schemas x (base, a, b, a+b mixture): one batch, greedy and seeded rows, plus plain rows."""
    routes = [None, "a", "b", {"a": 0.5, "b": 0.5}]
    prompts, params, where = [], [], []
    for i, schema in enumerate(SCHEMAS):
        for j, adapter in enumerate(routes):
            prompts.append(f"Reply {i} {j}:")
            temp = 0.0 if (i + j) % 2 == 0 else 1.0
            sp = SamplingParams(
                max_tokens=MAX_TOKENS, temperature=temp, seed=i * 7 + j, structured_outputs=S(json=schema)
            )
            params.append(sp)
            where.append((schema, adapter))
    plain = ["Once upon a time", "The city of"]
    plain_params = SamplingParams(max_tokens=20, temperature=0)
    outs = llm.generate(
        prompts + plain, params + [plain_params] * 2, adapters=[a for _, a in where] + [None, "a"]
    )
    complete = sum(check_json(out.outputs[0], schema) for out, (schema, _) in zip(outs, where, strict=False))
    assert complete >= 0.8 * len(where), f"only {complete} of {len(where)} outputs completed"
    solo = llm.generate(plain, plain_params, adapters=[None, "a"])
    assert [o.outputs[0].token_ids for o in outs[-2:]] == [o.outputs[0].token_ids for o in solo]


def test_unconstrained_rows_unchanged_by_constrained_neighbours(llm):
    plain = SamplingParams(max_tokens=24, temperature=0)
    alone = [
        o.outputs[0].token_ids for o in llm.generate(["Hello there", "Why"], plain, adapters=[None, "b"])
    ]
    constrained = SamplingParams(max_tokens=24, temperature=0, structured_outputs=S(json=SCHEMAS[1]))
    seeded = SamplingParams(max_tokens=24, temperature=0.8, seed=4, logit_bias={5: 3.0}, min_tokens=3)
    outs = llm.generate(
        ["Hello there", "x", "Why", "y"], [plain, constrained, plain, seeded], adapters=[None, "a", "b", None]
    )
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone


def test_grammar_is_enforced_not_just_lucky(llm):
    """The same rows without the constraint are not JSON: the grammar is what makes them parse."""
    sp = SamplingParams(max_tokens=30, temperature=0)
    text = llm.generate("Reply:", sp)[0].outputs[0].text
    with pytest.raises(ValueError):
        json.loads(text)


def test_n_greater_than_one_each_valid(llm):
    schema = SCHEMAS[9]
    sp = SamplingParams(
        n=4, max_tokens=MAX_TOKENS, temperature=1.0, seed=11, structured_outputs=S(json=schema)
    )
    out = llm.generate("Points:", sp, adapters="a")[0]
    assert len(out.outputs) == 4
    assert sum(check_json(c, schema) for c in out.outputs) >= 3
    assert len({c.text for c in out.outputs}) > 1


@pytest.mark.parametrize(
    "spec, check",
    [
        (S(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        (S(choice=["alpha", 'be"ta', "ünï\ncode"]), lambda t: t in ["alpha", 'be"ta', "ünï\ncode"]),
        (S(grammar='root ::= "(" digit+ ")"\ndigit ::= [0-9]'), lambda t: re.fullmatch(r"\([0-9]+\)", t)),
        (S(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (S(json='{"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]}'),
         lambda t: isinstance(json.loads(t)["k"], bool)),
    ],
)  # fmt: skip
def test_regex_choice_grammar_and_json_object(llm, spec, check):
    outs = llm.generate(
        ["Go:"] * 3,
        [
            SamplingParams(max_tokens=MAX_TOKENS, temperature=t, seed=2, structured_outputs=spec)
            for t in (0, 1, 1.5)
        ],
        adapters=[None, "a", "b"],
    )
    for out in outs:
        c = out.outputs[0]
        if c.finish_reason == "length":
            continue
        assert c.finish_reason == "stop" and check(c.text), c.text


def test_max_tokens_cut_is_reported_as_length(llm):
    sp = SamplingParams(max_tokens=3, temperature=0, structured_outputs=S(json=SCHEMAS[1]))
    out = llm.generate("Reply:", sp)[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert out.text.startswith("{")


def test_streamed_deltas_equal_final_text(llm):
    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, structured_outputs=S(json=SCHEMAS[3]))
    deltas, final = "", None
    for out in llm.stream("Color:", sp):
        deltas += out.outputs[0].delta_text
        final = out.outputs[0]
    assert deltas == final.text and check_json(final, SCHEMAS[3])


def test_preempted_and_recomputed_rows_keep_their_grammar(adapters):
    """A KV cache too small for the batch preempts sequences; outputs equal those of an unpreempted run."""
    prompts = [f"Reply number {i} please, at length and in detail:" for i in range(6)]
    params = [
        SamplingParams(max_tokens=40, temperature=0, structured_outputs=S(json=SCHEMAS[i]))
        for i in (0, 1, 8, 9, 14, 17)
    ]
    roomy = LLM(tiny_model("llama"), tokenizer=tokenizer(), adapters=adapters, block_size=4)
    tight = LLM(tiny_model("llama"), tokenizer=tokenizer(), adapters=adapters, block_size=4, num_kv_blocks=14)
    routes = [None, "a", "b"] * 2
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, adapters=routes)]
    got = tight.generate(prompts, params, adapters=routes)
    assert tight.engine.num_preemptions_total > 0
    assert [o.outputs[0].token_ids for o in got] == want


def test_a_failing_grammar_fails_only_its_request(llm, monkeypatch):
    structured = llm.engine.sampler.structured
    real = structured.matcher
    sp_bad = SamplingParams(max_tokens=20, temperature=0, structured_outputs=S(json=SCHEMAS[0]))
    sp_good = SamplingParams(max_tokens=20, temperature=0, structured_outputs=S(json=SCHEMAS[3]))

    class Broken:
        def fill_next_token_bitmask(self, *args):
            raise RuntimeError("matcher exploded")

    def matcher(seq):
        return Broken() if seq.params is sp_bad else real(seq)

    monkeypatch.setattr(structured, "matcher", matcher)
    engine = llm.engine
    plain = SamplingParams(max_tokens=20, temperature=0)
    ids = [
        engine.add_request(None, p, sp)
        for p, sp in zip(["bad", "good", "plain"], [sp_bad, sp_good, plain], strict=True)
    ]
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({out.request_id: out for out in engine.step() if out.finished})
    assert isinstance(finals[ids[0]].error, RequestFailedError)
    assert "matcher exploded" in repr(finals[ids[0]].error.__cause__)
    assert finals[ids[1]].error is None and check_json(finals[ids[1]].outputs[0], SCHEMAS[3])
    assert finals[ids[2]].error is None and len(finals[ids[2]].outputs[0].token_ids) == 20


@pytest.mark.parametrize(
    "spec, param, words",
    [
        (S(json={"type": "object", "allOf": [{}]}), "structured_outputs.json", "allOf"),
        (S(json={"type": "integer", "multipleOf": 3}), "structured_outputs.json", "multipleOf"),
        (S(json={"type": "string", "format": "credit-card"}), "structured_outputs.json", "credit-card"),
        (S(json={"type": "strin"}), "structured_outputs.json", "strin"),
        (S(json="{not json"), "structured_outputs.json", "not valid JSON"),
        (S(json="[1, 2]"), "structured_outputs.json", "must be an object"),
        (S(regex="[a-"), "structured_outputs.regex", "invalid regex"),
        (S(grammar="root ::= "), "structured_outputs.grammar", "invalid grammar"),
        (S(grammar="x" * 70000), "structured_outputs.grammar", "at most"),
        (S(choice=[]), "structured_outputs.choice", "choice must be"),
        (S(json={"type": "string", "maxLength": 5000}), "structured_outputs.json", "limited to 1000"),
        (
            S(json={"properties": {"a": {"pattern": "x{1,3000}"}}}),
            "structured_outputs.json",
            "#/properties/a",
        ),
        (S(regex="a{2000}"), "structured_outputs.regex", "limited to 1000"),
        (S(), "structured_outputs", "exactly one"),
        (S(regex="a", choice=["a"]), "structured_outputs", "exactly one"),
    ],
)
def test_bad_constraints_refused_naming_the_field(llm, spec, param, words):
    with pytest.raises(SamplingParamError) as info:
        llm.generate("x", SamplingParams(max_tokens=4, structured_outputs=spec))
    assert info.value.param == param and words in str(info.value), str(info.value)
    assert not llm.engine.has_unfinished_requests()


def test_unsupported_features_are_listed_with_their_place():
    schema = {"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 2}, "b": {"not": {}}}}
    assert unsupported_schema_features(schema) == ["#/properties/a: multipleOf", "#/properties/b: not"]


def test_compiled_grammars_are_cached_by_schema():
    so = StructuredOutputs(tokenizer(), len(tokenizer()), [2])
    first = so.compile(S(json={"type": "object", "properties": {"a": {"type": "integer"}}}))
    same = so.compile(S(json='{"properties": {"a": {"type": "integer"}}, "type": "object"}'))
    assert first is same
    assert so.compile(S(json={"type": "object"})) is not first


def test_compile_time_is_bounded(monkeypatch):
    import time

    from blora.engine import structured

    so = StructuredOutputs(tokenizer(), len(tokenizer()), [2])
    so.compiler()
    monkeypatch.setattr(structured, "_compile", lambda compiler, spec: time.sleep(2))
    start = time.monotonic()
    with pytest.raises(SamplingParamError, match="took longer than 0.2 s"):
        so.compile(S(regex="[0-9]+"), timeout=0.2)
    assert time.monotonic() - start < 1.5


def test_ignore_eos_with_a_grammar_is_refused():
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(ignore_eos=True, structured_outputs=S(json_object=True))
    assert info.value.param == "ignore_eos"
