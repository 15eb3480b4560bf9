"""The fast batched-LoRA ops and the LoraLinear wrapper against the plain reference; scoped per-forward state."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from blora import kernels
from blora.lora import ops
from blora.lora.backends.torch_ops import OP_COST, choose_method, op_cost
from blora.lora.context import current_batch, lora_batch
from blora.lora.layers import LoraLinear
from blora.lora.plan import LayerLoras, LoraPlan, OutputSlice

pytestmark = pytest.mark.usefixtures("one_thread")

IN, OUT = 24, 40
# Largest error allowed, relative to the largest |value| of the fp32 reference.
REL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def make_weights(
    ranks: dict[int, int], dtype=torch.float32, seed=0, in_f=IN, out_f=OUT
) -> dict[int, ops.Pair]:
    """slot -> (A [in, r], B [r, out]) with the given ranks."""
    g = torch.Generator().manual_seed(seed)
    return {
        s: (torch.randn(in_f, r, generator=g).to(dtype), torch.randn(r, out_f, generator=g).to(dtype))
        for s, r in ranks.items()
    }


def slots_tensor(spec: list[tuple[int, int]], seed=0) -> torch.Tensor:
    """``[(slot, count), ...]`` -> shuffled per-token slots, so segments are interleaved."""
    flat = torch.tensor([s for s, n in spec for _ in range(n)], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return flat[torch.randperm(flat.numel(), generator=g)]


def assert_close_rel(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    err = ((got.float() - expected).abs().max() / expected.abs().max()).item()
    assert err < REL[dtype], f"max error {err:.2e} relative to the largest value ({dtype})"


def reference_out(y0, x, slots, weights):
    """fp32 reference of ``y0 + delta`` (weights upcast, so bf16 is compared against exact math)."""
    w32 = {s: (a.float(), b.float()) for s, (a, b) in weights.items()}
    return y0.float() + ops.lora_reference(x.float(), slots, w32)


# name -> (ranks of all loaded slots, [(slot, token count), ...]); slot -1 = base model tokens.
CASES = {
    "mixed_ranks_with_base_tokens": ({0: 1, 1: 4, 2: 4, 3: 16}, [(-1, 5), (0, 3), (1, 7), (2, 1), (3, 4)]),
    "loaded_adapters_absent_from_batch": ({0: 2, 1: 8, 2: 3, 3: 8, 4: 5}, [(1, 4), (3, 6), (-1, 2)]),
    "one_adapter_some_base": ({0: 8, 1: 2}, [(1, 9), (-1, 3)]),
    "one_adapter_all_tokens": ({0: 8, 1: 2}, [(0, 11)]),
    "many_tokens_per_adapter": ({0: 4, 1: 16, 2: 4, 3: 32}, [(0, 300), (1, 200), (3, 250), (-1, 50)]),
    "single_token_per_adapter": ({i: (4, 8, 16)[i % 3] for i in range(12)}, [(i, 1) for i in range(12)]),
    "all_base": ({0: 4}, [(-1, 6)]),
}


def _run_op(method: str, y, x, groups: LoraPlan, weights) -> None:
    pairs = [weights[s] for s in groups.active]
    if method == "segments":
        ops.add_segments(y, x, groups, pairs)
    elif method == "grouped":
        ops.add_grouped(y, x, groups, ops.build_rank_groups(list(range(len(pairs))), pairs, merge_below=0))
    elif method == "grouped_padded":  # all ranks zero-padded into one bmm pair
        ops.add_grouped(
            y, x, groups, ops.build_rank_groups(list(range(len(pairs))), pairs, merge_below=10**12)
        )
    elif method == "stacked":
        ops.add_stacked(y, x, groups, ops.build_stacked(groups.active, pairs))
    elif method in ("kernel", "kernel_generic"):
        kernel = _kernel(generic=method == "kernel_generic")
        laid_out = [kernels.kernel_layout(a, b) for a, b in pairs]
        kernel.add(y, x, kernels.kernel_meta(laid_out, list(range(len(pairs)))), *groups.flat())
    else:
        raise AssertionError(method)


def _kernel(generic: bool = False) -> kernels.CpuKernel:
    """The CPU kernel; a build failure fails the test (skipped only on a machine without a C++ compiler)."""
    try:
        kernels._compiler()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    path, flags = kernels.build(generic=generic)
    kernel = kernels.get(generic=generic)
    assert kernel is not None and kernel.path == path, "the kernel built but did not load"
    return kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "method", ["segments", "grouped", "grouped_padded", "stacked", "kernel", "kernel_generic"]
)
@pytest.mark.parametrize("case", list(CASES))
def test_fast_op_matches_reference(case, method, dtype):
    ranks, spec = CASES[case]
    weights = make_weights(ranks, dtype)
    slots = slots_tensor(spec)
    x = torch.randn(slots.numel(), IN).to(dtype)
    y0 = torch.randn(slots.numel(), OUT).to(dtype)
    groups = LoraPlan.from_tensor(slots)
    if not groups.active:  # nothing to add: the layer skips the ops; the reference adds zero
        assert torch.equal(reference_out(y0, x, slots, weights), y0.float())
        return
    y = y0.clone()
    _run_op(method, y, x, groups, weights)
    expected = reference_out(y0, x, slots, weights)
    assert_close_rel(y, expected, dtype)
    base = slots < 0
    assert torch.equal(y[base], y0[base]), "base tokens must keep exactly the base output"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("generic", [False, True], ids=["native", "generic"])
@pytest.mark.parametrize("in_f,out_f", [(64, 48), (5, 3), (33, 1000)])
def test_kernel_layer_sizes_and_row_strides(dtype, in_f, out_f, generic):
    """Vector tails (sizes not multiples of 16), one-vector rows, wide outputs; ``x``/``y`` rows with a stride
    (views into wider buffers) and a mixture-style A that is not in the kernel's layout yet."""
    kernel = _kernel(generic)
    weights = make_weights({0: 3, 1: 17, 2: 64}, dtype, seed=4, in_f=in_f, out_f=out_f)
    slots = slots_tensor([(0, 5), (1, 2), (2, 9), (-1, 3)], seed=5)
    n = slots.numel()
    x = torch.randn(n, in_f + 7).to(dtype)[:, 3 : 3 + in_f]  # row stride in_f + 7
    y_buf = torch.randn(n, out_f + 5).to(dtype)
    y = y_buf[:, :out_f]
    y0, rest = y.clone(), y_buf[:, out_f:].clone()
    groups = LoraPlan.from_tensor(slots)
    laid_out = [kernels.kernel_layout(a, b) for a, b in (weights[s] for s in groups.active)]
    assert laid_out[0][0].stride() == (1, in_f) and torch.equal(laid_out[0][0], weights[0][0])
    kernel.add(y, x, kernels.kernel_meta(laid_out, [0, 1, 2]), *groups.flat())
    assert_close_rel(y, reference_out(y0, x, slots, weights), dtype)
    assert torch.equal(y[slots < 0], y0[slots < 0])
    assert torch.equal(y_buf[:, out_f:], rest), "the kernel wrote outside the rows' columns"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("generic", [False, True], ids=["native", "generic"])
