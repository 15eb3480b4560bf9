"""The engine's own decoder forward for the Llama family (Llama / SmolLM, Mistral, Qwen2, Qwen3, Phi-3) on CPU.

transformers' modules run every architecture (``blora.engine.attention``). For this family the engine can
instead run this forward over the same flat batch, which removes what a decode step spends outside the
arithmetic: ~45 small PyTorch ops per layer become ~10 calls, and no GEMM re-lays out its weight.

- q/k/v and gate/up run as ONE matmul each, over weights concatenated once at load time (``fuse_linears``);
  the modules' own weights become views into them (no extra memory; transformers' modules still work).
- Every GEMM (and the LM head) uses a oneDNN-prepacked copy of its weight (``Packed``), when memory allows.
- Quantized base models (``blora.models.quant``): the GEMMs are ``QuantizedLinear`` calls instead (``Gemm``
  holds either), q/k/v and gate/up each ONE over a fused quantized layer (``fuse_quantized``: exact; the
  parts' buffers are views of it where the packing allows, int4 scales are a copy, see there); the int8 LM
  head runs its own kernel for a few rows and a prepacked copy of its dequantized weight above
  (``FastDecoder.logits``).
- RMSNorm with the residual add, rotary embedding and SiLU-times-up are C++ kernels (``blora.kernels``)
  that round every intermediate as the PyTorch ops do: bfloat16 results equal transformers' bit for bit up
  to the order of a float32 sum.
- LoRA wrappers (``LoraLinear``) stay where they are: the step's ``LoraBackend`` adds each adapter's delta
  into its column slice of a fused output (``add_fused``: at decode, q/k/v or gate/up as ONE kernel call)
  or after the packed o_proj / down_proj GEMM. The embedding is called as a module; attention is the same
  ``paged_attention`` transformers' modules call.

The same forward runs the family's two variants: Qwen3's per-head q/k RMSNorm before the rotary embedding
(applied by the ``q_norm`` / ``k_norm`` modules themselves: the kernel's norm takes one row stride, the q/k
heads of the fused output are not one strided matrix), and Phi-3's checkpoint-fused ``qkv_proj`` /
``gate_up_proj`` (used as the fused weights directly; their LoRA targets the fused module, as in PEFT).

Used only when the model is exactly this family (its layers, norms and MLP activation checked when built),
on CPU in float32 / bfloat16 with the kernels built (in ``fast_path="auto"`` only the AVX-512 build; "on"
takes the portable one too). Everything else (rotary variants, biases, sliding windows) is read from the
modules and config transformers built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from blora import kernels
from blora.engine import attention
from blora.lora.layers import LoraLinear, add_fused_lora
from blora.models.families import Family, FastPathOptions, HFModule, structure_version
from blora.models.families.packing import Gemm, Packed, fuse_linears
from blora.models.quant import QuantizedLinear, fuse_quantized

Linear = nn.Linear | QuantizedLinear  # what a projection of the fast forward is (a LoRA wrapper's base)
# Rows up to which an int8 LM head runs its integer kernel (``FastDecoder.logits``). Measured on an
# AVX512-BF16 EPYC, 2 threads, blora's int8 kernel against the prepacked bfloat16 copy: SmolLM2's 49152 x 576
# head 0.81 / 1.00 / 2.09 / 3.56 ms at 1 / 4 / 8 / 16 rows against 1.62 / 1.92 / 2.41 / 2.98 ms; Qwen2.5's
# 151936 x 896 head 3.3 / 3.5 / 6.5 / 12.8 ms against 7.3 / 6.7 / 7.9 / 9.3 ms.
HEAD_INT8_MAX_ROWS = 8

logger = logging.getLogger("blora")


@dataclass
class _Layer:
    layer: HFModule
    attn: HFModule
    mlp: HFModule
    in_norm: HFModule
    post_norm: HFModule
    q_norm: HFModule | None  # Qwen3: per-head RMSNorm of q and k before the rotary embedding
    k_norm: HFModule | None
    bases: dict[str, Linear]  # projection name (q_proj ... down_proj) -> the plain or quantized linear layer
    gemm: dict[str, Gemm]  # "qkv" / "o" / "gu" / "down" -> the GEMM the forward calls (fused for qkv / gu)
    window: int | None
    scaling: float

    @property
    def packed(self) -> dict[str, torch.Tensor]:
        """The oneDNN-prepacked weights of this layer's GEMMs (empty: none made)."""
        return {name: g.packed for name, g in self.gemm.items() if g.packed is not None}


