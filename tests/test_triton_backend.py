"""The Triton LoRA backend under Triton's CPU interpreter (see ``tests/triton_interp.py``): the protocol's
methods against ``ReferenceBackend`` on decode and prefill plans, and the engine end to end with the
backend forced, greedy outputs equal to PEFT's."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.triton_interp import IN_CHILD, run_checks

if IN_CHILD:
    from peft import PeftModel

    from blora.engine.llm import build_engine
    from blora.engine.sampling_params import SamplingParams
    from blora.lora import backends
    from blora.lora.backends.base import ReferenceBackend
    from blora.lora.plan import LayerLoras, LoraPlan, OutputSlice
    from tests.helpers import make_adapter, tiny_model, tokenizer


def test_triton_backend_under_interpreter():
    run_checks(__file__, timeout=600)


def test_unavailable_without_cuda_or_interpreter():
    if IN_CHILD or torch.cuda.is_available():
        pytest.skip("only meaningful on a CPU process without the interpreter")
    from blora.lora import backends as registry

    with pytest.raises(registry.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        registry.create("triton", registry.BackendOptions(torch.device("cpu")))
    assert registry.select("auto", registry.BackendOptions(torch.device("cpu"))).name != "triton"


def _loras(slots, ranks, in_f, out_f, dtype, seed) -> LayerLoras:
    g = torch.Generator().manual_seed(seed)
    pairs = [
        (
            (torch.randn(r, in_f, generator=g) / in_f**0.5).to(dtype).t(),
            torch.randn(r, out_f, generator=g).to(dtype),
        )
        for r in ranks
    ]
    return LayerLoras(slots=tuple(slots), positions=(), pairs=pairs, in_features=in_f, out_features=out_f)


def _with_positions(loras: LayerLoras, plan: LoraPlan) -> LayerLoras:
    keep = [i for i, s in enumerate(loras.slots) if s in plan.active]
    return LayerLoras(
        slots=tuple(loras.slots[i] for i in keep),
        positions=tuple(plan.active.index(loras.slots[i]) for i in keep),
        pairs=[loras.pairs[i] for i in keep],
        in_features=loras.in_features,
        out_features=loras.out_features,
    )


PLANS = {
    "decode": [0, 3, -1, 5, 3, 0, 7],  # slot 7 is active but has no weights in the layer
    "prefill": [3] * 18 + [-1] * 2 + [5] * 9 + [0] * 3,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(PLANS))
def check_backend_matches_reference(kind, dtype):
    triton_backend = backends.create("triton", backends.BackendOptions(torch.device("cpu")))
    ref = ReferenceBackend()
    plan = LoraPlan.build(PLANS[kind])
    n, in_f = plan.num_tokens, 40
    q = _with_positions(_loras([0, 3, 5], [4, 16, 33], in_f, 24, dtype, 1), plan)
    v = _with_positions(_loras([3, 5], [2, 8], in_f, 16, dtype, 2), plan)
    x = torch.randn(n, in_f, dtype=dtype)
    y0 = torch.randn(n, 24 + 16 + 8, dtype=dtype)  # q | v | a column block no slice writes
    got, want = y0.clone(), y0.clone()
    fused = [OutputSlice(q, 0, 24), OutputSlice(v, 24, 40)]
    triton_backend.add_fused(got, x, plan, fused)
    ref.add_fused(want, x, plan, fused)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 4)
    assert torch.equal(got[:, 40:], y0[:, 40:]) and not torch.equal(got[:, :40], y0[:, :40])
    # add into a column slice, and shrink / expand on their own
    got, want = y0.clone(), y0.clone()
    triton_backend.add(got[:, 24:40], x, plan, v)
    ref.add(want[:, 24:40], x, plan, v)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 4)
    h = triton_backend.shrink(x, plan, q)
    torch.testing.assert_close(h.float(), ref.shrink(x, plan, q).float(), rtol=tol, atol=tol * 4)
    got, want = y0[:, :24].clone(), y0[:, :24].clone()
    triton_backend.expand(got, h, plan, q)
    ref.expand(want, h, plan, q)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * 4)


# (rank, alpha, targets) of the engine test's adapters
ADAPTERS = [
    (4, 8, ["q_proj", "v_proj"]),
    (16, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (1, 2, ["up_proj"]),
]


def check_engine_greedy_equals_peft(tmp_path):
    torch.manual_seed(0)
    base = tiny_model("llama")
    dirs = {
        f"a{i}": make_adapter(base, tmp_path / f"a{i}", seed=i, r=r, lora_alpha=alpha, target_modules=t)
        for i, (r, alpha, t) in enumerate(ADAPTERS)
    }
    gen = torch.Generator().manual_seed(7)
    requests = [(n, a) for n, a in [(9, "a0"), (3, "a1"), (14, None), (6, "a2"), (5, "a0")]]
    prompts = [torch.randint(3, len(tokenizer()), (n,), generator=gen).tolist() for n, _ in requests]
    engine = build_engine(
        tiny_model("llama"), tokenizer=tokenizer(), block_size=4, max_loras=4, lora_backend="triton"
    )
    backend = engine.runner.backend
    assert backend.name == "triton"
    launches = []
    add_lora = backend._k.add_lora
    backend._k = type(
        "Spy", (), {"add_lora": staticmethod(lambda *a, **k: launches.append(1) or add_lora(*a, **k))}
    )
    for name, path in dirs.items():
        engine.register_adapter(name, path)
    for i, (prompt, (_, adapter)) in enumerate(zip(prompts, requests, strict=True)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=4, temperature=0.0), adapter)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    for i, (prompt, (_, adapter)) in enumerate(zip(prompts, requests, strict=True)):
        model = (
            base if adapter is None else PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[adapter]))
        )
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=0
            )
        assert done[str(i)] == out[0, len(prompt) :].tolist(), (i, adapter)
    assert len(launches) > 20  # the LoRA math really went through the kernels
