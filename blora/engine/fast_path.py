"""The engine's own decoder forward for the Llama family (Llama / SmolLM, Mistral, Qwen2) on CPU.

The model runner drives transformers' modules for every architecture (``attention.py``). For the most
common family it can instead run this forward over the same flat batch, which removes what a decode step
spends outside the arithmetic: ~45 small PyTorch ops per layer become ~10 calls, and no GEMM re-lays out
its weight.

- q/k/v and gate/up run as ONE matmul each, over weights concatenated once at start-up; the modules'
  own weights become views into them (no extra memory; transformers' modules still work on them).
- Every GEMM (and the LM head) uses a oneDNN-prepacked copy of its weight (``Packed``), when memory allows.
- RMSNorm with the residual add, rotary embedding and SiLU-times-up are C++ kernels (``blora.kernels``)
  that round every intermediate as the PyTorch ops do: bfloat16 results equal transformers' bit for bit up
  to the order of a float32 sum.
- LoRA wrappers (``LoraLinear``) stay where they are: their ``add_lora`` adds each adapter's delta into
  its column slice of a fused output (at decode, q/k/v or gate/up as ONE kernel call: ``_FusedLora``) or
  after the packed o_proj / down_proj GEMM. The embedding is called as a module; attention is the same
  ``paged_attention`` transformers' modules call.

Used only when the model is exactly one of these families (its layers, norms and MLP activation checked
when built), on CPU in float32 / bfloat16 with the AVX-512 kernels built; before each step the runner
checks that no module was swapped (``modules_to_save`` does), else that step runs transformers' modules.
Everything else (rotary variants, biases, sliding windows) is read from the modules and config
transformers built. ``BLORA_FAST_PATH=0`` turns it off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from blora import kernels
from blora.engine import attention
from blora.lora.context import current_batch
from blora.lora.layers import LoraLinear

logger = logging.getLogger("blora")

ENV = "BLORA_FAST_PATH"
LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}
NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}
ACTIVATIONS = {"SiLU", "SiLUActivation"}
_ATTN = {"q", "k", "v", "o"}


# Bumped on every submodule assignment in the process (a global torch hook; a counter increment): the fast
# decoder re-checks its modules only when this moved, instead of walking every layer each step.
_REGISTRATIONS = [0]


def _count_registration(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    _REGISTRATIONS[0] += 1


register_module_module_registration_hook(_count_registration)


def enabled() -> bool:
    return kernels.env_flag(ENV)


@dataclass
class _Layer:
    layer: nn.Module
    attn: nn.Module
    mlp: nn.Module
    in_norm: nn.Module
    post_norm: nn.Module
    bases: dict[str, nn.Module]  # q k v o gate up down -> the plain linear layers
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    gu_w: torch.Tensor
    gu_b: torch.Tensor | None
    window: int | None
    scaling: float
    packed: dict[str, torch.Tensor | None] = field(default_factory=dict)  # qkv / o / gu / down -> oneDNN
    qkv_lora: _FusedLora = field(default_factory=lambda: _FusedLora())
    gu_lora: _FusedLora = field(default_factory=lambda: _FusedLora())


class FastDecoder:
    """``decoder(input_ids [N], position_ids [N]) -> [N, hidden]`` final-normed hidden states."""

    def __init__(
        self, model: nn.Module, layers: list[_Layer], heads: int, kv_heads: int, head_dim: int
    ) -> None:
        self.model = model
        self.decoder = model.base_model
        self.layers = layers
        self.norm = self.decoder.norm
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.inter = layers[0].gu_w.shape[0] // 2
        self._sections = (heads * head_dim, (heads + kv_heads) * head_dim, (heads + 2 * kv_heads) * head_dim)
        self._checked, self._valid = -1, False  # module-registration count of the last check, its result
        self.head: nn.Module | None = None  # the LM head module the packed copy was made of
        self.head_packed: torch.Tensor | None = None

    @classmethod
    def build(cls, model: nn.Module) -> FastDecoder | None:
        """The fast decoder for ``model``, or None (with the reason at debug level) where it does not apply."""
        reason = _unsupported(model)
        if reason:
            logger.debug("blora: transformers' modules run the model (%s)", reason)
            return None
        decoder = model.base_model
        config = model.config
        attn0 = decoder.layers[0].self_attn
        head_dim = attn0.head_dim
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        layers = []
        with torch.no_grad():
            for layer in decoder.layers[: config.num_hidden_layers]:
                attn, mlp = layer.self_attn, layer.mlp
                bases = {name: _base(getattr(attn, f"{name}_proj")) for name in ("q", "k", "v", "o")}
                bases |= {name: _base(getattr(mlp, f"{name}_proj")) for name in ("gate", "up", "down")}
                qkv_w, qkv_b = _fuse([bases["q"], bases["k"], bases["v"]])
                gu_w, gu_b = _fuse([bases["gate"], bases["up"]])
                if hasattr(attn, "sliding_window"):
                    window = attn.sliding_window
                elif type(layer).__name__.startswith("Mistral"):
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
                        bases,
                        qkv_w,
                        qkv_b,
                        gu_w,
                        gu_b,
                        window,
                        float(attn.scaling),
                    )  # fmt: skip
                )
        fast = cls(model, layers, heads, kv_heads, head_dim)
        fast._pack()
        return fast

    def _pack(self) -> None:
        """oneDNN-prepacked copies of the decoder's linear weights and of the LM head (``Packed``), where the
        machine has the memory for a second copy (the modules keep theirs: transformers' path and the LoRA
        wrappers read them)."""
        head = self.model.get_output_embeddings()
        weights = [
            w
            for lay in self.layers
            for w in (lay.qkv_w, lay.bases["o"].weight, lay.gu_w, lay.bases["down"].weight)
        ]
        if isinstance(head, nn.Linear):
            weights.append(head.weight)
        need = sum(w.numel() * w.element_size() for w in weights)
        if not Packed.worth_it(need):
            return
        try:
            with torch.no_grad():
                for lay in self.layers:
                    lay.packed = {
                        "qkv": Packed.of(lay.qkv_w),
                        "o": Packed.of(lay.bases["o"].weight),
                        "gu": Packed.of(lay.gu_w),
                        "down": Packed.of(lay.bases["down"].weight),
                    }
                if type(head) is nn.Linear and head.bias is None:  # a wrapped head (lm_head LoRA) runs as is
                    self.head, self.head_packed = head, Packed.of(head.weight)
        except (RuntimeError, AttributeError, NotImplementedError) as exc:  # op missing in this torch build
            logger.info("blora: no prepacked weights (%s)", exc)
            for lay in self.layers:
                lay.packed = {}
            self.head, self.head_packed = None, None

    def usable(self) -> kernels.CpuKernel | None:
        """The kernels if every module is still the one this decoder was built over (LoRA wrappers aside).
        The module walk runs again only after some module was (re)assigned anywhere in the process."""
        kernel = kernels.get()
        if kernel is None or not enabled():
            return None
        if self._checked == _REGISTRATIONS[0]:
            return kernel if self._valid else None
        self._checked = _REGISTRATIONS[0]
        self._valid = self._modules_unchanged()
        return kernel if self._valid else None

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
            ):
                return False
            for name, base in lay.bases.items():
                module = getattr(attn if name in _ATTN else mlp, f"{name}_proj")
                if module is not base and not (isinstance(module, LoraLinear) and module.base is base):
                    return False
        return True

    def __call__(
        self, kernel: kernels.CpuKernel, input_ids: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        n = input_ids.shape[0]
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        q_end, k_end, v_end = self._sections
        res = self.decoder.embed_tokens(input_ids[None])[0].contiguous()
        cos, sin = self.decoder.rotary_emb(res[None], position_ids[None])
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        first = self.layers[0].in_norm
        x = kernel.rms_norm(res, first.weight, first.variance_epsilon)
        for i, lay in enumerate(self.layers):
            attn, mlp = lay.attn, lay.mlp
            pk = lay.packed
            qkv = Packed.linear(x, pk.get("qkv"), lay.qkv_w, lay.qkv_b)
            lay.qkv_lora(
                kernel,
                qkv,
                x,
                ((attn.q_proj, 0, q_end), (attn.k_proj, q_end, k_end), (attn.v_proj, k_end, v_end)),
            )
            kernel.rotary(qkv, h + kvh, d, cos, sin)
            q = qkv[:, :q_end].view(n, h, d).transpose(0, 1)[None]
            k = qkv[:, q_end:k_end].view(n, kvh, d).transpose(0, 1)[None]
            v = qkv[:, k_end:].view(n, kvh, d).transpose(0, 1)[None]
            out, _ = attention.paged_attention(
                attn, q, k, v, None, scaling=lay.scaling, sliding_window=lay.window
            )
            o = _project(attn.o_proj, lay.bases["o"], pk.get("o"), out.view(n, h * d))
            x = kernel.rms_norm(o, lay.post_norm.weight, lay.post_norm.variance_epsilon, residual=res)
            gu = Packed.linear(x, pk.get("gu"), lay.gu_w, lay.gu_b)
            lay.gu_lora(
                kernel, gu, x, ((mlp.gate_proj, 0, self.inter), (mlp.up_proj, self.inter, 2 * self.inter))
            )
            m = _project(mlp.down_proj, lay.bases["down"], pk.get("down"), kernel.silu_mul(gu, self.inter))
            norm = self.layers[i + 1].in_norm if i + 1 < len(self.layers) else self.norm
            x = kernel.rms_norm(m, norm.weight, norm.variance_epsilon, residual=res)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The LM head over ``hidden`` [B, hidden] with its packed copy, or None (the runner calls the head
        module: it was wrapped, e.g. an lm_head LoRA, or has no packed copy)."""
        head = self.model.get_output_embeddings()
        if self.head_packed is None or head is not self.head:
            return None
        return Packed.linear(hidden.contiguous(), self.head_packed, head.weight, None)