def build(
    model: nn.Module, family: Family, options: FastPathOptions, decoder_class: type[FastDecoder] | None = None
) -> FastDecoder | str:
    """The fast decoder for ``model`` (weights fused, and prepacked if ``options.packed_weights``), or why
    it does not apply. ``decoder_class``: a subclass with another layer forward (Gemma's)."""
    kernel = kernels.get()
    reason = _unsupported(model, family, kernel, options)
    if reason:
        return reason
    decoder: HFModule = model.base_model
    config: HFModule = model.config
    attn0 = decoder.layers[0].self_attn
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    fused = dict(family.fused)
    layers = []
    with torch.no_grad():
        for layer in decoder.layers[: config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            bases = {name: _base(getattr(attn, name)) for name in (*fused["qkv"], "o_proj")}
            bases |= {name: _base(getattr(mlp, name)) for name in (*fused["gate_up"], "down_proj")}
            gemm = _gemms(bases, fused["qkv"], fused["gate_up"])  # q, k, v in this order
            if isinstance(gemm, str):
                return gemm
            if hasattr(attn, "sliding_window"):
                window = attn.sliding_window
            elif type(layer).__name__.startswith(("Mistral", "Phi3")):  # read from the config in attention
                window = getattr(config, "sliding_window", None)
            else:
                window = None
            layers.append(
                _Layer(
                    layer,
                    attn,
                    mlp,
                    layer.input_layernorm,
                    layer.post_attention_layernorm,
                    getattr(attn, "q_norm", None),
                    getattr(attn, "k_norm", None),
                    bases,
                    gemm,
                    window,
                    float(attn.scaling),
                )  # fmt: skip
            )
    quantized = [f for lay in layers for g in lay.gemm.values() if (f := g.quant) is not None]
    if quantized:
        logger.info("blora: fast path over %s-quantized linears", quantized[0].method)
    cls = decoder_class or FastDecoder
    assert kernel is not None  # _unsupported refused a model without the kernels
    fast = cls(model, kernel, layers, heads, kv_heads, attn0.head_dim, options, fused)
    if options.packed_weights:
        fast.pack()
    return fast


class FastDecoder:
    """``decoder(input_ids [N], position_ids [N]) -> [N, hidden]`` final-normed hidden states."""

    def __init__(
        self,
        model: nn.Module,
        kernel: kernels.CpuKernel,
        layers: list[_Layer],
        heads: int,
        kv_heads: int,
        head_dim: int,
        options: FastPathOptions,
        fused: dict[str, tuple[str, ...]],
    ) -> None:
        self.model: HFModule = model
        self.kernel = kernel
        self.decoder: HFModule = model.base_model
        self.layers = layers
        self.norm: HFModule = self.decoder.norm
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.lora_max_work = options.lora_max_work
        self.inter = layers[0].gemm["gu"].out_features // 2
        self._sections = (heads * head_dim, (heads + kv_heads) * head_dim, (heads + 2 * kv_heads) * head_dim)
        self.attn_names = frozenset((*fused["qkv"], "o_proj"))
        # (projection name, first column, end column) of each module whose output the fused GEMM holds
        self.qkv_parts = _columns(fused["qkv"], layers[0].bases)
        self.gu_parts = _columns(fused["gate_up"], layers[0].bases)
        self._checked, self._valid = -1, False  # structure version of the last module check, its result
        self.head: Linear | None = None  # the LM head module the packed copy was made of
        self.head_packed: torch.Tensor | None = None

    def pack(self) -> None:
        """oneDNN-prepacked copies of the decoder's linear weights and of the LM head (``Packed``), where the
        machine has the memory for a second copy (the modules keep theirs: transformers' path and the LoRA
        wrappers read them). An int8 LM head (``quantize_model``) gets a prepacked copy of its dequantized
        weight for batches above ``HEAD_INT8_MAX_ROWS`` rows (``logits``)."""
        head = self.model.get_output_embeddings()
        gemms = [g for lay in self.layers for g in lay.gemm.values() if g.quant is None]  # float ones
        nbytes = sum(g.weight.numel() * g.weight.element_size() for g in gemms)
        if isinstance(head, nn.Linear):
            nbytes += head.weight.numel() * head.weight.element_size()
        elif isinstance(head, QuantizedLinear):
            nbytes += head.out_features * head.in_features * head.dtype.itemsize
        if not Packed.worth_it(nbytes):
            return
        try:
            with torch.no_grad():
                for g in gemms:
                    g.packed = Packed.of(g.weight)
                # a wrapped head (lm_head LoRA) runs as is
                if type(head) is nn.Linear and head.bias is None:
                    self.head, self.head_packed = head, Packed.of(head.weight)
                elif isinstance(head, QuantizedLinear) and head.bias is None:
                    self.head, self.head_packed = head, Packed.of(head.dequantize())
        except (RuntimeError, AttributeError, NotImplementedError) as exc:  # op missing in this torch build
            logger.info("blora: no prepacked weights (%s)", exc)
            for g in gemms:
                g.packed = None
            self.head, self.head_packed = None, None

    def usable(self) -> bool:
        """Whether every module is still the one this decoder was built over (LoRA wrappers aside). The
        module walk runs again only after the model's structure version moved."""
        version = structure_version(self.model)
        if self._checked != version:
            self._checked = version
            self._valid = self._modules_unchanged()
        return self._valid

    def _modules_unchanged(self) -> bool:
        if self.decoder.norm is not self.norm:
            return False
        for lay in self.layers:
            attn, mlp = lay.attn, lay.mlp
            if (
                lay.layer.self_attn is not attn
                or lay.layer.mlp is not mlp
                or lay.layer.input_layernorm is not lay.in_norm
                or lay.layer.post_attention_layernorm is not lay.post_norm
                or getattr(attn, "q_norm", None) is not lay.q_norm
                or getattr(attn, "k_norm", None) is not lay.k_norm
            ):
                return False
            for name, base in lay.bases.items():
                module = getattr(attn if name in self.attn_names else mlp, name)
                if module is not base and not (isinstance(module, LoraLinear) and module.base is base):
                    return False
        return True

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        n = input_ids.shape[0]
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        q_end, k_end, _ = self._sections
        work = self.lora_max_work
        res = self.decoder.embed_tokens(input_ids[None])[0].contiguous()
        cos, sin = self.decoder.rotary_emb(res[None], position_ids[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        first = self.layers[0].in_norm
        x = kernel.rms_norm(res, first.weight, first.variance_epsilon)
        for i, lay in enumerate(self.layers):
            attn, mlp = lay.attn, lay.mlp
            gemm = lay.gemm
            qkv = gemm["qkv"](x)
            add_fused_lora(qkv, x, [(getattr(attn, name), lo, hi) for name, lo, hi in self.qkv_parts], work)
            if lay.q_norm is not None and lay.k_norm is not None:  # Qwen3: torch ops (module docstring)
                qkv[:, :q_end].view(n, h, d).copy_(lay.q_norm(qkv[:, :q_end].view(n, h, d)))
                qkv[:, q_end:k_end].view(n, kvh, d).copy_(lay.k_norm(qkv[:, q_end:k_end].view(n, kvh, d)))
            kernel.rotary(qkv, h + kvh, d, cos, sin)
            q = qkv[:, :q_end].view(n, h, d).transpose(0, 1)[None]
            k = qkv[:, q_end:k_end].view(n, kvh, d).transpose(0, 1)[None]
            v = qkv[:, k_end:].view(n, kvh, d).transpose(0, 1)[None]
            out, _ = attention.paged_attention(
                attn, q, k, v, None, scaling=lay.scaling, sliding_window=lay.window
            )
            o = _project(attn.o_proj, gemm["o"], out.view(n, h * d), work)
            x = kernel.rms_norm(o, lay.post_norm.weight, lay.post_norm.variance_epsilon, residual=res)
            gu = gemm["gu"](x)
            add_fused_lora(gu, x, [(getattr(mlp, name), lo, hi) for name, lo, hi in self.gu_parts], work)
            m = _project(mlp.down_proj, gemm["down"], kernel.silu_mul(gu, self.inter), work)
            norm: HFModule = self.layers[i + 1].in_norm if i + 1 < len(self.layers) else self.norm
            x = kernel.rms_norm(m, norm.weight, norm.variance_epsilon, residual=res)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The LM head over ``hidden`` [B, hidden] with its packed copy, or None (the runner calls the head
        module: it was wrapped, e.g. an lm_head LoRA, or has no packed copy). An int8 head runs its own
        kernel up to ``HEAD_INT8_MAX_ROWS`` rows (faster than the bfloat16 copy: half the bytes) and
        the packed copy of its dequantized weight above (oneDNN's bfloat16 GEMM outruns the int8 kernel
        there); both compute ``F.linear(hidden, dequantize(W))``."""
        head = self.model.get_output_embeddings()
        if self.head_packed is None or self.head is None or head is not self.head:
            return None
        if isinstance(head, QuantizedLinear) and hidden.shape[0] <= HEAD_INT8_MAX_ROWS:
            return head(hidden)
        return Packed.matmul(hidden.contiguous(), self.head_packed)


def _project(module: nn.Module, gemm: Gemm, x: torch.Tensor, max_work: int) -> torch.Tensor:
    """``module(x)`` for a projection whose base layer ``gemm`` runs (module: that base or a LoRA wrapper of
    it)."""
    y = gemm(x)
    if isinstance(module, LoraLinear):
        module.add_lora(y, x, max_work)
    return y


def _gemms(bases: dict[str, Linear], qkv: tuple[str, ...], gate_up: tuple[str, ...]) -> dict[str, Gemm] | str:
    """The layer's four GEMMs over its base layers: q/k/v and gate/up fused (float: ``fuse_linears``,
    quantized: ``fuse_quantized``; the modules' own weights become views of the fused ones where the layout
    allows), o_proj / down_proj as they are. A string says why a quantized layer cannot be fused."""
    gemm: dict[str, Gemm] = {}
    for key, names in (("qkv", qkv), ("gu", gate_up)):
        parts = [bases[name] for name in names]
        if all(isinstance(p, nn.Linear) for p in parts):
            gemm[key] = Gemm(*fuse_linears([p for p in parts if isinstance(p, nn.Linear)]))
        elif all(isinstance(p, QuantizedLinear) for p in parts):
            fused = fuse_quantized([p for p in parts if isinstance(p, QuantizedLinear)])
            if isinstance(fused, str):
                return f"{'/'.join(names)} cannot run as one quantized GEMM: {fused}"
            gemm[key] = Gemm.quantized(fused)
        else:
            return f"{'/'.join(names)} mix quantized and float linears (quantize all of them or none)"
    for key, name in (("o", "o_proj"), ("down", "down_proj")):
        base = bases[name]
        gemm[key] = (
            Gemm.quantized(base) if isinstance(base, QuantizedLinear) else Gemm(base.weight, base.bias)
        )
    return gemm


def _columns(names: tuple[str, ...], bases: dict[str, Linear]) -> list[tuple[str, int, int]]:
    """(name, start, stop) output columns of each projection in a fused GEMM over ``names`` in order."""
    parts: list[tuple[str, int, int]] = []
    start = 0
    for name in names:
        rows = bases[name].out_features
        parts.append((name, start, start + rows))
        start += rows
    return parts


def _base(module: HFModule) -> HFModule:
    """The layer a LoRA wrapper wraps, or ``module`` itself."""
    return module.base if isinstance(module, LoraLinear) else module


def _unsupported(
    model: nn.Module, family: Family, kernel: kernels.CpuKernel | None, options: FastPathOptions
) -> str | None:
    """Why the fast decoder cannot run ``model`` (None: it can)."""
    decoder: HFModule = getattr(model, "base_model", None)
    layers: HFModule = getattr(decoder, "layers", None)
    if decoder is None or decoder is model or layers is None or len(layers) == 0:
        return "not a decoder-only model with .layers"
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype not in kernels.DTYPES:
        return f"{param.device.type} {param.dtype}: the fast path is for CPU float32/bfloat16"
    if kernel is None:
        return "CPU kernels unavailable"
    if not kernel.native_vector and options.mode == "auto":
        return "no AVX-512 build of the kernels on this CPU (PyTorch's vectorized ops are faster; fast_path='on' forces it)"
    for name in ("embed_tokens", "rotary_emb", "norm"):
        if not hasattr(decoder, name):
            return f"decoder has no {name}"
    if type(decoder.norm).__name__ not in family.norms:
        return f"final norm is {type(decoder.norm).__name__}"
    config: HFModule = model.config
    if len(layers) < config.num_hidden_layers:
        return "fewer layers than config.num_hidden_layers"
    for layer in layers[: config.num_hidden_layers]:
        if reason := _unsupported_layer(layer, family, config, param):
            return reason
    if decoder.norm.weight.dtype != param.dtype:
        return "norm weights in another dtype"
    return None


def _unsupported_layer(layer: HFModule, family: Family, config: HFModule, param: torch.Tensor) -> str | None:
    kind = type(layer).__name__
    if kind not in family.layers:
        return f"{kind} is not a {family.name}-family layer"
    if (
        type(layer.input_layernorm).__name__ not in family.norms
        or type(layer.post_attention_layernorm).__name__ not in family.norms
    ):
        return f"{kind} norms are not RMSNorm"
    act = getattr(layer.mlp, "act_fn", None) or getattr(layer.mlp, "activation_fn", None)
    if type(act).__name__ not in family.activations:
        return f"activation {type(act).__name__} is not SiLU"
    attn = layer.self_attn
    head_dim = attn.head_dim
    if head_dim % 2 or head_dim > 1024:
        return f"head_dim {head_dim}"
    fused = dict(family.fused)
    qkv_names, gu_names = fused["qkv"], fused["gate_up"]
    modules = [getattr(attn, n, None) for n in (*qkv_names, "o_proj")]
    modules += [getattr(layer.mlp, n, None) for n in (*gu_names, "down_proj")]
    for module in modules:
        base = _base(module) if module is not None else None
        if isinstance(base, QuantizedLinear):
            if base.dtype != param.dtype or base.qweight.device != param.device:
                return "mixed dtypes or devices"
            continue
        if not isinstance(base, nn.Linear):
            return f"{kind} projection {type(module).__name__} is not a linear layer"
        if base.weight.dtype != param.dtype or base.weight.device != param.device:
            return "mixed dtypes or devices"
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        return "num_attention_heads is not a multiple of num_key_value_heads"
    rows = [_base(getattr(attn, n)).out_features for n in qkv_names]
    if len(rows) == 3 and rows[0] != heads * head_dim:
        return "q_proj does not match num_attention_heads * head_dim"
    if len(rows) == 3 and rows[1] != kv_heads * head_dim:
        return "k_proj does not match num_key_value_heads * head_dim"
    if sum(rows) != (heads + 2 * kv_heads) * head_dim:
        return "q/k/v projections do not match the attention heads"
    if sum(_base(getattr(layer.mlp, n)).out_features for n in gu_names) % 2:
        return "gate/up projections of unequal sizes"
    rope = getattr(config, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    if partial != 1.0:
        return f"partial rotary embedding (partial_rotary_factor={partial}) is not implemented in the fast forward"
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        norms += [getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)]
        if any(type(norm).__name__ not in family.norms for norm in norms[2:]):
            return f"{kind} q/k norms are not RMSNorm"
    for norm in norms:
        if norm.weight.dtype != param.dtype:
            return "norm weights in another dtype"
    return None
