"""Every SamplingParams field changes what is generated, the way it should (each test fails if the field
is ignored). Distribution tests run the vectorized sampler on crafted logits; the rest run the engine on a
tiny random Llama."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from blora.engine import LLM, SamplingParams
from blora.engine import sampler as sampler_module
from blora.engine.sampler import Sampler, apply_penalties, inverse_cdf, sample_filtered
from tests.helpers import tiny_model, tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

DRAWS = 4000


def fake_seq(params: SamplingParams, prompt=(3,), output=(), generator=None):
    return SimpleNamespace(
        params=params,
        generator=generator,
        token_ids=list(prompt) + list(output),
        output_token_ids=list(output),
        request=SimpleNamespace(prompt_token_ids=list(prompt)),
    )


def sample(logits: list[float], params: SamplingParams, n: int = DRAWS, **seq_kw) -> torch.Tensor:
    """Token frequencies [V] of ``n`` independent rows with the same logits and params."""
    rows = torch.tensor([logits] * n)
    tokens = [
        r.token_id for r in Sampler(torch.device("cpu"), seed=1)(rows, [fake_seq(params, **seq_kw)] * n)
    ]
    return torch.bincount(torch.tensor(tokens), minlength=len(logits)).float() / n


def test_temperature_scales_the_distribution():
    logits = [2.0, 1.0, 0.0, -1.0]
    for t in (0.5, 1.0, 3.0):
        expected = torch.softmax(torch.tensor(logits) / t, dim=0)
        assert torch.allclose(sample(logits, SamplingParams(temperature=t)), expected, atol=0.03), t
    assert sample(logits, SamplingParams(temperature=0))[0] == 1.0


def test_top_k_keeps_k_most_likely():
    freq = sample([1.0, 0.9, 0.8, 0.7, 0.6], SamplingParams(top_k=2))
    assert freq[2:].sum() == 0 and freq[0] > 0.4 and freq[1] > 0.4


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log().tolist()
    freq = sample(logits, SamplingParams(top_p=0.7))
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.5 / 0.8) < 0.03
    assert sample(logits, SamplingParams(top_p=0.4))[0] == 1.0


def test_min_p_drops_tokens_below_fraction_of_max():
    logits = torch.tensor([0.5, 0.3, 0.1, 0.1]).log().tolist()
    freq = sample(logits, SamplingParams(min_p=0.5))
    assert freq[2:].sum() == 0 and freq[1] > 0.3


def test_two_level_inverse_cdf_equals_plain_cumsum():
    gen = torch.Generator().manual_seed(0)
    for k in (1, 255, 256, 1000, 4099):
        probs = torch.rand(9, k, generator=gen) ** 8
        probs[probs < 0.3] = 0.0  # zero-probability tokens must never be picked
        probs[:, -1] += 1e-3
        u = torch.rand(9, generator=gen)
        cdf = probs.double().cumsum(-1)
        ref = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True)[:, 0]
        got = inverse_cdf(probs, u)
        assert torch.equal(got, ref.clamp(max=k - 1)) and (probs.gather(1, got[:, None]) > 0).all()


def test_filters_on_top_candidates_equal_full_sort(monkeypatch):
    """The topk shortcut gives the tokens a full sort gives, with and without the fallback to sorting."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.5, 1.0, 3.0, 6.0, 0.2, 4.0])[:, None]  # flat (fallback) to peaked (shortcut)
    probs = torch.softmax(torch.randn(6, 5000, generator=gen) * scale, dim=-1)
    params = [
        SamplingParams(top_p=0.9), SamplingParams(top_p=0.5, top_k=3000), SamplingParams(min_p=0.05),
        SamplingParams(top_k=10, min_p=0.2), SamplingParams(top_p=0.99), SamplingParams(top_p=0.8, min_p=0.01),
    ]  # fmt: skip
    for picked in ([0, 1, 2, 3, 4, 5], [1, 2, 3, 5]):  # rows 0 and 4 need the fallback, the others not
        batch, rows = [params[i] for i in picked], probs[picked]
        for _ in range(10):
            u = torch.rand(len(batch), generator=gen)
            fast = sample_filtered(rows, batch, u)
            with monkeypatch.context() as m:
                m.setattr(sampler_module, "CANDIDATES", ())  # always the full sort
                full = sample_filtered(rows, batch, u)
            assert torch.equal(fast, full)


def greedy_token(logits, **kw) -> int:
    params = SamplingParams(temperature=0, **{k: v for k, v in kw.items() if k not in ("prompt", "output")})
    seq = fake_seq(params, kw.get("prompt", (2,)), kw.get("output", ()))
    return Sampler(torch.device("cpu"))(torch.tensor([logits]), [seq])[0].token_id