@pytest.mark.parametrize("in_f,out_f", [(33, 1000), (200, 70), (2048, 130)])
def test_kernel_many_tokens_per_adapter_each_element(dtype, in_f, out_f, generic):
    """Adapters with prefill-sized token counts (in the kernel's tiled path: blocks of 4 tokens plus
    tails, column tiles of 64 plus a tail) next to decode-sized ones, ranks 8/16/64 and an odd 17, inputs
    whose width is not a multiple of 16 or 32. Checked element by element: the only error allowed is the
    final rounding of ``y`` (bfloat16: half an ulp), so a dropped product or a row added twice fails."""
    weights = make_weights({0: 8, 1: 16, 2: 64, 3: 17, 4: 8}, dtype, seed=7, in_f=in_f, out_f=out_f)
    slots = slots_tensor([(0, 40), (1, 13), (2, 8), (3, 9), (4, 3), (-1, 5)], seed=8)
    x = (torch.randn(slots.numel(), in_f) / in_f**0.5).to(dtype)
    y = torch.randn(slots.numel(), out_f).to(dtype)
    expected = reference_out(y.clone(), x, slots, weights)
    _run_op("kernel_generic" if generic else "kernel", y, x, LoraPlan.from_tensor(slots), weights)
    scale = expected.abs().max().item()
    rtol = 2.0**-8 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.float(), expected, rtol=rtol, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_add_single_matches_reference(dtype):
    weights = make_weights({3: 6}, dtype)
    x = torch.randn(17, IN).to(dtype)
    y0 = torch.randn(17, OUT).to(dtype)
    y = y0.clone()
    ops.add_single(y, x, weights[3])
    slots = torch.full((17,), 3)
    assert_close_rel(y, reference_out(y0, x, slots, weights), dtype)


