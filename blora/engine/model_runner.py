"""Turns a schedule into tensors, runs the model over one flat batch, returns next-token logits.

The batch is the concatenation of every scheduled chunk: ``input_ids``/``position_ids`` [1, N], one
adapter slot per token for the LoRA wrappers, and one KV cache slot per token for attention. The model's
decoder runs once over it; the LM head runs only on the rows whose logits are sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from blora.engine import attention
from blora.engine.attention import AttentionMetadata, KVCache, PrefillChunk
from blora.engine.sampler import PromptTopK, prompt_topk
from blora.engine.scheduler import ScheduledSeq
from blora.lora import backends
from blora.lora.backends import BackendOptions, LoraBackend
from blora.lora.context import LoraBatch, lora_context
from blora.lora.plan import lists_to_device
from blora.models import families
from blora.models.families import FastModel, FastPathOptions


@dataclass
class StepBatch:
    """The tensors of one step. ``sample_rows``: rows of the flat batch whose logits are returned.
    ``lora`` / ``head_lora``: the LoRA routing of the decoder (its plan already built) and of the LM head
    over the sampled rows (planned only if the head is a LoRA layer); None when no token uses an adapter."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    lora: LoraBatch | None
    head_lora: LoraBatch | None
    sample_rows: torch.Tensor
    attn: AttentionMetadata
    # per sequence asking for prompt logprobs: (seq, first prompt index, flat rows, prompt tokens, adapter slot)
    prompt_rows: list[tuple[Any, int, list[int], list[int], int]] = field(default_factory=list)


