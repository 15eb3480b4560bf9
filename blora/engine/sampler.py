"""Vectorized next-token sampling with per-request settings.

One pass over the [B, V] logits of a step: penalties, temperature, top-k / top-p / min-p, then sampling
by the exponential race ``argmax(probs / q)`` with ``q ~ Exp(1)`` (equivalent to sampling from ``probs``).
The noise of a seeded request comes from its own ``torch.Generator``, so its tokens do not depend on the
other rows of the batch or on arrival order; unseeded rows share the engine's generator. Rows whose
setting is off skip nothing: each stage runs once for the whole batch when any row needs it.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from blora.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # the sampled token's logprob under the model (when requested)
    top_logprobs: dict[int, float] | None = None  # sampled token first, then the top-k


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[SampleResult]:
        """``logits`` [B, V] float32, row i belongs to ``seqs[i]``."""
        params = [s.params for s in seqs]
        raw = logits
        if any(p.uses_penalties for p in params):
            logits = apply_penalties(logits, seqs)
        tokens = logits.argmax(dim=-1) if all(p.greedy for p in params) else self._sample(logits, seqs)
        token_list = tokens.tolist()
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        results = [SampleResult(t) for t in token_list]
        if want:
            self._logprobs(raw, tokens, want, params, results)
        return results

    def _sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        greedy = self._bool([p.greedy for p in params])
        temps = self._float([1.0 if p.greedy else p.temperature for p in params])
        scaled = logits / temps[:, None]
        if any(p.uses_filters for p in params):
            scaled = apply_filters(scaled, params)
        probs = torch.softmax(scaled, dim=-1)
        sampled = (probs / self._noise(probs.shape, seqs)).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def _noise(self, shape: torch.Size, seqs: Seq[Sequence]) -> torch.Tensor:
        """Exp(1) noise [B, V]; seeded rows draw theirs from their own generator (greedy rows draw none)."""
        noise = torch.empty(shape, device=self.device)
        free = [i for i, s in enumerate(seqs) if s.generator is None]
        if len(free) == len(seqs):
            return noise.exponential_(generator=self.generator)
        if free:
            rows = torch.empty(len(free), shape[1], device=self.device).exponential_(generator=self.generator)
            noise[self._long(free)] = rows
        for i, s in enumerate(seqs):
            if s.generator is not None:
                if s.params.greedy:
                    noise[i] = 1.0
                else:
                    noise[i].exponential_(generator=s.generator)
        return noise

    def _logprobs(self, raw, tokens, want: list[int], params, results: list[SampleResult]) -> None:
        rows = self._long(want)
        logp = torch.log_softmax(raw.index_select(0, rows), dim=-1)
        chosen = logp.gather(1, tokens.index_select(0, rows)[:, None])[:, 0].tolist()
        k = max(params[i].logprobs for i in want)
        top_vals, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        for j, i in enumerate(want):
            kk = params[i].logprobs
            res = results[i]
            res.logprob = chosen[j]
            res.top_logprobs = {res.token_id: chosen[j]}
            for tid, val in zip(top_ids[j][:kk], top_vals[j][:kk], strict=True):
                res.top_logprobs.setdefault(tid, val)

    def _float(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _bool(self, values: list[bool]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.bool, device=self.device)

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def apply_penalties(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """Repetition (HF: over prompt + output, divide positive logits / multiply negative ones), then
    frequency and presence (OpenAI: ``logit -= f * count + p * (count > 0)`` over generated tokens).

    Semantics per row: ``seen = set(prompt + output)``; ``l[t] = l[t] / r if l[t] > 0 else l[t] * r`` for t
    in seen; ``l[t] -= f * output.count(t) + p * (t in output)``.
    """
    b, v = logits.shape
    device = logits.device
    out_ids = _padded([s.output_token_ids for s in seqs], v, device)
    counts = torch.zeros(b, v + 1, device=device).scatter_add_(
        1, out_ids, torch.ones_like(out_ids, dtype=torch.float)
    )
    counts = counts[:, :v]
    prompt_ids = _padded([s.request.prompt_token_ids for s in seqs], v, device)
    seen = torch.zeros(b, v + 1, dtype=torch.bool, device=device).scatter_(1, prompt_ids, True)[:, :v]
    seen |= counts > 0
    rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=device)[:, None]
    freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=device)[:, None]
    pres = torch.tensor([s.params.presence_penalty for s in seqs], device=device)[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - freq * counts - pres * (counts > 0).float()


def apply_filters(logits: torch.Tensor, params) -> torch.Tensor:
    """Top-k, then top-p over what top-k kept, then min-p; removed tokens get -inf.

    Semantics per row: keep the ``k`` largest; of those keep the smallest prefix (by probability) whose
    mass reaches ``p``; drop tokens with ``prob < min_p * max_prob``. The most likely token always stays.
    """
    b, v = logits.shape
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(v, device=device)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else v for p in params], device=device)[:, None]
    remove = rank >= top_k
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([p.top_p if p.top_p < 1 else float("inf") for p in params], device=device)[:, None]
    remove |= (probs.cumsum(dim=-1) - probs) > top_p
    min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
    remove |= probs < min_p * probs[:, :1]
    remove[:, 0] = False
    remove = torch.zeros_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(remove, float("-inf"))