def test_reference_semantics_by_hand():
    """The reference itself: one token per slot, computed by hand."""
    weights = make_weights({0: 2, 5: 3})
    x = torch.randn(3, IN)
    slots = torch.tensor([5, -1, 0])
    delta = ops.lora_reference(x, slots, weights)
    torch.testing.assert_close(delta[0], x[0] @ weights[5][0] @ weights[5][1])
    assert torch.equal(delta[1], torch.zeros(OUT))
    torch.testing.assert_close(delta[2], x[2] @ weights[0][0] @ weights[0][1])


def test_token_groups_build():
    groups = LoraPlan.from_tensor(torch.tensor([2, -1, 0, 2, 2, -1]))
    assert groups.active == (0, 2)
    assert [i.tolist() for i in groups.index] == [[2], [0, 3, 4]]
    assert groups.counts == (1, 3)
    assert not groups.full
    assert LoraPlan.from_tensor(torch.tensor([4, 4, 4])).full
    assert not LoraPlan.from_tensor(torch.tensor([4, -1, 4])).full
    pos, valid = groups.padded((0, 1), torch.float32)
    assert pos.shape == (2, 3) and valid.shape == (2, 3, 1)
    assert valid[:, :, 0].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert pos.tolist() == [[2, 2, 2], [0, 3, 4]]  # pads repeat the adapter's first token (masked out)
    pos, valid = groups.padded((1,), torch.float32)
    assert pos.tolist() == [[0, 3, 4]] and valid is None  # no padding needed: no mask


# ---------------------------------------------------------------------------------------------- choose_method


def _plan(ranks: list[int], counts: list[int], width_in=512, width_out=512) -> tuple[LoraPlan, LayerLoras]:
    weights = make_weights(dict(enumerate(ranks)), in_f=4, out_f=4)  # only shapes matter for the cost model
    plan = LoraPlan.from_tensor(slots_tensor(list(enumerate(counts))))
    pairs = [weights[s] for s in plan.active]
    loras = LayerLoras(plan.active, tuple(range(len(plan.active))), pairs, width_in, width_out)
    assert op_cost("cpu", torch.float32) == OP_COST["cpu"]
    return plan, loras


@pytest.mark.parametrize(
    "ranks, counts, expected",
    [
        # decode, few adapters: two GEMMs beat a loop over adapters
        ([8, 8], [2, 2], "stacked"),
        ([8, 16, 8], [1, 1, 1], "stacked"),
        # decode, many adapters of a few ranks, one token each: bmm per rank, no loop over 64 adapters
        ([8] * 64, [1] * 64, "grouped"),
        ([8, 16] * 32, [1] * 64, "grouped"),
        # prefill: long segments of different sizes and ranks; stacked would waste U x the shrink
        ([8, 16, 32, 64], [3000, 32, 32, 32], "segments"),
        ([16, 16, 16, 16], [3000, 500, 100, 400], "segments"),
    ],
)
def test_choose_method_picks_each_path(ranks, counts, expected):
    plan, loras = _plan(ranks, counts)
    assert choose_method(plan, loras) == expected