class ModelRunner:
    """Owns the KV cache and runs a Hugging Face causal LM through ``blora_paged`` attention."""

    def __init__(
        self,
        model: PreTrainedModel,
        num_blocks: int,
        block_size: int,
        backend: LoraBackend | None = None,
        fast_path: FastPathOptions | None = None,
        cpu_kernel: bool = True,
        attention_backend: str = "auto",
    ) -> None:
        """``backend``: the LoRA math of every layer (default: ``"auto"`` for the model's device);
        ``fast_path``: whether and how a model family's own forward runs (``blora.models.families``);
        ``cpu_kernel``: False keeps attention on PyTorch ops; ``attention_backend``: decode attention's
        kernels (``blora.engine.attention.ATTENTION_BACKENDS``), resolved here once."""
        self.model = model
        self.decoder = model.base_model
        if model.get_output_embeddings() is None or self.decoder is model:
            raise ValueError(f"{type(model).__name__} has no separate decoder and LM head; not a causal LM?")
        model.config._attn_implementation = attention.register()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        param = next(model.parameters())
        self.device = param.device
        self.backend = backend or backends.default(self.device)
        self.attention_backend = attention.select_backend(attention_backend, self.device, cpu_kernel)
        self.block_size = block_size
        self.cache = KVCache(num_blocks, block_size)
        # a model family's own forward (weights fused and prepacked now), or None: transformers' modules
        self.fast = families.build(model, fast_path or FastPathOptions())
        self.fast_steps = 0  # steps the fast decoder ran (the rest ran transformers' modules)
        self.prompt_logprobs: list[PromptTopK] = []  # of the last execute(): its prompt-logprob rows

    @classmethod
    def from_config(cls, model: PreTrainedModel, num_blocks: int, config) -> ModelRunner:
        """The runner for an ``EngineConfig``: its LoRA backend, fast path and kernel switches resolved once."""
        options = RunnerOptions.from_config(config, next(model.parameters()).device)
        return cls(
            model, num_blocks, config.block_size, options.backend, options.fast_path, options.cpu_kernel,
            config.attention_backend,
        )  # fmt: skip

    @torch.inference_mode()
    def execute(self, scheduled: Sequence[ScheduledSeq]) -> torch.Tensor:
        """Run one step; returns logits [num sampled seqs, vocab] in ``scheduled`` order, in the model's dtype
        (the sampler converts to float32 only what needs it: greedy argmax does not). Each chunk's adapter
        is already in its device slot (``ScheduledSeq.slot``). The prompt logprobs of sequences that ask for
        them are left in ``self.prompt_logprobs``."""
        self.prompt_logprobs = []
        batch = self.prepare(scheduled)
        fast = self.fast if self.fast is not None and self.fast.usable() else None
        with attention.forward_context(self.cache, batch.attn), lora_context(batch.lora):
            if fast is not None:
                hidden = fast(batch.input_ids[0], batch.position_ids[0])
                self.fast_steps += 1
            else:
                out = self.decoder(
                    input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False
                )
                hidden = out.last_hidden_state[0]
        for seq, first, rows, targets, slot in batch.prompt_rows:
            self.prompt_logprobs.append(self._prompt_topk(hidden, fast, seq, first, rows, targets, slot))
        hidden = hidden.index_select(0, batch.sample_rows)
        return self._head(hidden, fast, batch.head_lora)

    def _head(
        self, hidden: torch.Tensor, fast: FastModel | None, head_lora: LoraBatch | None
    ) -> torch.Tensor:
        """LM head (+ softcapping) over ``hidden`` [m, hidden size] -> logits [m, vocab]; ``fast``: the
        family's forward that ran the step (its packed head), None if transformers' modules ran it."""
        # looked up each step: an lm_head LoRA / modules_to_save wraps the head after the runner was built
        logits = fast.logits(hidden) if fast is not None else None
        if logits is None:
            with lora_context(head_lora):
                logits = self.model.get_output_embeddings()(hidden)
        if self.softcap:
            logits = logits.float()
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _prompt_topk(self, hidden, fast, seq, first, rows, targets, slot) -> PromptTopK:
        """Prompt logprobs of one sequence's chunk: the LM head over its prompt rows, a slice at a time."""
        rows_t, targets_t = self._tensor(rows), self._tensor(targets)

        def head(part: slice) -> torch.Tensor:
            h = hidden.index_select(0, rows_t[part])
            lora = LoraBatch([slot] * h.shape[0], self.device, self.backend) if slot >= 0 else None
            return self._head(h, fast, lora)

        lp, ranks, vals, ids = prompt_topk(head, len(rows), targets_t, seq.params.prompt_logprobs)
        return PromptTopK(seq, first, lp, ranks, ids, vals)

    def prepare(self, scheduled: Sequence[ScheduledSeq]) -> StepBatch:
        """Build the flat batch: token ids, positions, adapter and KV slots, attention metadata."""
        bs = self.block_size
        ids: list[int] = []
        slots: list[int] = []
        lora: list[int] = []
        sample_rows: list[int] = []
        positions: list[int] = []
        dec_rows, dec_tables, dec_lens = [], [], []
        prefills: list[tuple[int, int, int, list[int]]] = []
        prompt_rows: list[tuple[Any, int, list[int], list[int], int]] = []
        for s in scheduled:
            seq, start, n, row = s.seq, s.start, s.num_tokens, len(ids)
            table = seq.block_table
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            lora.extend([s.slot] * n)
            used = table[: -(-(start + n) // bs)]
            if n == 1:
                dec_rows.append(row)
                dec_tables.append(used)
                dec_lens.append(start + 1)
            else:
                prefills.append((row, n, start, used))
            if s.sample:
                sample_rows.append(row + n - 1)
            span = seq.prompt_logprob_span(start, n)
            if span:
                rows = [row + p - start for p in span]
                targets = seq.token_ids[span.start + 1 : span.stop + 1]
                prompt_rows.append((seq, span.start + 1, rows, targets, s.slot))
        routing = LoraBatch(lora, self.device, self.backend)
        step_lora = head_lora = None
        if routing.any_adapter:
            routing.plan(len(lora))  # the step's plan: built once here, read by every layer
            step_lora = routing
            head_lora = LoraBatch([lora[r] for r in sample_rows], self.device, self.backend)
        # every host list of the step in one go: on CUDA one pinned buffer and one non-blocking copy
        width = max(map(len, dec_tables), default=0)
        tables = [b for t in dec_tables for b in (*t, *[0] * (width - len(t)))]
        ids_t, pos_t, rows_t, slots_t, dec_rows_t, dec_lens_t, tables_t, *prefill_t = lists_to_device(
            [ids, positions, sample_rows, slots, dec_rows, dec_lens, tables, *(p[3] for p in prefills)],
            self.device,
        )
        dec = (dec_rows_t, dec_lens_t, tables_t.view(len(dec_rows), width)) if dec_rows else None
        return StepBatch(
            input_ids=ids_t[None],
            position_ids=pos_t[None],
            lora=step_lora,
            head_lora=head_lora,
            sample_rows=rows_t,
            attn=self._metadata(len(ids), slots_t, dec, prefills, prefill_t),
            prompt_rows=prompt_rows,
        )

    def _metadata(self, n, slots, dec, prefills, prefill_tables) -> AttentionMetadata:
        """``dec``: (rows [Bd], context lengths [Bd], block tables [Bd, nb]) of the decodes, or None;
        ``prefill_tables``: each prefill's block table [nb] (all already on the device)."""
        meta = AttentionMetadata(num_tokens=n, slot_mapping=slots, backend=self.attention_backend)
        if dec is not None:
            meta.decode_rows, meta.decode_context_lens, block_tables = dec
            token_slots = self._token_slots(block_tables)
            past_end = (
                torch.arange(token_slots.shape[1], device=self.device)[None, :]
                >= meta.decode_context_lens[:, None]
            )
            meta.decode_slots = token_slots.masked_fill_(past_end, self.cache.null_slot)
            meta.all_decode = len(meta.decode_rows) == n
        meta.prefills = [
            PrefillChunk(r, k, st, self._token_slots(t[None])[0, : st + k])
            for (r, k, st, _), t in zip(prefills, prefill_tables, strict=True)
        ]
        return meta

    def _token_slots(self, block_tables: torch.Tensor) -> torch.Tensor:
        """[B, nb] block ids -> [B, nb * block_size] slots of every token position in those blocks."""
        offsets = torch.arange(self.block_size, device=block_tables.device)
        return (block_tables[:, :, None] * self.block_size + offsets).view(block_tables.shape[0], -1)

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


@dataclass(frozen=True)
class RunnerOptions:
    """The engine config's switches for the runner, resolved once (``from_config``)."""

    backend: LoraBackend
    fast_path: FastPathOptions
    cpu_kernel: bool

    @classmethod
    def from_config(cls, config, device: torch.device) -> RunnerOptions:
        """From an ``EngineConfig`` (``ValueError`` naming the field for a bad value)."""
        if config.fast_path not in ("auto", "on", "off"):
            raise ValueError(f"fast_path must be 'auto', 'on' or 'off', got {config.fast_path!r}")
        if config.fast_path == "on" and not config.cpu_kernel:
            raise ValueError("fast_path='on' needs the CPU kernels: it cannot run with cpu_kernel=False")
        for name in ("lora_kernel_max_work", "fused_lora_kernel_max_work"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        options = BackendOptions(device, config.cpu_kernel, config.lora_kernel_max_work)
        fast = FastPathOptions(
            config.fast_path if config.cpu_kernel else "off",
            config.packed_weights,
            config.fused_lora_kernel_max_work,
        )
        return cls(backends.select(config.lora_backend, options), fast, config.cpu_kernel)