def test_repetition_penalty_over_prompt_and_output():
    logits = [3.0, 2.9, 0.0]
    assert greedy_token(logits, prompt=[0]) == 0
    assert greedy_token(logits, prompt=[0], repetition_penalty=1.5) == 1  # 3.0 / 1.5 < 2.9
    assert greedy_token(logits, output=[0], repetition_penalty=1.5) == 1
    assert greedy_token([-1.0, -1.2], prompt=[0], repetition_penalty=1.5) == 1  # negative: -1 * 1.5


def test_presence_and_frequency_penalties():
    logits = [3.0, 2.5]
    assert greedy_token(logits, output=[0]) == 0
    assert greedy_token(logits, output=[0], presence_penalty=1.0) == 1
    assert greedy_token(logits, prompt=[0], presence_penalty=1.0) == 0  # prompt tokens do not count
    assert greedy_token(logits, output=[0, 0, 0], presence_penalty=0.2) == 0  # once: 2.8 > 2.5
    assert greedy_token(logits, output=[0, 0, 0], frequency_penalty=0.2) == 1  # per count: 2.4 < 2.5


def test_sparse_penalties_equal_dense_reference():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=gen)
    seqs = []
    for i in range(5):
        prompt = torch.randint(0, 300, (3 + 7 * i,), generator=gen).tolist()
        output = torch.randint(0, 40, (4 * i,), generator=gen).tolist()  # repeats
        p = SamplingParams(
            repetition_penalty=1.0 + 0.3 * i, presence_penalty=0.5 - 0.2 * i, frequency_penalty=0.1 * i
        )
        seqs.append(fake_seq(p, prompt, output))
    expected = logits.clone()
    for row, seq in enumerate(seqs):
        p = seq.params
        for t in set(seq.token_ids):
            x = expected[row, t]
            expected[row, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(seq.output_token_ids):
            count = seq.output_token_ids.count(t)
            expected[row, t] -= p.frequency_penalty * count + p.presence_penalty
    assert torch.allclose(apply_penalties(logits, seqs), expected, atol=1e-6)


def test_logprobs_are_model_logprobs_with_top_k():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    params = SamplingParams(temperature=0.7, logprobs=2, repetition_penalty=2.0)
    res = Sampler(torch.device("cpu"))(logits, [fake_seq(params, prompt=[0])])[0]
    ref = torch.log_softmax(logits[0], dim=0)
    assert set(res.top_logprobs) == {res.token_id, 0, 1}
    for token, value in res.top_logprobs.items():
        assert value == pytest.approx(ref[token].item(), abs=1e-6)
    assert res.logprob == pytest.approx(ref[res.token_id].item(), abs=1e-6)


def test_seeded_row_independent_of_batch_and_position():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=42)

    def draws(position: int, batch: int) -> list[int]:
        seq = fake_seq(params, generator=torch.Generator().manual_seed(42))
        others = [fake_seq(SamplingParams(temperature=1.0)) for _ in range(batch - 1)]
        rows = others[:position] + [seq] + others[position:]
        batch_logits = torch.cat([logits[1:][:position], logits[:1], logits[1:][position : batch - 1]])
        sampler = Sampler(torch.device("cpu"), seed=position)
        return [sampler(batch_logits, rows)[position].token_id for _ in range(30)]

    alone = draws(0, 1)
    assert draws(3, 6) == alone and draws(1, 4) == alone
    assert len(set(alone)) > 3


# -- end to end on a tiny model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_model("llama"), tokenizer=tokenizer(), block_size=4, max_num_batched_tokens=64)


PROMPT = "The history of the city begins"


def greedy(llm, **kw):
    return llm.generate(PROMPT, SamplingParams(temperature=0, **kw))[0].outputs[0]


def seeded(llm, **kw):
    """Sampled but reproducible (a tiny random model's greedy text repeats one token)."""
    return llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=3, **kw))[0].outputs[0]


def test_max_tokens(llm):
    out = greedy(llm, max_tokens=7)
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_n_returns_distinct_completions(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, max_tokens=8, seed=5))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3


def test_seeded_requests_reproducible_whatever_the_batch(llm):
    target = SamplingParams(max_tokens=12, seed=123, top_p=0.95, top_k=50)
    alone = llm.generate(PROMPT, target)[0].outputs[0].token_ids
    noise = [SamplingParams(max_tokens=m, temperature=1.3) for m in (3, 20, 9)]
    prompts = ["a", "Once upon a time there was", PROMPT, "zzz " * 30]
    mixed = llm.generate(prompts, [noise[0], noise[1], target, noise[2]])[2].outputs[0].token_ids
    reordered = llm.generate(prompts[::-1], [noise[2], target, noise[1], noise[0]])[1].outputs[0].token_ids
    assert alone == mixed == reordered
    other_seed = llm.generate(PROMPT, SamplingParams(max_tokens=12, seed=124, top_p=0.95, top_k=50))
    assert other_seed[0].outputs[0].token_ids != alone


