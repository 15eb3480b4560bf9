"""Vectorized next-token sampling with per-request settings.

One pass over the [B, V] logits of a step: penalties, then greedy rows take the argmax and the others
get temperature, top-k / top-p / min-p and inverse-CDF sampling (one uniform number per row, searched in
the cumulative distribution). Each stage runs once for the whole batch when any row needs it.

A seeded request draws its uniform numbers from its own ``torch.Generator``, so its tokens do not depend on
the other rows of the batch or on arrival order; unseeded rows share the engine's generator.

Filters never sort the whole vocabulary when they need not: the top 64 (then 512) tokens (a ``topk``)
suffice whenever they hold every token the filters can keep (checked per row: top-k within them, top-p
mass reached inside them, or min-p threshold above the last of them); otherwise the rows are sorted.
A full sort of [32, 49152] costs ~100x a softmax on CPU. Penalties touch only the tokens a row has seen.

One row cannot fail the others: the uniform numbers are drawn first, and if the batched pass raises, the
rows are redone one at a time with those numbers (the failure path only; the normal path has no per-row
loop), so each other row gets exactly the token the batch would have given and the failing row its error.

Logits processors run first, on the rows that use them only, each as one batched op: ``logit_bias`` (one
``index_put_`` accumulating all rows' biases), bans (``bad_words``, ``min_tokens``: one ``index_put_`` of
-inf), ``allowed_token_ids`` (one masked fill over those rows) and grammars (``blora.engine.structured``: a
bitmask row per constrained sequence, applied in one call). Logprobs are those of the model's logits,
before processors, penalties and temperature (vLLM's default). Rows without processors are untouched: their
tokens are bit-identical to a batch without any constrained row.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from blora import kernels
from blora.engine.outputs import Logprob
from blora.engine.sampling_params import SamplingParamError, SamplingParams
from blora.engine.sequence import Sequence
from blora.engine.structured import StructuredOutputs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CANDIDATES = (64, 512)  # tried in turn before a full sort

log = logging.getLogger(__name__)


def top_k_of(params: SamplingParams, vocab_size: int) -> int:
    """The row's effective top-k: 0 (off) when unset or when it keeps the whole vocabulary."""
    return params.top_k if 0 < params.top_k < vocab_size else 0


def uses_filters(params: SamplingParams, vocab_size: int) -> bool:
    """Whether any filter (top-k, top-p, min-p) can drop a token of a ``vocab_size`` distribution."""
    return top_k_of(params, vocab_size) > 0 or params.top_p < 1.0 or params.min_p > 0.0


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (first maximum). On CPU the C++ kernel: torch's argmax over [32, 49152] takes ~0.4 ms
    in float32 and ~2.5 ms in bfloat16 here, a real share of a decode step."""
    if logits.device.type == "cpu" and logits.dtype in kernels.DTYPES and logits.stride(-1) == 1:
        kernel = kernels.get()
        if kernel is not None and kernel.native_vector:
            return kernel.argmax(logits)
    return logits.argmax(dim=-1)


# Prompt rows whose [rows, vocab] fp32 log-softmax is held at once (bounds memory for long prompt chunks).
PROMPT_LOGPROBS_ROWS = 256


@dataclass
class PromptTopK:
    """Prompt logprobs of ``seq``'s prompt tokens ``first .. first + m - 1`` (computed from the logits of the
    positions before them): ``logprobs`` [m] of the prompt tokens, their ``ranks`` [m] (1 = most likely),
    ``top_ids`` / ``top_logprobs`` [m, k]. CPU tensors; the full vocabulary is never kept."""

    seq: Sequence
    first: int
    logprobs: torch.Tensor
    ranks: torch.Tensor
    top_ids: torch.Tensor
    top_logprobs: torch.Tensor

    def append_to_seq(self, decode: Callable[[list[int]], list[str]]) -> None:
        """Append the entries ``seq.prompt_logprobs`` does not hold yet, as ``{token_id: Logprob}`` (the
        prompt token first, then the top-k by rank); ``decode``: token ids -> each one's text alone."""
        held = self.seq.prompt_logprobs
        if held is None or len(held) - self.first >= len(self.logprobs):
            return
        skip = len(held) - self.first
        targets = self.seq.token_ids[self.first : self.first + len(self.logprobs)]
        lps, ranks = self.logprobs.tolist(), self.ranks.tolist()
        top_ids, top_lps = self.top_ids.tolist(), self.top_logprobs.tolist()
        unique = sorted({*targets[skip:], *(t for row in top_ids[skip:] for t in row)})
        text = dict(zip(unique, decode(unique), strict=True))
        for j in range(skip, len(lps)):
            entry = {targets[j]: Logprob(lps[j], ranks[j], text[targets[j]])}
            for r, (tid, lp) in enumerate(zip(top_ids[j], top_lps[j], strict=True)):
                entry.setdefault(tid, Logprob(lp, r + 1, text[tid]))
            held.append(entry)


