"""The engine's CPU kernels (``csrc/cpu_kernels.cpp``): compiled on first use, called through ``ctypes``.

Multi-LoRA (``CpuKernel.add``). At decode every adapter of a step has one or two tokens, so a LoRA layer is
bound by reading the adapters' weights, and PyTorch's per-call overhead is the real cost: a small bfloat16
GEMM costs ~13 us on this CPU whatever its size (oneDNN), a ``bmm`` over zero-padded ranks reads padding
and runs far below memory bandwidth. The kernel streams each active adapter's A and B once per layer for
all its tokens, for every adapter of the layer in ONE call, accumulating in float32
(benchmarks/ops_bench.py measures it).

Paged decode attention (``CpuKernel.decode_attention``). The PyTorch path gathers every sequence's cached
keys and values into a padded copy (``index_select``) and runs two ``bmm``s; the kernel reads the paged
cache in place, once, for all query heads sharing a K/V head, with a float32 softmax. One SmolLM2 decode
step (batch 32, bf16, 2 threads): the engine went from ~470 to ~680 tok/s.

The library is built with the system C++ compiler (``$CXX``, else ``c++``/``g++``; ~1 s) into
``$BLORA_CACHE/kernels`` under a name that hashes the source, the flags, the compiler and this CPU, so a
changed source or another machine never loads a stale build. No compiler or a failed build mean the
PyTorch ops are used instead (same results, slower decode), with one warning that says why; an engine
with ``EngineConfig(cpu_kernel=False)`` uses them by choice.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger("blora")

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
ABI_VERSION = 7
# An adapter's tokens go through the kernel while tokens x rank stays at or under this; above it a GEMM pair
# wins (measured, bf16 and fp32: r=64 crosses over at 16-32 tokens, r=8 beyond 128). Prefill goes to GEMMs.
MAX_WORK = 2048
# The bound in the engine's fast path (blora/models/families), where one kernel call serves q/k/v (and
# gate/up) together: measured on the 16-adapter engine run, 8192 beat 2048 (bf16 +7% tok/s, time to first
# token -17%; fp32 likewise) and 32768 gave nothing more. Alone on hot caches a GEMM pair still wins for
# one adapter with hundreds of tokens, which is why library mode keeps MAX_WORK. The engine reads both
# as the defaults of ``EngineConfig.lora_kernel_max_work`` / ``fused_lora_kernel_max_work``.
FUSED_MAX_WORK = 8192
DTYPES = (torch.float32, torch.bfloat16)

# Flag sets tried in order: tuned for this CPU, then portable (e.g. a compiler without -march=native).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
# -ffp-contract=off: no implicit multiply-add fusion, so the elementwise ops round like PyTorch's
_BASE_FLAGS = ["-shared", "-fPIC", "-std=c++17", "-ffp-contract=off"]


class CpuKernel:
    """A loaded build of the kernels: ``add`` (multi-LoRA), ``decode_attention``, the fast forwards'
    elementwise ops and the int8 linear (``int8_linear`` / ``int8_dequantize``)."""

    def __init__(self, lib: ctypes.CDLL, path: Path, flags: list[str]) -> None:
        self.path = path
        self.flags = flags
        self._lib = lib  # keeps the library loaded
        args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]  # fmt: skip
        # ctypes entry points (argtypes set), keyed by dtype / (name, dtype)
        self._fns: dict[torch.dtype, Callable[..., None]] = {}
        for dtype, symbol in ((torch.float32, "blora_lora_add_f32"), (torch.bfloat16, "blora_lora_add_bf16")):
            fn = getattr(lib, symbol)
            fn.argtypes = args
            fn.restype = None
            self._fns[dtype] = fn
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        attn_args = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, i64, ptr, i64, ctypes.c_float, ptr, i64, i64, i64,
                     i64, i64]  # fmt: skip
        self._attn: dict[torch.dtype, Callable[..., None]] = {}
        for dtype, symbol in (
            (torch.float32, "blora_decode_attention_f32"),
            (torch.bfloat16, "blora_decode_attention_bf16"),
        ):
            fn = getattr(lib, symbol)
            fn.argtypes = attn_args
            fn.restype = None
            self._attn[dtype] = fn
        self.native_vector = bool(lib.blora_native_vector())
        self._int8_linear = lib.blora_int8_linear_bf16
        self._int8_linear.argtypes = [ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64, ptr, i64]
        self._int8_linear.restype = None
        self._int8_dequantize = lib.blora_int8_dequantize_bf16
        self._int8_dequantize.argtypes = [ptr, ptr, i64, i64, ptr, i64]
        self._int8_dequantize.restype = None
        self._local = threading.local()  # per-thread scratch of int8_linear
        self._elementwise: dict[tuple[str, torch.dtype], Callable[..., None]] = {}
        signatures = {
            "rms_norm": ([ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, ctypes.c_float, i64]),
            "rotary": ([ptr, i64, i64, i64, ptr, ptr, i64, i64, i64]),
            "silu_mul": ([ptr, i64, ptr, i64, i64, i64, i64]),
            "store_kv": ([ptr, ptr, i64, i64, ptr, ptr, i64, ptr, i64, i64, i64]),
            "argmax": ([ptr, i64, i64, i64, ptr, i64]),
        }
        for name, argtypes in signatures.items():
            for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
                fn = getattr(lib, f"blora_{name}_{suffix}")
                fn.argtypes = argtypes
                fn.restype = None
                self._elementwise[name, dtype] = fn

    def add(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        meta: KernelTable | torch.Tensor,
        offsets: torch.Tensor,
        rows: torch.Tensor,
    ) -> None:
        """``y[t, c:c + w] += x[t] @ A_u @ B_u`` for the tokens of each entry ``u`` listed in ``meta``.

        ``x`` [N, in], ``y`` [N, >= c + w]: CPU, same dtype (float32 or bfloat16), unit column stride.
        ``meta`` [n, 6] int64 rows ``(A pointer, B pointer, rank, position, c, w)`` with ``A`` stored [r, in]
        and ``B`` [r, w] row-major (``kernel_meta``); the tokens of the entry at ``position`` are
        ``rows[offsets[position]:offsets[position + 1]]`` (``LoraPlan.flat``). Entries with different
        ``c`` let one call serve several projections of the same input (a fused q/k/v output). The caller
        keeps the weights alive and checks shapes: the kernel trusts every pointer it is given.
        """
        if isinstance(meta, KernelTable):
            meta = meta.entries
        self._fns[x.dtype](
            x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), x.shape[1], meta.shape[0],
            meta.data_ptr(), offsets.data_ptr(), rows.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip

    def bind_add(
        self,
        table: KernelTable | torch.Tensor,
        offsets: torch.Tensor,
        rows: torch.Tensor,
        in_features: int,
        dtype: torch.dtype,
    ) -> BoundAdd:
        """``add`` with everything but ``y`` and ``x`` fixed (see ``BoundAdd``)."""
        entries = table.entries if isinstance(table, KernelTable) else table
        bound = BoundAdd(self._fns[dtype], entries, offsets, rows, in_features)
        bound.keep = table  # the weights its entries point into
        return bound

    def decode_attention(
        self,
        query: torch.Tensor,
        rows: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        lens: torch.Tensor,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """One query token per sequence over its paged context -> [B, H, D] (see ``csrc``).

        ``query`` [H, N, D] (unit stride on D) holds the flat batch; sequence ``b``'s query is row
        ``rows[b]`` (or ``b`` when ``rows`` is None). ``k_cache``/``v_cache`` [KVH, S, D] contiguous;
        ``slots`` [B, L] int64 cache slots of each sequence's positions, ``lens`` [B] int64 context lengths
        (>= 1, <= L; all slots below them valid). ``window``: attend only to the last ``window`` positions.
        Same dtype (float32 or bfloat16) everywhere, CPU; H a multiple of KVH. The caller checks all this.
        """
        h, _, d = query.shape
        b = lens.shape[0]
        out = query.new_empty(b, h, d)
        self._attn[query.dtype](
            query.data_ptr(), query.stride(1), query.stride(0), 0 if rows is None else rows.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[1], slots.data_ptr(), slots.stride(0),
            lens.data_ptr(), window or 0, scale, out.data_ptr(), b, h, k_cache.shape[0], d,
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """transformers' Llama-style RMSNorm of the rows of ``x`` [N, hid] -> new [N, hid] tensor. With
        ``residual`` [N, hid]: first ``residual += x`` in place (rounded to the dtype), then the norm of it.
        Unit column stride everywhere; ``weight`` [hid] contiguous, same dtype."""
        n, hid = x.shape
        out = x.new_empty(n, hid)
        res_ptr, res_stride = (0, 0) if residual is None else (residual.data_ptr(), residual.stride(0))
        self._elementwise["rms_norm", x.dtype](
            x.data_ptr(), x.stride(0), res_ptr, res_stride, weight.data_ptr(), out.data_ptr(), out.stride(0),
            n, hid, eps, torch.get_num_threads(),
        )  # fmt: skip
        return out

    def rotary(
        self, x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> None:
        """In place: the first ``heads`` heads of ``head_dim`` values of each row of ``x`` [N, >= heads *
        head_dim] get transformers' ``x * cos + rotate_half(x) * sin``; ``cos``/``sin`` [N, head_dim]."""
        self._elementwise["rotary", x.dtype](
            x.data_ptr(), x.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr(), cos.stride(0),
            x.shape[0], torch.get_num_threads(),
        )  # fmt: skip

    def silu_mul(self, gate_up: torch.Tensor, inter: int) -> torch.Tensor:
        """``silu(gate_up[:, :inter]) * gate_up[:, inter:]`` -> new [N, inter] tensor (rounded as torch)."""
        n = gate_up.shape[0]
        out = gate_up.new_empty(n, inter)
        self._elementwise["silu_mul", gate_up.dtype](
            gate_up.data_ptr(),
            gate_up.stride(0),
            out.data_ptr(),
            out.stride(0),
            n,
            inter,
            torch.get_num_threads(),
        )
        return out

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
    ) -> None:
        """``k_cache[:, slots] = key``, ``v_cache[:, slots] = value``: ``key``/``value`` [KVH, N, D] with equal
        strides and unit stride on D, caches [KVH, S, D] contiguous, ``slots`` [N] int64 (distinct, < S)."""
        kvh, n, d = key.shape
        self._elementwise["store_kv", key.dtype](
            key.data_ptr(), value.data_ptr(), key.stride(1), key.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
            k_cache.shape[1], slots.data_ptr(), n, kvh, d,
        )  # fmt: skip

    def int8_linear(self, x: torch.Tensor, qblocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """``x`` [M, K] bfloat16 (unit column stride) times an int8 weight in blocks of 16 output rows,
        ``qblocks`` [N/16, K, 16] contiguous, with ``scales`` [N] bfloat16 -> new [M, N] bfloat16:
        ``round(scale[n] * sum_k x[m, k] * q[n, k])`` with float32 products and sums."""
        m, k = x.shape
        n = qblocks.shape[0] * qblocks.shape[2]
        y = x.new_empty(m, n)
        scratch = self._scratch(m * k)
        self._int8_linear(
            x.data_ptr(), x.stride(0), m, k, qblocks.data_ptr(), scales.data_ptr(), n, y.data_ptr(), n,
            scratch.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return y

    def _scratch(self, numel: int) -> torch.Tensor:
        """This thread's float32 scratch of at least ``numel`` elements, kept between calls (an allocation
        costs ~1.5 us, and a decode step makes ~120 int8 calls on SmolLM2)."""
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.numel() < numel:
            buf = self._local.scratch = torch.empty(numel, dtype=torch.float32)
        return buf

    def int8_dequantize(self, qblocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The weight of ``int8_linear`` as new bfloat16 rows [N, K]: ``round(q[n, k] * scale[n])``."""
        blocks, k, width = qblocks.shape
        out = torch.empty(blocks * width, k, dtype=torch.bfloat16)
        self._int8_dequantize(
            qblocks.data_ptr(), scales.data_ptr(), blocks * width, k, out.data_ptr(), torch.get_num_threads()
        )
        return out

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """``x.argmax(-1)`` for ``x`` [N, V] (unit column stride): first maximum, or first NaN, per row."""
        n, v = x.shape
        out = torch.empty(n, dtype=torch.long)
        self._elementwise["argmax", x.dtype](
            x.data_ptr(), x.stride(0), n, v, out.data_ptr(), torch.get_num_threads()
        )
        return out


class BoundAdd:
    """One layer's ``CpuKernel.add`` for one token grouping: ``bound(y, x)`` with the table (``meta``), the
    token rows and the input width fixed, so a decode step pays one ctypes call and no lookups. Holds the
    tensors whose pointers it passes; the caller keeps the weights in ``meta`` alive (``keep``) and passes
    ``x`` [N, in_features] and ``y`` [N, >= out] of the bound dtype on the CPU, ``y`` with unit column stride.
    """

    __slots__ = ("_fn", "_args", "_tensors", "keep")

    def __init__(
        self,
        fn: Callable[..., None],
        meta: torch.Tensor,
        offsets: torch.Tensor,
        rows: torch.Tensor,
        in_features: int,
    ) -> None:
        self._fn = fn
        self._tensors = (meta, offsets, rows)
        self._args = (in_features, meta.shape[0], meta.data_ptr(), offsets.data_ptr(), rows.data_ptr())
        self.keep: object = None

    def __call__(self, y: torch.Tensor, x: torch.Tensor) -> None:
        if x.stride(1) != 1:
            x = x.contiguous()
        in_f, n, meta, offsets, rows = self._args
        self._fn(
            x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), in_f, n, meta, offsets, rows,
            torch.get_num_threads(),
        )  # fmt: skip


def kernel_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` [in, r] as a transposed view of a row-major [r, in] tensor, ``b`` [r, out] row-major; copies only
    what is not laid out so already (prepared adapters are; mixtures' concatenations may not be)."""
    if a.stride() != (1, a.shape[0]):
        a = a.t().contiguous().t()
    return a, b.contiguous()


def kernel_meta(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], positions: list[int], column: int = 0
) -> torch.Tensor:
    """[n, 6] int64 ``(A pointer, B pointer, rank, position, column, width)`` for pairs already in
    ``kernel_layout``, writing output columns ``[column, column + width)``; row ``i`` is ``pairs[i]``."""
    return torch.tensor(
        [
            [a.data_ptr(), b.data_ptr(), a.shape[1], p, column, b.shape[1]]
            for (a, b), p in zip(pairs, positions, strict=True)
        ],
        dtype=torch.long,
    )


def largest_first(meta: torch.Tensor) -> torch.Tensor:
    """``meta`` rows ordered by weight size, largest first: the kernel hands entries to threads in order,
    so the big ones start early and the threads finish together."""
    return meta.index_select(0, torch.argsort(meta[:, 2] * meta[:, 5], descending=True, stable=True))


@dataclass(frozen=True, eq=False)
class KernelTable:
    """The multi-LoRA kernel's work list: ``entries`` [n, 6] int64 rows ``(A pointer, B pointer, rank,
    position, column, width)`` (``kernel_meta``) and ``keep``, the weights those pointers point into, held
    alive as long as the table. Compared by identity: a cached table stands for its weights."""

    entries: torch.Tensor
    keep: tuple = ()

    @classmethod
    def of(cls, pairs: list[tuple[torch.Tensor, torch.Tensor]], positions: list[int]) -> KernelTable:
        """Entries for ``pairs`` (``A`` [in, r], ``B`` [r, out]) of the plan positions ``positions``, output
        from column 0; weights re-laid out (``kernel_layout``) where needed, in their given order."""
        laid_out = [kernel_layout(a, b) for a, b in pairs]
        return cls(kernel_meta(laid_out, positions), tuple(laid_out))

    def __len__(self) -> int:
        return self.entries.shape[0]

    def largest_first(self) -> KernelTable:
        return KernelTable(largest_first(self.entries), self.keep)

    def select(self, indices: list[int]) -> KernelTable:
        """The entries at ``indices`` (rows of this table), in that order."""
        return KernelTable(self.entries.index_select(0, torch.tensor(indices, dtype=torch.long)), self.keep)

    def at_column(self, column: int) -> KernelTable:
        """The same entries writing output columns from ``column`` (a projection's slice of a fused output)."""
        entries = self.entries.clone()
        entries[:, 4] = column
        return KernelTable(entries, self.keep)

    @classmethod
    def cat(cls, tables: list[KernelTable]) -> KernelTable:
        """All entries of ``tables`` in one call's table, largest first."""
        entries = torch.cat([t.entries for t in tables])
        return cls(largest_first(entries), tuple(t.keep for t in tables))


_lock = threading.Lock()
_loaded: dict[bool, CpuKernel | None] = {}
_warned = False


def get(*, generic: bool = False) -> CpuKernel | None:
    """The kernel for this machine (built and cached on first call), or None where it cannot be used."""
    if generic in _loaded:  # entries are only ever added
        return _loaded[generic]
    with _lock:
        if generic not in _loaded:
            _loaded[generic] = _load(generic)
        return _loaded[generic]


def one_openmp_thread() -> None:
    """Make the calling (helper) thread run PyTorch's CPU ops on one OpenMP thread.

    Any thread that runs a parallel op gets an OpenMP team of its own. With GNU OpenMP, once more OpenMP
    threads exist than CPUs, every worker stops spinning between parallel regions and sleeps, so each
    later op of the compute thread pays a wake-up: measured here, the engine with 16 adapters fell from
    470 to 290 tok/s (2 threads) after the adapter-loader thread had run a few copies. ``omp_set_num_threads``
    is per thread, so the compute thread keeps its threads. A no-op where the OpenMP runtime is not GNU's."""
    torch.get_num_threads()  # ATen initialises this thread's OpenMP settings first, then we narrow them
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(1)


def _load(generic: bool) -> CpuKernel | None:
    global _warned
    try:
        path, flags = build(generic=generic)
        lib = ctypes.CDLL(str(path))
        version = lib.blora_lora_abi_version()
        if version != ABI_VERSION:
            raise RuntimeError(f"{path} reports ABI {version}, expected {ABI_VERSION}")
        return CpuKernel(lib, path, flags)
    except Exception as exc:  # any failure means: use the PyTorch ops
        if not _warned:
            _warned = True
            logger.warning(
                "blora: the CPU kernels (multi-LoRA, decode attention) are not available (%s); using PyTorch "
                "ops instead (same results, slower decode). Install a C++ compiler (g++) to enable it, or pass "
                "cpu_kernel=False to the engine to choose the PyTorch ops.",
                exc,
            )
        return None


def _compiler() -> str:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    raise RuntimeError("no C++ compiler found (tried $CXX, c++, g++, clang++)")


def _cpu_fingerprint() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(*, generic: bool = False, cache: Path | None = None) -> tuple[Path, list[str]]:
    """Compile the kernel (or reuse the cached build); returns (library path, flags used).
    ``generic`` forces the portable code path (tests check it against the reference)."""
    if sys.platform == "win32":
        raise RuntimeError("the CPU kernel is built for Linux/macOS only")
    from blora.models.loader import cache_root

    cache = cache or cache_root() / "kernels"
    cache.mkdir(parents=True, exist_ok=True)
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    source = SOURCE.read_bytes()
    errors = []
    for flags in _FLAG_SETS:
        flags = [*flags, *(["-DBLORA_GENERIC"] if generic else [])]
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_fingerprint().encode()])
        ).hexdigest()[:16]
        target = cache / f"cpu_kernels-{key}.so"
        if target.is_file():
            return target, flags
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cmd = [compiler, *flags, *_BASE_FLAGS, "-o", tmp, str(SOURCE)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            os.replace(tmp, target)  # atomic: a concurrent builder never sees a partial file
            return target, flags
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd)}: {proc.stderr.strip()[-300:]}")
    raise RuntimeError("compiling the kernel failed: " + " | ".join(errors))