def test_stop_string_ends_text_and_is_excluded(llm):
    full = seeded(llm, max_tokens=16)
    stop = full.text[6:10]
    cut = full.text.find(stop)
    out = seeded(llm, max_tokens=16, stop=[stop, "never-appears"])
    assert out.text == full.text[:cut] and stop not in out.text
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(full.token_ids)


def test_stop_token_ids_end_generation_keeping_the_token(llm):
    tokens = seeded(llm, max_tokens=10).token_ids
    k = next(i for i in range(2, 10) if tokens[i] not in tokens[:i])
    out = seeded(llm, max_tokens=10, stop_token_ids=[tokens[k]])
    assert out.token_ids == tokens[: k + 1] and out.finish_reason == "stop" and out.stop_reason == tokens[k]


def test_eos_stops_unless_ignore_eos(llm):
    tokens = seeded(llm, max_tokens=10).token_ids
    k = next(i for i in range(2, 10) if tokens[i] not in tokens[:i])
    saved = llm.engine.eos_token_ids
    llm.engine.eos_token_ids = {tokens[k]}
    try:
        stopped = seeded(llm, max_tokens=10)
        ignored = seeded(llm, max_tokens=10, ignore_eos=True)
    finally:
        llm.engine.eos_token_ids = saved
    assert stopped.token_ids == tokens[: k + 1] and stopped.finish_reason == "stop"
    assert stopped.stop_reason is None
    assert ignored.token_ids == tokens and ignored.finish_reason == "length"


def test_logprobs_match_the_model(llm):
    out = greedy(llm, max_tokens=5, logprobs=3)
    ids = tokenizer().encode(PROMPT) + out.token_ids
    model = tiny_model("llama")
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    n = len(tokenizer().encode(PROMPT))
    total = 0.0
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = ref[n - 1 + i]
        assert len(entry) == 3 and token in entry  # greedy: the sampled token is also the top-1
        assert entry[token] == pytest.approx(row[token].item(), abs=1e-4)
        assert set(entry) == set(row.topk(3).indices.tolist())
        total += entry[token]
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-5)
    assert greedy(llm, max_tokens=3).logprobs is None


def test_penalties_end_to_end_change_greedy_output(llm):
    base = greedy(llm, max_tokens=24).token_ids
    assert len(set(base)) < len(base)  # a tiny random model repeats itself
    for field in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        out = greedy(llm, max_tokens=24, **{field: 2.0}).token_ids
        assert out != base, field
        assert len(set(out)) > len(set(base)), field


def test_stream_deltas_add_up(llm):
    params = [SamplingParams(max_tokens=12, seed=s, stop=["the"]) for s in range(4)]
    text: dict[str, str] = {}
    ids: dict[str, list[int]] = {}
    final = {}
    for out in llm.stream(["Hi", PROMPT, "x" * 40, "Why"], params):
        c = out.outputs[0]
        text[out.request_id] = text.get(out.request_id, "") + c.delta_text
        ids[out.request_id] = ids.get(out.request_id, []) + c.delta_token_ids
        if out.finished:
            final[out.request_id] = c
    assert len(final) == 4
    for rid, c in final.items():
        assert text[rid] == c.text and ids[rid] == c.token_ids and "the" not in c.text


# -- vLLM's extra fields: each test fails if the field does nothing ---------------------------------------


def test_min_tokens_holds_back_eos_and_stop_token_ids(llm):
    tokens = seeded(llm, max_tokens=12).token_ids
    k = next(i for i in range(2, 8) if tokens[i] not in tokens[:i])
    saved = llm.engine.eos_token_ids
    llm.engine.eos_token_ids = {tokens[k]}
    llm.engine.sampler.stop_ids = [tokens[k]]
    try:
        early = seeded(llm, max_tokens=12)
        held = seeded(llm, max_tokens=12, min_tokens=k + 3)
    finally:
        llm.engine.eos_token_ids = saved
        llm.engine.sampler.stop_ids = sorted(saved)
    assert early.token_ids == tokens[: k + 1]
    assert len(held.token_ids) >= k + 3 and tokens[k] not in held.token_ids[: k + 2]
    by_id = seeded(llm, max_tokens=12, stop_token_ids=[tokens[k]], min_tokens=k + 3)
    assert len(by_id.token_ids) >= k + 3 and tokens[k] not in by_id.token_ids[: k + 2]


