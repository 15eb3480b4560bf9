"""Adapters as models: name resolution, ``/v1/models`` cards, and runtime load/unload confined to a root.

A runtime load names a path *inside* ``--adapter-root``. The path is checked before the engine sees it:
no ``..`` components, and after resolving symlinks it and each adapter file in it must still lie inside
the (resolved) root, so neither an absolute path elsewhere nor a symlink pointing out of the root (the
directory's or a file's) can load foreign files. Loops and over-long paths are refused with a 400.

With runtime adapters enabled, a request whose ``model`` is not loaded but names an adapter directory under
the root (``model`` = its path relative to the root) loads it first, under that name (vLLM's resolver
behaviour); the same confinement applies, and a name that is not there stays a 404.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

from blora.engine.client import EngineClient
from blora.lora.errors import AdapterError
from blora.lora.paths import MAX_PATH_CHARS, NotAnAdapterError, adapter_dir_inside
from blora.server.errors import InvalidRequestError, NotFoundError, clip
from blora.server.protocol import ModelCard

logger = logging.getLogger("blora.server")

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}$")


def resolve_adapter_path(root: Path, raw: str) -> Path:
    """Resolve ``raw`` (relative to ``root``, or absolute inside it) to a real directory inside ``root``.

    The rules are the adapter store's (``blora.lora.paths.adapter_dir_inside``, the one confinement
    function): the directory and each adapter file in it, symlinks resolved, must lie inside the resolved
    root. Raises InvalidRequestError (400) for paths that leave the root, cannot be resolved (symlink
    loops, names or paths too long) or hold no adapter, and NotFoundError (404) for paths that do not exist.
    """
    shown = raw if len(raw) <= 200 else raw[:197] + "..."
    if "\x00" in raw:
        raise InvalidRequestError("lora_path contains a NUL byte", param="lora_path")
    if len(raw) > MAX_PATH_CHARS:
        raise InvalidRequestError(
            f"lora_path is {len(raw)} characters long; at most {MAX_PATH_CHARS}", param="lora_path"
        )
    if ".." in Path(raw).parts:
        raise InvalidRequestError("lora_path must not contain '..' components", param="lora_path")
    try:
        resolved = adapter_dir_inside(root, raw, shown, f"lora_path {shown!r}")
    except NotAnAdapterError as exc:
        raise InvalidRequestError(str(exc), param="lora_path") from None
    except AdapterError as exc:
        raise InvalidRequestError(
            f"{exc}; runtime adapters must live under --adapter-root", param="lora_path"
        ) from None
    if resolved is None:
        raise NotFoundError(
            f"Adapter path {shown!r} does not exist under the adapter root",
            param="lora_path",
            code="adapter_not_found",
        )
    return resolved


class AdapterManager:
    """Maps OpenAI ``model`` names to the base model or an adapter; loads and unloads adapters at run time."""

    def __init__(
        self,
        engine: EngineClient,
        base_name: str,
        base_source: str,
        adapter_root: Path | None,
        allow_runtime: bool,
        aliases: tuple[str, ...] = (),
        parents: dict[str, str] | None = None,
    ) -> None:
        self.engine = engine
        self.base_name = base_name
        self.base_names = (base_name, *aliases)  # every served name of the base model
        self.parents = dict(parents or {})  # adapter -> the base model name its card shows
        self.base_source = base_source
        self.adapter_root = adapter_root
        self.allow_runtime = allow_runtime
        self._lock = asyncio.Lock()

    def adapters(self) -> dict[str, str]:
        return dict(self.engine.list_adapters())

    def served(self, name: str) -> bool:
        """Whether the adapter ``name`` is served now (one name looked up: no listing per request)."""
        return self.engine.adapter_source(name) is not None

    def resolve(self, model: str) -> str | None:
        """The adapter name for an OpenAI ``model`` field (None = the base model); 404 if unknown."""
        if model in self.base_names:
            return None
        if self.served(model):
            return model
        raise NotFoundError(
            f"The model {clip(model)!r} does not exist. Known models: the base model {self.base_name!r} "
            "and the adapters listed by GET /v1/models.",
            param="model",
        )

    def resolve_mixture(self, model: str, mixture: dict[str, float]) -> dict[str, float]:
        """Check an ``adapter_mixture`` request: ``model`` is the base, every component is loaded."""
        if model not in self.base_names:
            raise InvalidRequestError(
                f"With adapter_mixture, model must be the base model {self.base_name!r}, not {clip(model)!r}",
                param="model",
            )
        missing = sorted(clip(name) for name in mixture if not self.served(name))
        if missing:
            raise NotFoundError(
                f"adapter_mixture names adapters that are not loaded: {missing}", param="adapter_mixture"
            )
        return dict(mixture)

    def cards(self) -> list[ModelCard]:
        max_len = self.engine.limits.max_model_len
        cards = [ModelCard(id=name, root=self.base_source, max_model_len=max_len) for name in self.base_names]
        for name, source in sorted(self.adapters().items()):
            parent = self.parents.get(name, self.base_name)
            cards.append(ModelCard(id=name, root=str(source), parent=parent, max_model_len=max_len))
        return cards

    def _check_enabled(self) -> None:
        if not self.allow_runtime or self.adapter_root is None:
            raise NotFoundError(
                "Runtime adapter loading is disabled; start the server with --allow-runtime-adapters "
                "and --adapter-root DIR",
                code="runtime_adapters_disabled",
            )

    async def autoload(self, model: str, mixture: dict[str, float] | None = None) -> None:
        """Load the adapter ``model`` names from the adapter root if it is not loaded (runtime adapters
        only). Unknown names are left to ``resolve`` (404); a broken adapter is a 400 like an explicit load."""
        if not self.allow_runtime or self.adapter_root is None or mixture is not None:
            return
        if model in self.base_names or self.served(model) or not ADAPTER_NAME.match(model):
            return
        try:
            path = resolve_adapter_path(self.adapter_root, model)
        except NotFoundError:
            return  # resolve() answers with the model 404
        except InvalidRequestError as exc:  # leaves the root (symlink, ..), unresolvable, not an adapter
            logger.warning("model %r not served from the adapter root: %s", clip(model), exc.message)
            return  # the model 404 (the root's layout is not the client's business)
        async with self._lock:
            if self.served(model):  # a concurrent request loaded it
                return
            await self._engine_load(model, model, path, replace=False)
        logger.info("loaded adapter %r from %s on first request", model, path)

    async def _engine_load(self, name: str, raw_path: str, path: Path, replace: bool) -> None:
        if replace and not self.engine.limits.replace_adapters:
            raise InvalidRequestError(
                "load_inplace is not supported by this deployment (Ray replicas); unload, then load",
                param="load_inplace",
            )
        try:
            if replace:  # requests on the old weights finish on them; the swap happens when they have
                await self.engine.load_adapter(name, str(path), replace=True, wait=True)
            else:
                await self.engine.load_adapter(name, str(path))
        except Exception as exc:  # a bad adapter must never take the server down
            logger.warning("loading adapter %r from %s failed: %s", name, path, exc)
            raise InvalidRequestError(
                f"Failed to load adapter {name!r} from {raw_path!r}: {exc}",
                param="lora_path",
                code="adapter_load_failed",
            ) from exc

    async def load(self, name: str, raw_path: str, replace: bool = False) -> str:
        self._check_enabled()
        assert self.adapter_root is not None
        if not ADAPTER_NAME.match(name):
            raise InvalidRequestError(
                f"lora_name {name!r} is not a valid name (letters, digits and ._:/@+- ; up to 256 chars)",
                param="lora_name",
            )
        path = resolve_adapter_path(self.adapter_root, raw_path)
        async with self._lock:
            if name in self.base_names:
                raise InvalidRequestError(
                    f"{name!r} is the base model's name; choose another lora_name", param="lora_name"
                )
            exists = self.served(name)
            if exists and not replace:
                raise InvalidRequestError(
                    f"An adapter named {name!r} is already loaded; unload it first, or send "
                    '"load_inplace": true to replace it',
                    param="lora_name",
                    code="adapter_exists",
                )
            await self._engine_load(name, raw_path, path, replace=exists)
        logger.info("%s adapter %r from %s", "replaced" if exists else "loaded", name, path)
        if exists:
            return f"Success: LoRA adapter '{name}' replaced successfully."
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, name: str) -> str:
        self._check_enabled()
        async with self._lock:
            if not self.served(name):
                raise NotFoundError(
                    f"The adapter {name!r} is not loaded", param="lora_name", code="adapter_not_found"
                )
            try:
                await self.engine.unload_adapter(name)
            except Exception as exc:
                raise InvalidRequestError(
                    f"Failed to unload adapter {name!r}: {exc}", param="lora_name"
                ) from exc
        logger.info("unloaded adapter %r", name)
        return f"Success: LoRA adapter '{name}' removed successfully."
