"""How large an adapter can be for a given base model and config, checked before its weights are read.

A LoRA adapter holds, per module its config targets, ``A`` [r, in] and ``B`` [out, r] (plus a LoRA bias
and a DoRA magnitude of [out] each); besides, copies of the embedding / output head (PEFT saves them with
embedding adapters) and the parameters of its ``modules_to_save``. The config (``r``, ``rank_pattern``,
targets) and the model's shapes give the most numbers a valid weights file can declare; a file that
declares more, or whose data is larger than that many 8-byte numbers, is refused from its header, before
its tensors are read. ``max_rank`` is checked on the config here too, and the prepared size against the
host cache budget.

Config fields whose entries are each matched against every module name (a regex per ``rank_pattern``
key) may not have more entries than the model has modules (plus a margin for lists of names shared
across architectures): a config with 4,000 ``rank_pattern`` keys is refused at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blora.lora.config import AdapterError, LoraConfig
from blora.lora.layers import base_features, is_linear

MAX_ITEMSIZE = 8  # the widest dtype a weights file may use (F64)
LEGACY_OVERHEAD = 1 << 20  # pickle framing of a legacy ``torch.save`` file beyond its tensor data
NAME_LIST_MARGIN = 64  # list entries beyond the model's module count (names shared by architectures)


@dataclass
class SizeBound:
    """The base model's side of the check: its modules (name -> module), the names PEFT's
    ``"all-linear"`` means, the output head's name, ``max_rank``, the host cache budget (``max_bytes``)
    and the model's element size."""

    table: dict[str, nn.Module]
    all_linear: set[str]
    head: str | None
    max_rank: int | None = None
    max_bytes: int | None = None
    element_size: int = 4

    def check(self, cfg: LoraConfig, values: int | None, data_bytes: int, fname: str) -> None:
        """``weights.SizeCheck``: refuse a file too large for ``cfg`` on this model (``values`` numbers
        declared by its header, None for a legacy ``.bin``; ``data_bytes`` of tensor data)."""
        where = cfg.where
        self.check_entries(cfg)
        bound = self.max_values(cfg)
        slack = LEGACY_OVERHEAD if values is None else 0
        if (values is not None and values > bound) or data_bytes > bound * MAX_ITEMSIZE + slack:
            held = f"{values:,} numbers" if values is not None else f"{data_bytes:,} bytes"
            raise AdapterError(
                f"{where}: {fname} holds {held}, more than an adapter with this config can hold for this "
                f"base model (at most {bound:,} numbers: rank x (in + out) per targeted module, biases, "
                "DoRA magnitudes, embedding / lm_head copies and modules_to_save); refused before reading "
                "its tensors. Was it saved for another base model or config?"
            )
        if self.max_bytes is not None and values is not None and values * self.element_size > self.max_bytes:
            raise AdapterError(
                f"{where}: needs {values * self.element_size / 2**20:.1f} MiB, more than the whole CPU cache "
                f"budget ({self.max_bytes / 2**20:.1f} MiB); raise cpu_cache_bytes"
            )

    def check_entries(self, cfg: LoraConfig) -> None:
        """No more pattern / name entries than the model has modules to match them against."""
        limit = len(self.table)
        for name, count in cfg.pattern_entries().items():
            allowed = limit if name.endswith("_pattern") else limit + NAME_LIST_MARGIN
            if count > allowed:
                raise AdapterError(
                    f"{cfg.where}: {name} has {count:,} entries, more than the base model has modules "
                    f"({limit:,}); each entry is matched against every module name. Refused: list only "
                    "patterns for modules of this model"
                )

    def max_values(self, cfg: LoraConfig) -> int:
        """The most numbers a valid weights file for ``cfg`` holds (raises for ranks above ``max_rank``)."""
        total = 0
        for name, module in self.table.items():
            embedding = isinstance(module, nn.Embedding)
            if embedding or name == self.head:
                weight = module.weight
                assert isinstance(weight, torch.Tensor)  # an embedding / output head (or a wrapper of one)
                total += weight.numel()  # a saved copy of the base layer
            if not (embedding or is_linear(module)) or not cfg.targets(name, self.all_linear):
                continue
            if isinstance(module, nn.Embedding):
                in_f, out_f = module.num_embeddings, module.embedding_dim
            else:
                in_f, out_f = base_features(module)
            r = cfg.rank_for(name)
            if self.max_rank is not None and r > self.max_rank:
                raise AdapterError(
                    f"{cfg.where}, module {name!r}: rank {r} is above the configured maximum {self.max_rank}"
                )
            total += r * (in_f + out_f) + 2 * out_f
        for entry in cfg.modules_to_save or ():
            for name, module in self.table.items():
                if name.endswith(entry):
                    total += sum(p.numel() for p in module.parameters())
        return total