# ------------------------------------------------------------------------------------------- LoraLinear wrapper


def _wrapped(kind: str, ranks: dict[int, int], dtype=torch.float32) -> tuple[LoraLinear, dict[int, ops.Pair]]:
    torch.manual_seed(1)
    base = nn.Linear(IN, OUT, bias=True) if kind == "linear" else Conv1D(OUT, IN)
    if kind == "conv1d":
        nn.init.normal_(base.bias)
    base = base.to(dtype)
    layer = LoraLinear(base)
    weights = make_weights(ranks, dtype, seed=2)
    for slot, (a, b) in weights.items():
        layer.set_lora(slot, a, b)
    return layer, weights


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("method", ["segments", "grouped", "stacked"])
def test_wrapper_forced_method_matches_reference(kind, method, monkeypatch):
    calls = []

    def forced(*args, **kwargs):
        calls.append(method)
        return method

    monkeypatch.setattr("blora.lora.backends.torch_ops.choose_method", forced)
    # slot 7 is in the batch but this layer has no weights for it (adapter not targeting the module).
    layer, weights = _wrapped(kind, {0: 2, 1: 8, 2: 8, 3: 5})
    spec = [(-1, 4), (0, 3), (1, 5), (3, 2), (7, 3)]
    slots = slots_tensor(spec, seed=3)
    x = torch.randn(slots.numel(), IN)
    with torch.no_grad():
        base_out = layer.base(x)
        with lora_batch(slots, backend="torch"):  # the PyTorch ops (the CPU kernel bypasses choose_method)
            y = layer(x)
    routed = torch.where(torch.isin(slots, torch.tensor(list(weights))), slots, -1)
    expected = base_out + ops.lora_reference(x, routed, weights)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    unchanged = routed < 0
    assert torch.equal(y[unchanged], base_out[unchanged])
    assert calls, "choose_method was not consulted"