def prompt_topk(
    head: Callable[[slice], torch.Tensor],
    num_rows: int,
    targets: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprob, rank and top-k of ``targets`` [m] under the logits ``head(rows)`` of ``num_rows`` = m rows,
    PROMPT_LOGPROBS_ROWS rows at a time. Returns (logprobs [m], ranks [m], top_logprobs [m, k], top_ids
    [m, k]) on the CPU.

    Semantics: lp = log_softmax(logits.float()); lp[target], 1 + #{v: lp[v] > lp[target]}, topk(lp, k)."""
    chosen_parts, rank_parts, val_parts, id_parts = [], [], [], []
    for lo in range(0, num_rows, PROMPT_LOGPROBS_ROWS):
        rows = slice(lo, min(lo + PROMPT_LOGPROBS_ROWS, num_rows))
        lp = torch.log_softmax(head(rows).float(), dim=-1)
        chosen = lp.gather(1, targets[rows].unsqueeze(1))
        ranks = (lp > chosen).sum(dim=-1) + 1
        vals, ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
        chosen_parts.append(chosen[:, 0].cpu())
        rank_parts.append(ranks.cpu())
        val_parts.append(vals.cpu())
        id_parts.append(ids.cpu())
    return torch.cat(chosen_parts), torch.cat(rank_parts), torch.cat(val_parts), torch.cat(id_parts)


@dataclass
class SampleResult:
    token_id: int
    logprob: float | None = None  # the sampled token's logprob under the model (when requested)
    top_logprobs: dict[int, float] | None = None  # sampled token first, then the top-k
    error: Exception | None = None  # sampling this row failed (token_id is then -1)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.structured: StructuredOutputs | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.stop_ids: list[int] = []  # EOS ids: banned while a row is below its min_tokens
        self._word_ids: dict[str, list[list[int]]] = {}

    def configure(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: Seq[int]) -> None:
        """Give the sampler the model's tokenizer, logits width and EOS ids (grammars, bad_words, min_tokens)."""
        self.tokenizer = tokenizer
        self.stop_ids = sorted(eos_token_ids)
        self.structured = StructuredOutputs(tokenizer, vocab_size, self.stop_ids)

    def check(self, params: SamplingParams) -> None:
        """Prepare what a request's processors need (compile its grammar, tokenize its bad words), so a
        broken one is refused when queued (``SamplingParamError`` naming the field), not in a step."""
        if params.structured_outputs is not None:
            if self.structured is None:
                raise SamplingParamError("structured_outputs", "this sampler has no tokenizer (configure it)")
            self.structured.compile(params.structured_outputs)
        for word in params.bad_words or ():
            self.bad_word_ids(word)

    def bad_word_ids(self, word: str) -> list[list[int]]:
        """Token sequences of ``word`` as generated alone and after a space (vLLM's rule)."""
        ids = self._word_ids.get(word)
        if ids is None:
            if self.tokenizer is None:
                raise SamplingParamError("bad_words", "this sampler has no tokenizer (configure it)")
            forms = {word, " " + word.lstrip()}
            ids = [t for t in (self.tokenizer.encode(f, add_special_tokens=False) for f in forms) if t]
            if len(self._word_ids) < 65536:
                self._word_ids[word] = ids
        return ids

    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> list[SampleResult]:
        """``logits`` [B, V] (any float dtype), row i belongs to ``seqs[i]``.

        Never raises for a row's settings: if the batch fails, it is redone one row at a time with the
        uniform numbers already drawn for it (so every other row gets the token the batch would have
        given) and a row that fails alone comes back with ``error`` set. A constrained row's grammar is
        advanced by its sampled token here.
        """
        raw = logits
        errors: dict[int, Exception] = {}
        processed = [i for i, s in enumerate(seqs) if s.params.uses_logits_processors]
        if processed:
            logits, errors = self._process(logits, seqs)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        u = self._uniform([seqs[i] for i in sampled]) if sampled else None
        try:
            results = self._sample_batch(logits, seqs, sampled, u, raw)
        except Exception as exc:
            results = self._sample_rows(logits, seqs, sampled, u, exc, raw)
        for i, err in errors.items():
            results[i] = SampleResult(-1, error=err)
        for i in processed:  # grammars advance by the sampled token
            seq = seqs[i]
            if seq.params.structured_outputs is not None and results[i].error is None:
                assert self.structured is not None  # _process refuses grammar rows without it
                try:
                    self.structured.accept(seq, results[i].token_id)
                except Exception as exc:
                    results[i] = SampleResult(-1, error=exc)
        return results

    def _process(
        self, logits: torch.Tensor, seqs: Seq[Sequence]
    ) -> tuple[torch.Tensor, dict[int, Exception]]:
        """Logits processors of the rows that use them -> (new float32 logits, {row: error})."""
        logits = logits.to(torch.float32, copy=True)
        v = logits.shape[1]
        bias: tuple[list[int], list[int], list[float]] = ([], [], [])
        bans: tuple[list[int], list[int]] = ([], [])
        allowed: tuple[list[int], list[int]] = ([], [])
        allowed_rows: list[int] = []
        grammar_rows: list[int] = []
        for i, seq in enumerate(seqs):
            p = seq.params
            if not p.uses_logits_processors:
                continue
            if p.logit_bias:
                bias[0].extend([i] * len(p.logit_bias))
                bias[1].extend(p.logit_bias)
                bias[2].extend(p.logit_bias.values())
            if p.allowed_token_ids is not None:
                allowed[0].extend([len(allowed_rows)] * len(p.allowed_token_ids))
                allowed[1].extend(p.allowed_token_ids)
                allowed_rows.append(i)
            banned = self._banned(seq)
            bans[0].extend([i] * len(banned))
            bans[1].extend(banned)
            if p.structured_outputs is not None:
                grammar_rows.append(i)
        if bias[0]:
            index = (self._long(bias[0]), self._long(bias[1]))
            logits.index_put_(index, self._float(bias[2]), accumulate=True)
        if allowed_rows:
            keep = torch.zeros(len(allowed_rows), v, dtype=torch.bool, device=logits.device)
            keep[self._long(allowed[0]), self._long(allowed[1])] = True
            rows = self._long(allowed_rows)
            logits.index_copy_(0, rows, logits.index_select(0, rows).masked_fill_(~keep, -math.inf))
        if bans[0]:
            logits.index_put_((self._long(bans[0]), self._long(bans[1])), self._float([-math.inf]))
        errors: dict[int, Exception] = {}
        if grammar_rows:
            if self.structured is None:
                raise RuntimeError("structured outputs need Sampler.configure(tokenizer, ...) first")
            bitmask, errors = self.structured.fill(grammar_rows, seqs, len(seqs))
            self.structured.apply(logits, bitmask, grammar_rows)
        touched = sorted({*bias[0], *bans[0], *allowed_rows, *grammar_rows} - errors.keys())
        if touched:
            dead = torch.isneginf(logits.index_select(0, self._long(touched))).all(dim=-1).tolist()
            for i, d in zip(touched, dead, strict=True):
                if d:
                    errors[i] = ValueError(
                        "every token is excluded by the request's allowed_token_ids, bad_words, min_tokens, "
                        "logit_bias and structured output together"
                    )
        return logits, errors

    def _banned(self, seq: Sequence) -> list[int]:
        """Token ids ``seq`` may not sample now: bad words' last tokens, EOS / stop ids below min_tokens."""
        p = seq.params
        out: list[int] = []
        if p.bad_words:
            output = seq.output_token_ids
            for word in p.bad_words:
                for ids in self.bad_word_ids(word):
                    prefix = ids[:-1]
                    if not prefix or (
                        len(output) >= len(prefix) and output[len(output) - len(prefix) :] == prefix
                    ):
                        out.append(ids[-1])
        # a grammar decides itself when the output may end (its completion allows only EOS)
        if p.min_tokens and seq.num_output_tokens < p.min_tokens and p.structured_outputs is None:
            out.extend(self.stop_ids)
            out.extend(p.stop_token_ids or ())  # a list once the params are validated
        return out

    def _sample_batch(
        self,
        logits: torch.Tensor,
        seqs: Seq[Sequence],
        sampled: list[int],
        u: torch.Tensor | None,
        raw: torch.Tensor | None = None,
    ) -> list[SampleResult]:
        """Every row in one pass; ``sampled``: the non-greedy rows, ``u`` their uniform numbers; ``raw``:
        the model's logits for logprobs (default ``logits``)."""
        params = [s.params for s in seqs]
        plain_greedy = not sampled and all(not p.uses_penalties and p.logprobs is None for p in params)
        if not plain_greedy:
            logits = logits.float()  # argmax alone is exact in the model's dtype (widening is exact)
        raw = logits if raw is None else raw
        if any(p.uses_penalties for p in params):
            logits = apply_penalties(logits, seqs)
        if not sampled:
            tokens = _argmax(logits)
        elif len(sampled) == len(seqs):
            assert u is not None  # drawn for the sampled rows
            tokens = self._sample(logits, params, u)
        else:
            assert u is not None
            tokens = _argmax(logits)
            rows = self._long(sampled)
            picks = self._sample(logits.index_select(0, rows), [params[i] for i in sampled], u)
            tokens.index_copy_(0, rows, picks)
        results = [SampleResult(t) for t in tokens.tolist()]
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            self._logprobs(raw, tokens, want, params, results)
        return results

    def _sample_rows(
        self,
        logits: torch.Tensor,
        seqs: Seq[Sequence],
        sampled: list[int],
        u: torch.Tensor | None,
        exc: Exception,
        raw: torch.Tensor | None = None,
    ) -> list[SampleResult]:
        """The failure path of ``__call__``: each row alone; a row that still fails gets its error."""
        if len(seqs) == 1:
            return [SampleResult(-1, error=exc)]
        log.warning("sampling a batch of %d rows failed (%r); retrying row by row", len(seqs), exc)
        position = {row: j for j, row in enumerate(sampled)}
        results = []
        for i, seq in enumerate(seqs):
            j = position.get(i)
            row_u = None if j is None or u is None else u[j : j + 1]
            try:
                row_raw = None if raw is None else raw[i : i + 1]
                results.append(
                    self._sample_batch(logits[i : i + 1], [seq], [] if j is None else [0], row_u, row_raw)[0]
                )
            except Exception as row_exc:
                results.append(SampleResult(-1, error=row_exc))
        return results

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
        """Non-greedy rows: temperature, filters, one inverse-CDF draw each (``u`` [S]) -> [S] token ids."""
        temps = self._float([p.temperature for p in params])
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        v = probs.shape[1]
        filtered = [i for i, p in enumerate(params) if uses_filters(p, v)]
        if not filtered:
            return inverse_cdf(probs, u)
        tokens = (
            inverse_cdf(probs, u) if len(filtered) < len(params) else probs.new_empty(0, dtype=torch.long)
        )
        rows = self._long(filtered)
        picks = sample_filtered(
            probs.index_select(0, rows), [params[i] for i in filtered], u.index_select(0, rows)
        )
        return picks if tokens.numel() == 0 else tokens.index_copy_(0, rows, picks)

    def _uniform(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """One U[0, 1) number per row; seeded rows draw theirs from their own generator."""
        u = torch.rand(len(seqs), generator=self.generator, device=self.device)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                u[i] = torch.rand(1, generator=s.generator, device=self.device)[0]
        return u

    def _logprobs(
        self,
        raw: torch.Tensor,
        tokens: torch.Tensor,
        want: list[int],
        params: list[SamplingParams],
        results: list[SampleResult],
    ) -> None:
        rows = self._long(want)
        logp = torch.log_softmax(raw.index_select(0, rows).float(), dim=-1)
        chosen = logp.gather(1, tokens.index_select(0, rows)[:, None])[:, 0].tolist()
        k = max(params[i].logprobs or 0 for i in want)  # ``want``: the rows that set logprobs
        top_vals, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], logp[:, :0].long())
        vals_rows, ids_rows = top_vals.tolist(), top_ids.tolist()
        for j, i in enumerate(want):
            kk = params[i].logprobs
            res = results[i]
            res.logprob = chosen[j]
            res.top_logprobs = {res.token_id: chosen[j]}
            for tid, val in zip(ids_rows[j][:kk], vals_rows[j][:kk], strict=True):
                res.top_logprobs.setdefault(tid, val)

    def _float(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _long(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def apply_penalties(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """Repetition (HF: over prompt + output, divide positive logits / multiply negative ones), then
    frequency and presence (OpenAI: ``logit -= f * count + p * (count > 0)`` over generated tokens).

    Semantics per row: ``seen = set(prompt + output)``; ``l[t] = l[t] / r if l[t] > 0 else l[t] * r`` for t
    in seen; ``l[t] -= f * output.count(t) + p * (t in output)``. Computed on the seen tokens only
    (gather/scatter over [B, len]), never on dense [B, V] masks.
    """
    device = logits.device
    rep = [s.params.repetition_penalty for s in seqs]
    if any(r != 1.0 for r in rep):
        seen = _padded([s.token_ids for s in seqs], -1, device)  # prompt + output
        seen = torch.where(seen < 0, seen[:, :1], seen)  # pad with a seen id: rewritten identically
        r = torch.tensor(rep, device=device)[:, None]
        g = logits.gather(1, seen)
        logits = logits.scatter(1, seen, torch.where(g > 0, g / r, g * r))
    freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=device)[:, None]
    pres = torch.tensor([s.params.presence_penalty for s in seqs], device=device)[:, None]
    if not (freq.any() or pres.any()) or not any(s.output_token_ids for s in seqs):
        return logits
    v = logits.shape[1]
    out, _ = _padded([s.output_token_ids for s in seqs], v, device).sort(dim=1)  # pads (v) last
    first = torch.ones_like(out, dtype=torch.bool)
    first[:, 1:] = out[:, 1:] != out[:, :-1]
    valid = (out < v).float()
    delta = -(freq * valid) - pres * (first.float() * valid)
    return logits.scatter_add(1, out.clamp(max=v - 1), delta)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Sample one index per row of (unnormalized) ``probs`` [S, K] with uniforms ``u`` [S].

    Semantics: the smallest ``i`` with ``cumsum(probs)[i] > u * sum(probs)``; zero-probability entries
    are never picked. Two levels (block sums, then one block), because a [32, 49152] ``cumsum`` is slow
    on CPU (it does not vectorize) while sums do.
    """
    s, k = probs.shape
    pad = -k % block
    blocks = (torch.nn.functional.pad(probs, (0, pad)) if pad else probs).view(s, -1, block)
    cdf = blocks.sum(dim=-1).cumsum(dim=-1)  # [S, num_blocks]
    target = u * cdf[:, -1]
    b = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=cdf.shape[1] - 1)
    before = torch.where(b > 0, cdf.gather(1, (b - 1).clamp(min=0)[:, None])[:, 0], torch.zeros_like(target))
    inner = blocks[torch.arange(s, device=probs.device), b]  # [S, block]
    j = torch.searchsorted(inner.cumsum(dim=-1), (target - before)[:, None], right=True)[:, 0]
    last = torch.where(inner > 0, torch.arange(block, device=probs.device), -1).amax(dim=-1)
    return b * block + torch.minimum(j, last)  # rounding never lands on a zero-probability entry


def sample_filtered(probs: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p over what top-k kept, then min-p, then sample -> [S] token ids.

    Semantics per row: keep the ``k`` most likely; of those keep the smallest prefix (by probability)
    whose renormalized mass reaches ``p``; drop tokens with ``prob < min_p * max_prob``; sample from the
    rest in proportion to ``probs``. The most likely token always stays. Each row is served by the
    smallest candidate set (top 64, top 512, full sort) that holds all its kept tokens.
    """
    v = probs.shape[1]
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    rows = list(range(probs.shape[0]))
    for k in (*CANDIDATES, v):
        index = torch.tensor(rows, device=probs.device)
        sub, sub_params = probs.index_select(0, index), [params[r] for r in rows]
        k = min(v, max(k, *(top_k_of(p, v) for p in sub_params)))
        vals, idx = sub.topk(k, dim=-1) if k < v else sub.sort(dim=-1, descending=True)
        ok = [True] * len(rows) if k == v else _candidates_suffice(vals, sub_params)
        done = torch.tensor([i for i, f in enumerate(ok) if f], dtype=torch.long, device=probs.device)
        if done.numel():
            picks = _filter_and_pick(
                vals.index_select(0, done),
                [sub_params[i] for i in done.tolist()],
                u.index_select(0, index[done]),
                v,
            )
            out.index_copy_(0, index[done], idx.index_select(0, done).gather(1, picks[:, None])[:, 0])
        rows = [r for r, f in zip(rows, ok, strict=True) if not f]
        if not rows:
            break
    return out


def _filter_and_pick(
    vals: torch.Tensor, params: list[SamplingParams], u: torch.Tensor, v: int
) -> torch.Tensor:
    """Apply the filters to sorted candidate probabilities ``vals`` [S, K]; sample positions in them."""
    dev = vals.device
    rank = torch.arange(vals.shape[1], device=dev)[None, :]
    top_k = torch.tensor([top_k_of(p, v) or v for p in params], device=dev)[:, None]
    top_p = torch.tensor([p.top_p if p.top_p < 1 else float("inf") for p in params], device=dev)[:, None]
    min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
    remove = rank >= top_k
    kept = vals.masked_fill(remove, 0.0)
    cum = kept.cumsum(dim=-1)
    mass = torch.where(top_k < v, cum[:, -1:], torch.ones_like(cum[:, -1:]))  # top-p renormalizes top-k
    remove |= (cum - kept) > top_p * mass
    remove |= vals < min_p * vals[:, :1]
    remove[:, 0] = False
    return inverse_cdf(vals.masked_fill(remove, 0.0), u)


def _candidates_suffice(vals: torch.Tensor, params: list[SamplingParams]) -> list[bool]:
    """Per row: whether every token the filters keep is among the sorted top candidates ``vals`` [S, K]."""
    k = vals.shape[1]
    mass = vals.sum(dim=-1).tolist()
    last_over_first = (vals[:, -1] / vals[:, 0]).tolist()
    return [
        (0 < p.top_k <= k)
        or (p.top_p < 1 and mass[i] > p.top_p)
        or (p.min_p > 0 and last_over_first[i] < p.min_p)
        for i, p in enumerate(params)
    ]