class Packed:
    """oneDNN weights prepacked for small batches (``torch.ops.mkldnn._reorder_linear_weight``).

    ``F.linear`` hands oneDNN a plain [out, in] weight, which it re-lays out into its blocked format on
    every call; a decode GEMM (32 rows) then costs about twice what the arithmetic needs. Measured here on
    a [32, 576] x [576, 3072] layer streamed from memory (30 layers): bfloat16 411 -> 207 us (same bits),
    float32 1245 -> 366 us (float32 results, another summation order); large prefill GEMMs gain ~10%.
    ``BLORA_PACKED_WEIGHTS=0`` turns it off; it is skipped when a second copy of the weights would take more
    than half of the available memory."""

    ENV = "BLORA_PACKED_WEIGHTS"
    BATCH_HINT = 32

    @classmethod
    def worth_it(cls, nbytes: int) -> bool:
        if not kernels.env_flag(cls.ENV):
            return False
        available = _available_memory()
        if available is not None and nbytes > available // 2:
            logger.info(
                "blora: not prepacking %.1f GB of weights (%.1f GB available)", nbytes / 1e9, available / 1e9
            )
            return False
        return True

    @classmethod
    def of(cls, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), cls.BATCH_HINT)

    @staticmethod
    def linear(
        x: torch.Tensor, packed: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if packed is None:
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _project(
    module: nn.Module, base: nn.Module, packed: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    """``module(x)`` for a projection that is ``base`` or a LoRA wrapper of it, through the packed weight."""
    y = Packed.linear(x, packed, base.weight, base.bias)
    if isinstance(module, LoraLinear):
        module.add_lora(y, x, kernels.ENGINE_MAX_WORK)
    return y


class _FusedLora:
    """LoRA of the projections that share one input and one fused output (q/k/v, gate/up).

    At decode every adapter's tokens fit the CPU kernel: the entries of all the projections go to ONE
    kernel call, largest first, each writing its own column range of the fused output (fewer calls, and the
    two threads share out more, smaller pieces of work). Otherwise each wrapper adds its own part."""

    def __init__(self) -> None:
        self._cache: tuple[tuple, torch.Tensor, list] | None = None

    def __call__(self, kernel: kernels.CpuKernel, y: torch.Tensor, x: torch.Tensor, parts) -> None:
        batch = current_batch()
        if batch is None or not batch.any_adapter:
            return
        lora = [(m, lo, hi) for m, lo, hi in parts if isinstance(m, LoraLinear) and m.pairs]
        if not lora:
            return
        groups = batch.groups(x.shape[0])
        tables = [m.kernel_table(x, groups, kernels.ENGINE_MAX_WORK) for m, _, _ in lora]
        if any(t is None for t in tables):
            for module, lo, hi in lora:
                module.add_lora(y[:, lo:hi], x, kernels.ENGINE_MAX_WORK)
            return
        key = tuple((id(t), lo) for t, (_, lo, _) in zip(tables, lora, strict=True))
        if self._cache is None or self._cache[0] != key:
            shifted = []
            for t, (_, lo, _) in zip(tables, lora, strict=True):
                t = t.clone()
                t[:, 4] = lo
                shifted.append(t)
            # the tables are kept alive with the key, so their ids cannot be reused while it is cached
            self._cache = (key, kernels.largest_first(torch.cat(shifted)), tables)
        combined = self._cache[1]
        if combined.shape[0]:
            kernel.add(y, x, combined, *groups.flat())


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, LoraLinear) else module


def _fuse(linears: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the layers' weights (and biases) once; each layer's own parameters become views of it."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat(
            [m.bias.detach() if m.bias is not None else weight.new_zeros(m.weight.shape[0]) for m in linears]
        )
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start : start + rows]
        if m.bias is not None:
            m.bias.data = bias[start : start + rows]
        start += rows
    return weight, bias