def test_include_stop_str_in_output_keeps_the_stop_string(llm):
    full = seeded(llm, max_tokens=16)
    stop = full.text[6:10]
    cut = full.text.find(stop)
    out = seeded(llm, max_tokens=16, stop=[stop], include_stop_str_in_output=True)
    assert out.text == full.text[: cut + len(stop)] and out.text.endswith(stop)
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_logit_bias_forces_and_bans_tokens(llm):
    forced = greedy(llm, max_tokens=6, logit_bias={"123": 100.0}).token_ids
    assert forced == [123] * 6
    base = greedy(llm, max_tokens=6).token_ids
    banned = greedy(llm, max_tokens=6, logit_bias={base[0]: -100.0}).token_ids
    assert base[0] not in banned[:1] and banned != base


def test_logit_bias_shifts_the_distribution():
    logits = [1.0, 0.0, 0.0]
    freq = sample(logits, SamplingParams(logit_bias={2: 2.0}))
    expected = torch.softmax(torch.tensor([1.0, 0.0, 2.0]), dim=0)
    assert torch.allclose(freq, expected, atol=0.03)


def test_allowed_token_ids_restrict_sampling(llm):
    allowed = [300, 301, 302, 9000]
    for out in (
        greedy(llm, max_tokens=8, allowed_token_ids=allowed),
        seeded(llm, max_tokens=8, allowed_token_ids=allowed),
    ):
        assert out.token_ids and set(out.token_ids) <= set(allowed)
    assert not set(greedy(llm, max_tokens=8).token_ids) <= set(allowed)


def test_bad_words_are_never_generated(llm):
    base = greedy(llm, max_tokens=16)
    word = tokenizer().decode([base.token_ids[0]]).strip()
    assert word and word in base.text
    out = greedy(llm, max_tokens=16, bad_words=[word])
    single = {ids[-1] for ids in llm.engine.sampler.bad_word_ids(word) if len(ids) == 1}
    assert single and not single & set(out.token_ids)
    assert out.token_ids != base.token_ids


def test_bad_words_of_several_tokens_ban_the_last_after_the_rest(llm):
    base = greedy(llm, max_tokens=16).token_ids
    i = next(i for i in range(1, 15) if base[i] != base[i - 1])
    pair_text = tokenizer().decode(base[i - 1 : i + 1])
    sampler = llm.engine.sampler
    seq = fake_seq(SamplingParams(bad_words=[pair_text]), output=base[:i])
    ids_of_word = sampler.bad_word_ids(pair_text)
    banned = sampler._banned(seq)
    for ids in ids_of_word:
        if len(ids) == 1 or base[:i][-(len(ids) - 1) :] == ids[:-1]:
            assert ids[-1] in banned
    assert any(len(ids) > 1 for ids in ids_of_word)


def test_skip_special_tokens_false_keeps_them_in_the_text(llm):
    special = tokenizer().convert_tokens_to_ids("<|im_start|>")
    kept = greedy(llm, max_tokens=3, allowed_token_ids=[special], skip_special_tokens=False)
    dropped = greedy(llm, max_tokens=3, allowed_token_ids=[special])
    assert kept.text == "<|im_start|>" * 3 and dropped.text == ""


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"logit_bias": {5: 101.0}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
        ({"bad_words": [""]}, "bad_words"),
        ({"bad_words": "word"}, "bad_words"),
        ({"skip_special_tokens": None}, "skip_special_tokens"),
    ],
)
def test_new_fields_are_range_checked(kwargs, param):
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param


def test_token_ids_outside_the_vocabulary_are_refused(llm):
    for kwargs, param in (
        ({"logit_bias": {10**6: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
    ):
        with pytest.raises(ValueError) as info:
            llm.generate("x", SamplingParams(**kwargs))
        assert info.value.param == param and "outside the vocabulary" in str(info.value)


def test_a_row_with_every_token_excluded_fails_alone(llm):
    engine = llm.engine
    dead = SamplingParams(
        max_tokens=4, temperature=0, allowed_token_ids=[7], bad_words=[tokenizer().decode([7])]
    )
    ok = SamplingParams(max_tokens=4, temperature=0)
    ids = [engine.add_request(None, "x", dead), engine.add_request(None, "y", ok)]
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert "every token is excluded" in str(finals[ids[0]].error.__cause__)
    assert finals[ids[1]].error is None and len(finals[ids[1]].outputs[0].token_ids) == 4
