"""Library mode, compatible with BLoRA: ``load_loras`` + ``prepare_batch`` + ``model.generate``.

```python
model, lora_map = load_loras(model, ["path/a", "path/b"])
batch = prepare_batch([(prompt, "path/a"), (prompt, None)], tokenizer, model, lora_map)
for out in model.generate(**batch, max_length=200, stream_output=True): ...   # [B] tokens per step
```
``load_loras`` patches the model instance (not its class): ``forward`` and ``generate`` accept
``adapter_ids`` (one slot per row, -1 = base) and ``generate`` accepts ``stream_output``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import greenlet
import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from blora.lora.context import current_batch, lora_batch
from blora.lora.layers import share_inputs
from blora.lora.manager import LoraManager

AdapterRef = str | Path | None
ModelT = TypeVar("ModelT", bound=nn.Module)


def load_loras(
    model: ModelT,
    adapters: Iterable[str | Path] | dict[str, str | Path],
    *,
    max_rank: int | None = None,
    lora_backend: str | None = None,
    packed_weights: bool = True,
) -> tuple[ModelT, dict[str, int]]:
    """Load PEFT adapters beside ``model``; returns ``(model, lora_map)`` with ``lora_map[name] = slot``.

    ``adapters`` is a list of local directories / cached hub ids (each named by its path) or a
    ``{name: path}`` dict. Can be called again to add adapters; a failed load changes nothing.
    ``lora_backend``: how the LoRA math runs, a ``blora.lora.backends`` name ("auto" by default; "torch"
    for the PyTorch ops, "cpu" for the C++ kernel).
    ``packed_weights``: on CPU, each layer an adapter targets (a float32 / bfloat16 ``nn.Linear``) runs its
    base GEMM on a oneDNN-prepacked copy of its weight, made at load time (``F.linear`` re-lays the weight
    out on every call, which dominates small decode batches). The copy costs as much memory as the wrapped
    weights and is freed when the layer's last adapter is unloaded; float32 results differ from
    ``F.linear`` in summation order only (bfloat16: same bits). Skipped when the copy would take more than
    half of the available memory. Wrapped q/k/v (and gate/up) siblings share one prepacked concatenated
    copy instead: the first of them called on an input runs all of their GEMMs and LoRAs at once
    (``blora.lora.layers.SharedInput``; not under ``torch.inference_mode``, whose tensors cannot be
    checked for in-place changes). False: no copy, the base layers run as they are. The setting applies
    to the model's adapters, those loaded now and later.
    """
    items = adapters.items() if isinstance(adapters, dict) else ((str(a), a) for a in adapters)
    manager = LoraManager.attach(model)
    if lora_backend is not None:
        manager.set_backend(lora_backend)
    manager.load_many([(str(name), source) for name, source in items], max_rank=max_rank)
    manager.set_packed_weights(packed_weights)
    share_inputs(model)
    _patch(model)
    return model, {name: info.slot for name, info in manager.adapters.items()}


def unload_loras(model: nn.Module, names: Iterable[str]) -> None:
    """Remove adapters from the model; their slots are freed for later loads."""
    manager = LoraManager.attach(model)
    for name in names:
        manager.unload(str(name))
    share_inputs(model)


def prepare_batch(
    inputs: Sequence[tuple[str, AdapterRef]],
    tokenizer,
    model: nn.Module,
    lora_map: dict[str, int],
    **tokenizer_kwargs,
) -> dict[str, torch.Tensor]:
    """Tokenize ``(prompt, adapter)`` pairs into one left-padded batch with per-row ``adapter_ids``.

    The caller's tokenizer is not modified; it may lack a pad token (eos, else 0, is used for padding).
    """
    if not inputs:
        raise ValueError("prepare_batch needs at least one (prompt, adapter) pair")
    slots = []
    for i, (_, adapter) in enumerate(inputs):
        if adapter is None:
            slots.append(-1)
        elif str(adapter) in lora_map:
            slots.append(lora_map[str(adapter)])
        else:
            raise KeyError(
                f"inputs[{i}] uses adapter {adapter!r}, which is not in lora_map {sorted(lora_map)}"
            )
    tokenizer_kwargs.setdefault("add_special_tokens", True)
    rows = [tokenizer(prompt, **tokenizer_kwargs)["input_ids"] for prompt, _ in inputs]
    pad = _pad_id(tokenizer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    device = next(model.parameters()).device
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "adapter_ids": torch.tensor(slots, dtype=torch.long, device=device),
    }


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
        if isinstance(candidate, list) and candidate:
            return int(candidate[0])
    return 0


_PATCHED: dict[type, type] = {}


def _patch(model: nn.Module) -> None:
    """Swap the instance's class for a subclass (same name) whose ``forward``/``generate`` take
    ``adapter_ids``; a class swap, unlike instance closures, survives ``copy.deepcopy``."""
    cls = type(model)
    if getattr(cls, "_blora_patched", False):
        return
    if cls not in _PATCHED:
        _PATCHED[cls] = _patched_class(cls)
    model.__class__ = _PATCHED[cls]


def _patched_class(cls: type[Any]) -> type:
    orig_forward, orig_generate = cls.forward, cls.generate

    @functools.wraps(orig_forward)
    def forward(self, *args, adapter_ids: torch.Tensor | None = None, **kwargs):
        _fill_position_ids(args, kwargs)
        if adapter_ids is None and current_batch() is not None:
            return orig_forward(self, *args, **kwargs)
        _check_rows(adapter_ids, args, kwargs)
        with lora_batch(adapter_ids, per_row=True, backend=LoraManager.attach(self).backend):
            return orig_forward(self, *args, **kwargs)

    @functools.wraps(orig_generate)
    def generate(self, *args, adapter_ids: torch.Tensor | None = None, stream_output: bool = False, **kwargs):
        _check_rows(adapter_ids, args, kwargs)
        backend = LoraManager.attach(self).backend
        if stream_output:
            return _stream(functools.partial(orig_generate, self), adapter_ids, backend, args, kwargs)
        with lora_batch(adapter_ids, per_row=True, backend=backend):
            return orig_generate(self, *args, **kwargs)

    attrs = {"forward": forward, "generate": generate, "_blora_patched": True, "__module__": cls.__module__}
    patched = type(cls.__name__, (cls,), attrs)
    patched.__qualname__ = cls.__qualname__
    return patched


def _check_rows(adapter_ids: torch.Tensor | None, args: tuple, kwargs: dict) -> None:
    if adapter_ids is None:
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    n = adapter_ids.reshape(-1).numel()
    if ids is not None and (n == 0 or ids.shape[0] % n != 0):
        raise ValueError(
            f"adapter_ids has {n} entries but the batch has {ids.shape[0]} rows; pass one adapter id per row "
            "(prepare_batch builds it)"
        )


def _fill_position_ids(args: tuple, kwargs: dict) -> None:
    """Padded rows need positions counted from their first real token (models with absolute positions)."""
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if kwargs.get("position_ids") is not None or mask is None or ids is None or mask.dim() != 2:
        return
    if bool(mask.all()):
        return
    pos = mask.long().cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)
    kwargs["position_ids"] = pos[:, -ids.shape[1] :]


class _StepStreamer(BaseStreamer):
    """Hands each step's new tokens ([B]) to the consumer's greenlet; the prompt (first ``put``) is skipped."""

    def __init__(self) -> None:
        self.consumer: greenlet.greenlet | None = None
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        assert self.consumer is not None
        grad = torch.is_grad_enabled()  # grad mode is per OS thread, which both greenlets share
        self.consumer.switch(value.reshape(-1).clone())
        torch.set_grad_enabled(grad)

    def end(self) -> None:
        pass


class _Cancelled(StoppingCriteria):
    def __init__(self) -> None:
        self.cancelled = False

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.cancelled, dtype=torch.bool, device=input_ids.device)


_DONE = object()


def _stream(orig_generate, adapter_ids, backend, args, kwargs) -> Iterator[torch.Tensor]:
    """Run ``generate`` in a greenlet and yield each step's new tokens ([B]).

    A greenlet, not a thread: both sides stay on the caller's OS thread, so torch keeps using that
    thread's OpenMP team. A worker thread brings a second team, and with more OpenMP threads than cores
    GNU OpenMP stops spinning: every op then pays a thread wake-up (SmolLM2, 5 rows, fp32, 2 threads:
    streaming through a thread ran at 0.6x of plain ``generate``).
    """
    streamer = _StepStreamer()
    cancel = _Cancelled()
    criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
    criteria.append(cancel)

    def work() -> object:
        with lora_batch(adapter_ids, per_row=True, backend=backend):
            orig_generate(*args, streamer=streamer, stopping_criteria=criteria, **kwargs)
        return _DONE

    def resume(worker: greenlet.greenlet) -> object:
        streamer.consumer = worker.parent = greenlet.getcurrent()
        grad = torch.is_grad_enabled()
        try:
            return worker.switch()  # runs until the next step's tokens, the end, or an exception
        finally:
            torch.set_grad_enabled(grad)

    def generator() -> Iterator[torch.Tensor]:
        worker = greenlet.greenlet(work)
        try:
            while (item := resume(worker)) is not _DONE:
                yield cast(torch.Tensor, item)  # the streamer hands over each step's tokens; _DONE at the end
        finally:
            if not worker.dead:  # the consumer stopped early: let generate end at its next step
                cancel.cancelled = True
                with contextlib.suppress(Exception):
                    while not worker.dead:
                        resume(worker)

    return generator()