def _unsupported(model: nn.Module) -> str | None:
    """Why the fast decoder cannot run ``model`` (None: it can)."""
    if not enabled():
        return f"{ENV}=0"
    decoder = getattr(model, "base_model", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or decoder is model or layers is None or len(layers) == 0:
        return "not a decoder-only model with .layers"
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype not in kernels.DTYPES:
        return f"{param.device.type} {param.dtype}: the fast path is for CPU float32/bfloat16"
    kernel = kernels.get()
    if kernel is None:
        return "CPU kernels unavailable"
    if not kernel.native_vector:
        return "no AVX-512 build of the kernels on this CPU (PyTorch's vectorized ops are faster)"
    for name in ("embed_tokens", "rotary_emb", "norm"):
        if not hasattr(decoder, name):
            return f"decoder has no {name}"
    if type(decoder.norm).__name__ not in NORMS:
        return f"final norm is {type(decoder.norm).__name__}"
    config = model.config
    if len(layers) < config.num_hidden_layers:
        return "fewer layers than config.num_hidden_layers"
    for layer in layers[: config.num_hidden_layers]:
        kind = type(layer).__name__
        if kind not in LAYERS:
            return f"{kind} is not a Llama-family layer"
        if (
            type(layer.input_layernorm).__name__ not in NORMS
            or type(layer.post_attention_layernorm).__name__ not in NORMS
        ):
            return f"{kind} norms are not RMSNorm"
        if type(layer.mlp.act_fn).__name__ not in ACTIVATIONS:
            return f"activation {type(layer.mlp.act_fn).__name__} is not SiLU"
        attn = layer.self_attn
        head_dim = attn.head_dim
        if head_dim % 2 or head_dim > 1024:
            return f"head_dim {head_dim}"
        modules = [getattr(attn, f"{n}_proj", None) for n in "qkvo"]
        modules += [getattr(layer.mlp, f"{n}_proj", None) for n in ("gate", "up", "down")]
        for module in modules:
            base = _base(module) if module is not None else None
            if not isinstance(base, nn.Linear):
                return f"{kind} projection {type(module).__name__} is not a linear layer"
            if base.weight.dtype != param.dtype or base.weight.device != param.device:
                return "mixed dtypes or devices"
        heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
        kv_heads = kv_heads or heads
        if _base(attn.q_proj).weight.shape[0] != heads * head_dim or heads % kv_heads:
            return "q_proj does not match num_attention_heads * head_dim"
        if _base(attn.k_proj).weight.shape[0] != kv_heads * head_dim:
            return "k_proj does not match num_key_value_heads * head_dim"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.dtype != param.dtype:
                return "norm weights in another dtype"
    if decoder.norm.weight.dtype != param.dtype:
        return "norm weights in another dtype"
    return None
