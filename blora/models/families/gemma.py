"""The engine's own decoder forward for Gemma 2 and Gemma 3 (text) on CPU: the Llama forward, Gemma's layer.

What differs from Llama (``blora.models.families.llama``), all read from transformers' modules:

- four RMSNorms per layer ("sandwich": input, post-attention, pre-feedforward, post-feedforward), each of
  the form ``norm(x) * (1 + w)`` computed in float32 then cast; the residual adds the *normed* attention /
  MLP output. The CPU kernel's norm is Llama's (``x.to(dtype) * w``, no ``1 +``), so the norms run as the
  modules themselves (PyTorch ops), as do Gemma 3's per-head q/k norms;
- the embedding module scales by ``sqrt(hidden)`` (called as a module, as in the Llama forward);
- the MLP activation is GELU-tanh: ``act_fn(gate) * up`` in PyTorch ops over the fused gate/up output (the
  kernels have SiLU only);
- sliding-window and full-attention layers alternate (``config.layer_types``); in Gemma 3 each kind has its
  own rotary table (``rotary_emb(x, positions, layer_type)``);
- Gemma 2: attention logit soft-capping (``attn_logit_softcapping``, passed to the paged attention, which
  then runs PyTorch ops) and final logit soft-capping (applied by the model runner after the head);
- attention logits scaled by ``query_pre_attn_scalar ** -0.5`` (the module's ``scaling``).

Fused q/k/v and gate/up GEMMs over prepacked weights, the rotary kernel, paged attention and the fused LoRA
calls are the Llama forward's.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from blora.engine import attention
from blora.lora.layers import add_fused_lora
from blora.models.families import Family, FastPathOptions, HFModule
from blora.models.families.llama import FastDecoder, _project
from blora.models.families.llama import build as build_llama


def build(model: nn.Module, family: Family, options: FastPathOptions) -> FastDecoder | str:
    """The Gemma 2 / 3 fast decoder for ``model``, or why it does not apply."""
    config: HFModule = model.config
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention (use_bidirectional_attention=True)"
    layers = getattr(getattr(model, "base_model", None), "layers", None) or []
    for layer in layers:
        for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
            norm = getattr(layer, name, None)
            if type(norm).__name__ not in family.norms:
                return f"{type(layer).__name__}.{name} is {type(norm).__name__}, not a Gemma RMSNorm"
    return build_llama(model, family, options, decoder_class=GemmaDecoder)


class GemmaDecoder(FastDecoder):
    """``decoder(input_ids [N], position_ids [N]) -> [N, hidden]`` with Gemma's sandwich-norm layer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ff_norms: list[tuple[HFModule, HFModule]] = [
            (lay.layer.pre_feedforward_layernorm, lay.layer.post_feedforward_layernorm) for lay in self.layers
        ]
        self.layer_types = list(self.model.config.layer_types[: len(self.layers)])
        self.softcap = getattr(self.model.config, "attn_logit_softcapping", None)
        # Gemma 3: a rotary table per layer type; Gemma 2: one for all layers
        self.rope_per_type = "layer_type" in inspect.signature(self.decoder.rotary_emb.forward).parameters

    def _modules_unchanged(self) -> bool:
        if not super()._modules_unchanged():
            return False
        return all(
            lay.layer.pre_feedforward_layernorm is pre and lay.layer.post_feedforward_layernorm is post
            for lay, (pre, post) in zip(self.layers, self.ff_norms, strict=True)
        )

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        n = input_ids.shape[0]
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        q_end, k_end, _ = self._sections
        work, inter = self.lora_max_work, self.inter
        res = self.decoder.embed_tokens(input_ids[None])[0].contiguous()  # scaled by the module
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for kind in set(self.layer_types):
            kind_arg = (kind,) if self.rope_per_type else ()
            if kind_arg or not rope:
                cos, sin = self.decoder.rotary_emb(res[None], position_ids[None], *kind_arg)
                cos, sin = cos[0].contiguous(), sin[0].contiguous()
            rope[kind] = (cos, sin)
        for lay, (pre_ff, post_ff), kind in zip(self.layers, self.ff_norms, self.layer_types, strict=True):
            attn, mlp = lay.attn, lay.mlp
            gemm = lay.gemm
            x = lay.in_norm(res)
            qkv = gemm["qkv"](x)
            add_fused_lora(qkv, x, [(getattr(attn, name), lo, hi) for name, lo, hi in self.qkv_parts], work)
            if lay.q_norm is not None and lay.k_norm is not None:  # Gemma 3
                qkv[:, :q_end].view(n, h, d).copy_(lay.q_norm(qkv[:, :q_end].view(n, h, d)))
                qkv[:, q_end:k_end].view(n, kvh, d).copy_(lay.k_norm(qkv[:, q_end:k_end].view(n, kvh, d)))
            kernel.rotary(qkv, h + kvh, d, *rope[kind])
            q = qkv[:, :q_end].view(n, h, d).transpose(0, 1)[None]
            k = qkv[:, q_end:k_end].view(n, kvh, d).transpose(0, 1)[None]
            v = qkv[:, k_end:].view(n, kvh, d).transpose(0, 1)[None]
            out, _ = attention.paged_attention(
                attn, q, k, v, None, scaling=lay.scaling, sliding_window=lay.window, softcap=self.softcap
            )
            o = _project(attn.o_proj, gemm["o"], out.reshape(n, h * d), work)
            res = res + lay.post_norm(o)
            x = pre_ff(res)
            gu = gemm["gu"](x)
            add_fused_lora(gu, x, [(getattr(mlp, name), lo, hi) for name, lo, hi in self.gu_parts], work)
            act = mlp.act_fn(gu[:, :inter]) * gu[:, inter:]
            m = _project(mlp.down_proj, gemm["down"], act, work)
            res = res + post_ff(m)
        return self.norm(res)