@pytest.mark.parametrize("method", ["segments", "grouped", "stacked"])
def test_wrapper_per_row_3d_input(method, monkeypatch):
    """[B, T, in] input with one slot per row (what ``generate`` passes); bf16 weights and activations."""
    monkeypatch.setattr("blora.lora.backends.torch_ops.choose_method", lambda *a, **k: method)
    layer, weights = _wrapped("linear", {0: 4, 1: 16, 2: 1}, torch.bfloat16)
    row_slots = torch.tensor([1, -1, 0, 1, 2])
    x = torch.randn(5, 6, IN).to(torch.bfloat16)
    with torch.no_grad():
        base_out = layer.base(x)
        with lora_batch(row_slots, per_row=True, backend="torch"):
            y = layer(x)
    token_slots = row_slots.repeat_interleave(6)
    expected = reference_out(base_out.reshape(-1, OUT), x.reshape(-1, IN), token_slots, weights).reshape(
        5, 6, OUT
    )
    assert y.shape == (5, 6, OUT) and y.dtype == torch.bfloat16
    assert_close_rel(y, expected, torch.bfloat16)
    assert torch.equal(y[1], base_out[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wrapper_kernel_with_gemm_for_large_segments(dtype, monkeypatch):
    """CPU kernel on: decode-sized adapters go to the kernel, a prefill-sized one (tokens x rank over
    ``MAX_WORK``) to GEMMs, in the same forward; both must be used and the sum must match the reference."""
    _kernel()
    calls = {"kernel": 0, "segments": 0}
    real_add, real_segments = kernels.CpuKernel.add, ops.add_segments

    def count_add(self, *args):
        calls["kernel"] += 1
        return real_add(self, *args)

    def count_segments(*args):
        calls["segments"] += 1
        return real_segments(*args)

    monkeypatch.setattr(kernels.CpuKernel, "add", count_add)
    monkeypatch.setattr(ops, "add_segments", count_segments)
    layer, weights = _wrapped("linear", {0: 4, 1: 64, 2: 2}, dtype)
    big = kernels.MAX_WORK // 64 + 5  # adapter 1's tokens x rank exceed MAX_WORK
    slots = slots_tensor([(0, 3), (1, big), (2, 1), (-1, 4)], seed=6)
    x = torch.randn(slots.numel(), IN).to(dtype)
    with torch.no_grad():
        base_out = layer.base(x)
        with lora_batch(slots, backend="cpu"):
            y = layer(x)
    assert calls == {"kernel": 1, "segments": 1}
    assert_close_rel(y, reference_out(base_out, x, slots, weights), dtype)
    assert torch.equal(y[slots < 0], base_out[slots < 0])


def test_kernel_unbuildable_falls_back(monkeypatch, tmp_path, caplog):
    # no compiler: one clear warning, then the PyTorch ops give the same result
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setattr(kernels, "_warned", False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    with caplog.at_level("WARNING", logger="blora"):
        assert kernels.get() is None
    assert "no C++ compiler found" in caplog.text and "cpu_kernel=False" in caplog.text
    from blora.lora import backends

    assert backends.select("auto", backends.BackendOptions(torch.device("cpu"))).name == "torch"
    with pytest.raises(backends.BackendUnavailableError, match="could not be built"):
        backends.create("cpu", backends.BackendOptions(torch.device("cpu")))
    layer, weights = _wrapped("linear", {0: 4, 1: 8})
    slots = torch.tensor([0, 1, -1, 1])
    x = torch.randn(4, IN)
    with (
        torch.no_grad(),
        lora_batch(slots, backend=backends.select("auto", backends.BackendOptions(x.device))),
    ):
        y = layer(x)
    torch.testing.assert_close(y, reference_out(layer.base(x), x, slots, weights), rtol=1e-5, atol=1e-5)


def test_wrapper_single_adapter_and_base_paths():
    layer, weights = _wrapped("linear", {0: 3, 1: 6})
    x = torch.randn(9, IN)
    with torch.no_grad():
        base_out = layer.base(x)
        with lora_batch(torch.full((9,), 1)):  # every token one adapter: add_single
            y = layer(x)
        torch.testing.assert_close(y, base_out + x @ weights[1][0] @ weights[1][1], rtol=1e-5, atol=1e-5)
        for slots in (
            None,
            torch.full((9,), -1),
            torch.full((9,), 5),
        ):  # no batch / all base / no weights here
            with lora_batch(slots):
                assert torch.equal(layer(x), base_out)
        assert torch.equal(layer(x), base_out)  # outside any lora_batch


def test_wrapper_reset_and_replace_slot():
    layer, weights = _wrapped("linear", {0: 3, 1: 6})
    x = torch.randn(4, IN)
    slots = torch.tensor([0, 1, 0, 1])
    with torch.no_grad(), lora_batch(slots):
        before = layer(x)
        layer.reset_lora(0)
        after_reset = layer(x)
        new = make_weights({0: 5}, seed=9)[0]
        layer.set_lora(0, *new)
        after_set = layer(x)
        base_out = layer.base(x)
    assert torch.equal(after_reset[[0, 2]], base_out[[0, 2]])
    torch.testing.assert_close(after_reset[[1, 3]], before[[1, 3]])
    torch.testing.assert_close(
        after_set[[0, 2]], base_out[[0, 2]] + x[[0, 2]] @ new[0] @ new[1], rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------------------- scoped per-call state


def test_state_is_scoped_to_the_with_block():
    assert current_batch() is None
    with lora_batch(torch.tensor([0, 1])) as outer:
        assert current_batch() is outer
        with lora_batch(torch.tensor([2])) as inner:
            assert current_batch() is inner
        assert current_batch() is outer
        with lora_batch(None):
            assert current_batch() is None
        assert current_batch() is outer
    assert current_batch() is None


def test_state_is_reset_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"), lora_batch(torch.tensor([0])):
        raise RuntimeError("boom")
    assert current_batch() is None


def test_state_is_invisible_to_other_threads():
    layer, _ = _wrapped("linear", {0: 4})
    x = torch.randn(3, IN)
    with torch.no_grad():
        base_out = layer.base(x)
    seen: dict[str, object] = {}
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        entered.wait(timeout=30)
        seen["batch"] = current_batch()
        with torch.no_grad():
            seen["out"] = layer(x)
        with lora_batch(torch.tensor([0, 0, 0])) as mine:  # its own state does not reach the main thread
            seen["own"] = current_batch() is mine
            release.set()
            entered.wait(timeout=30)

    thread = threading.Thread(target=other)
    thread.start()
    with lora_batch(torch.tensor([0, 0, 0])) as active:
        entered.set()
        assert release.wait(timeout=30)
        assert current_batch() is active
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert seen["batch"] is None
    assert torch.equal(seen["out"], base_out), "a layer in another thread saw this thread's adapter slots"
    assert seen["own"] is True
    assert current_batch() is None


def test_per_row_slot_count_mismatch_is_an_error():
    layer, _ = _wrapped("linear", {0: 4})
    with lora_batch(torch.tensor([0, 0, 0]), per_row=True), pytest.raises(ValueError, match="per-row slots"):
        layer(torch.randn(2, 5, IN))
    with lora_batch(torch.tensor([0, 0]), per_row=False), pytest.raises(ValueError, match="per-token slots"):
        layer(torch.randn(3, IN))


# ------------------------------------------------------------------------------ LoraPlan and the backends


def test_plan_tensors_are_one_buffer_and_match_the_groups():
    plan = LoraPlan.build([3, -1, 0, 3, 3, -1, 7])
    assert plan.active == (0, 3, 7) and plan.counts == (1, 3, 1) and plan.num_tokens == 7
    assert plan.slots.tolist() == [3, -1, 0, 3, 3, -1, 7]
    assert plan.rows.tolist() == [2, 0, 3, 4, 6]
    assert plan.offsets.tolist() == [0, 1, 4, 5]
    assert plan.starts.tolist() == [0, 1, 4] and plan.lengths.tolist() == [1, 3, 1]
    assert plan.slot_ids.tolist() == [0, 3, 7]
    assert [i.tolist() for i in plan.index] == [[2], [0, 3, 4], [6]]
    storage = plan.slots.untyped_storage().data_ptr()
    for t in (plan.rows, plan.offsets, plan.slot_ids, *plan.index):
        assert t.untyped_storage().data_ptr() == storage, "the plan's tensors must share one transfer"
    assert plan.key != LoraPlan.build([0]).key
    empty = LoraPlan.build([-1, -1])
    assert not empty.any_adapter and empty.max_count == 0 and empty.rows.numel() == 0


BACKENDS = ["reference", "torch", "cpu"]


def _backend(name: str):
    from blora.lora import backends

    if name == "cpu":
        _kernel()
    return backends.create(name, backends.BackendOptions(torch.device("cpu")))


def _layer_loras(plan: LoraPlan, weights: dict[int, ops.Pair]) -> LayerLoras:
    pos = tuple(i for i, s in enumerate(plan.active) if s in weights)
    return LayerLoras(
        tuple(plan.active[i] for i in pos), pos, [weights[plan.active[i]] for i in pos], IN, OUT
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", [c for c in CASES if c != "all_base"])
def test_backend_add_and_shrink_expand_match_reference(case, name, dtype):
    """Every backend's ``add`` and ``expand(shrink(x))`` against the per-token reference; slot 99 is in
    the plan but has no weights in the layer (left untouched)."""
    ranks, spec = CASES[case]
    weights = make_weights(ranks, dtype)
    slots = slots_tensor([*spec, (99, 2)])
    plan = LoraPlan.from_tensor(slots)
    loras = _layer_loras(plan, weights)
    backend = _backend(name)
    x = torch.randn(slots.numel(), IN).to(dtype)
    y0 = torch.randn(slots.numel(), OUT).to(dtype)
    routed = torch.where(torch.isin(slots, torch.tensor(list(weights))), slots, -1)
    expected = reference_out(y0, x, routed, weights)
    y = y0.clone()
    backend.add(y, x, plan, loras)
    assert_close_rel(y, expected, dtype)
    assert torch.equal(y[routed < 0], y0[routed < 0])
    h = backend.shrink(x, plan, loras)
    assert h.shape == (slots.numel(), max(ranks[s] for s in loras.slots))
    y = y0.clone()
    backend.expand(y, h, plan, loras)
    assert_close_rel(y, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(
    "spec", [[(0, 1), (1, 1), (2, 2), (-1, 1)], [(0, 40), (1, 300), (-1, 3)]], ids=["decode", "prefill"]
)
def test_backend_add_fused_writes_each_slice(spec, name, dtype):
    """A fused output [N, OUT + 2 + OUT]: two projections' LoRA in their column slices, the gap untouched."""
    plan = LoraPlan.from_tensor(slots_tensor(spec))
    first, second = (
        make_weights({0: 4, 1: 64, 2: 8}, dtype, seed=1),
        make_weights({0: 2, 2: 16}, dtype, seed=2),
    )
    slices = [
        OutputSlice(_layer_loras(plan, first), 0, OUT),
        OutputSlice(_layer_loras(plan, second), OUT + 2, 2 * OUT + 2),
    ]
    x = torch.randn(plan.num_tokens, IN).to(dtype)
    y0 = torch.randn(plan.num_tokens, 2 * OUT + 2).to(dtype)
    y = y0.clone()
    _backend(name).add_fused(y, x, plan, slices)
    for weights, (lo, hi) in ((first, (0, OUT)), (second, (OUT + 2, 2 * OUT + 2))):
        routed = torch.where(torch.isin(plan.slots, torch.tensor(list(weights))), plan.slots, -1)
        assert_close_rel(y[:, lo:hi], reference_out(y0[:, lo:hi], x, routed, weights), dtype)
    assert torch.equal(y[:, OUT : OUT + 2], y0[:, OUT : OUT + 2])


def test_backend_registry_names_and_auto_choice():
    from blora.lora import backends

    assert {"reference", "torch", "cpu"} <= set(backends.names())
    with pytest.raises(ValueError, match="unknown LoRA backend 'nope'"):
        backends.create("nope", backends.BackendOptions(torch.device("cpu")))
    off = backends.select("auto", backends.BackendOptions(torch.device("cpu"), cpu_kernel=False))
    assert off.name == "torch"
    with pytest.raises(backends.BackendUnavailableError, match="turned off"):
        backends.create("cpu", backends.BackendOptions(torch.device("cpu"), cpu_kernel=False))
    backends.register("test-only", lambda options: backends.ReferenceBackend())
    try:
        layer, weights = _wrapped("linear", {0: 4})
        x = torch.randn(3, IN)
        with torch.no_grad(), lora_batch(torch.tensor([0, -1, 0]), backend="test-only") as batch:
            assert batch.backend.name == "reference"
            y = layer(x)
        torch.testing.assert_close(y, reference_out(layer.base(x), x, torch.tensor([0, -1, 0]), weights))
    finally:
        backends._FACTORIES.pop("test-only")
