"""Batched sampling on the device: penalties, greedy, temperature, top-k, top-p, min-p, per-request seeds.

Every row of a step is handled by the same few tensor ops, whatever mix of settings the batch holds; the host only
decides which ops the batch needs at all (a greedy batch is one argmax).

Seeded sampling is the Gumbel-max trick with counter-based noise: the noise for token t of a request at output
position n is a hash of (seed, n, t). A request thus draws the same tokens whatever shares its batch, after a
preemption, and on any device, with no per-row generator and no loop over rows. The order of the filters follows
transformers: repetition penalty, temperature, top-k, top-p (on the top-k set, renormalised), min-p. Top-k keeps
exactly k tokens, equal logits going to the lower token id, so its set too is the same in any batch.
"""
import math
from dataclasses import dataclass

import torch

from .sequence import Sequence

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


def row_key(seed: int, offset: int) -> int:
    """A 32-bit key for (seed, output position): splitmix64's finaliser, on the host."""
    z = (seed * 0x9E3779B97F4A7C15 + (offset + 1) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) & _M32


def gumbel_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise `[B, K]` for the tokens `token_ids` (`[B, K]` or `[1, K]`) of rows keyed `keys [B]`.

    The hash works on 32-bit values held in int64, so no product overflows; 23 bits of it make a uniform in (0, 1).
    """
    x = (token_ids.long() * 0x9E3779B1 + keys[:, None]) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return gumbel_from_bits((x >> 16) ^ x)


def gumbel_from_bits(x: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from 32-bit values: their top 23 bits, centred in their cells, are a uniform strictly
    inside (0, 1), so the noise is finite for every value. (23, not 24: k + 0.5 must be exact in float32, or the
    top cell rounds to u = 1 and its noise is +inf, which wins every draw, filtered tokens included.)"""
    u = ((x >> 9).float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log(u))


@dataclass
class SamplingInputs:
    """One step's sampling settings as device tensors; None where no row of the batch needs that op."""
    greedy: bool                                   # every row is greedy: a plain argmax
    do_sample: torch.Tensor | None = None       # [B] bool, in a mixed batch
    temperature: torch.Tensor | None = None     # [B, 1]
    top_k: torch.Tensor | None = None           # [B] (vocab size where a row has no limit)
    max_top_k: int = 0                             # width of the candidate set (vocab size: a full sort)
    top_p: torch.Tensor | None = None           # [B, 1] float64
    log_min_p: torch.Tensor | None = None       # [B, 1]
    keys: torch.Tensor | None = None            # [B] int64 noise keys
    penalty: torch.Tensor | None = None         # [B, 1]
    history: torch.Tensor | None = None         # [B, L] every token each row has seen, padded with its first
    stop_ids: torch.Tensor | None = None        # [B, S] ids masked while a row is short of min_new_tokens
    stop_active: torch.Tensor | None = None     # [B] bool
    logprobs: int = 0                              # the most top logprobs any row asked for (0: none asked)
    want_logprobs: list[int] | None = None      # per row


class Sampler:
    """Builds a step's SamplingInputs from its sequences and draws one token per row."""

    def __init__(self, vocab_size: int, device):
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self._vocab_ids = torch.arange(vocab_size, device=self.device)[None]
        self._static_key = None
        self._static = None

    def _tensor(self, values, dtype):
        return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

    def _static_inputs(self, seqs: list[Sequence]) -> dict:
        """Per-batch settings that stay put while the batch does (decode steps reuse them)."""
        key = tuple(s.seq_id for s in seqs)
        if key == self._static_key:
            return self._static
        params = [s.params for s in seqs]
        sampling = [not p.greedy for p in params]
        st = dict(any_sample=any(sampling), all_sample=all(sampling))
        st['logprobs'] = max(p.logprobs for p in params)
        st['want_logprobs'] = [p.logprobs for p in params] if st['logprobs'] else None
        if any(p.repetition_penalty != 1.0 for p in params):
            st['penalty'] = self._tensor([[p.repetition_penalty] for p in params], torch.float32)
        if any(p.min_new_tokens > 0 and p.stop_ids for p in params):
            stops = [sorted(p.stop_ids) or [0] for p in params]
            width = max(len(s) for s in stops)
            st['stop_ids'] = self._tensor([s + s[:1] * (width - len(s)) for s in stops], torch.long)
        if st['any_sample']:
            V = self.vocab_size
            if not st['all_sample']:
                st['do_sample'] = self._tensor(sampling, torch.bool)
            st['temperature'] = self._tensor([[p.temperature if s else 1.0] for p, s in zip(params, sampling)],
                                             torch.float32)
            # rows that do not sample get top_k=1: their draw is thrown away, and they must not widen the set
            top_k = [(min(p.top_k, V) if p.top_k > 0 else V) if s else 1 for p, s in zip(params, sampling)]
            # no limit is an infinite top_p: a sum that rounds up to 1.0 must not drop a row's least likely tokens
            top_p = [p.top_p if s and p.top_p < 1.0 else math.inf for p, s in zip(params, sampling)]
            widest = max(k for k, s in zip(top_k, sampling) if s)
            # one row's top_k=0 (the whole vocabulary) widens the candidate set, never another row's limit
            if any(k < V for k, s in zip(top_k, sampling) if s) or min(top_p) < 1.0:
                st['max_top_k'] = widest
                st['top_k'] = self._tensor(top_k, torch.long)
            if min(top_p) < 1.0:
                st['top_p'] = self._tensor([[p] for p in top_p], torch.float64)
            if any(p.min_p > 0 and s for p, s in zip(params, sampling)):
                st['log_min_p'] = self._tensor([[math.log(p.min_p) if p.min_p > 0 and s else -math.inf]
                                                for p, s in zip(params, sampling)], torch.float32)
        self._static_key, self._static = key, st
        return st

    def prepare(self, seqs: list[Sequence], ahead: int = 0) -> SamplingInputs:
        """`ahead`: tokens each sequence will have drawn before this step's row is sampled but that its host
        record does not show yet (a decode step launched before the previous step's tokens were read back)."""
        st = self._static_inputs(seqs)
        inputs = SamplingInputs(greedy=not st['any_sample'], do_sample=st.get('do_sample'),
                                temperature=st.get('temperature'), top_k=st.get('top_k'),
                                max_top_k=st.get('max_top_k', 0), top_p=st.get('top_p'),
                                log_min_p=st.get('log_min_p'), penalty=st.get('penalty'),
                                stop_ids=st.get('stop_ids'), logprobs=st['logprobs'],
                                want_logprobs=st['want_logprobs'])
        if st['any_sample']:
            inputs.keys = self._tensor([row_key(s.params.seed, s.num_generated + ahead) for s in seqs], torch.long)
        if inputs.penalty is not None:
            assert not ahead, 'a repetition penalty needs every token on the host: no step runs ahead of it'
            width = max(s.num_tokens for s in seqs)
            inputs.history = self._tensor([s.token_ids + s.token_ids[:1] * (width - s.num_tokens) for s in seqs],
                                          torch.long)
        if inputs.stop_ids is not None:
            # a row without stop ids holds padding (token 0) in stop_ids: it must never be masked
            active = [bool(s.params.stop_ids) and s.num_generated + ahead < s.params.min_new_tokens for s in seqs]
            inputs.stop_active = self._tensor(active, torch.bool) if any(active) else None
        return inputs

    def __call__(self, logits: torch.Tensor, inputs: SamplingInputs):
        """Tokens `[B]` (on the device) and, when asked, the raw logprobs `(top_values, top_ids, chosen)`."""
        raw = logits
        logits = self.adjusted(logits, inputs)
        if inputs.greedy:
            tokens = logits.argmax(-1)
        else:
            x, ids = self.candidates(logits, inputs)
            score = x + gumbel_noise(inputs.keys, ids)
            # an exact tie goes to the lower token id: the candidates come in token order or best first, whichever
            # the batch needs, so argmax's first maximum would make the draw depend on the batch
            # (a row of a broken model with NaN scores draws its lowest NaN token: a real id, never vocab_size,
            # which would index past the embedding table on the next step)
            best = (score == score.max(-1, keepdim=True).values) | score.isnan()
            tokens = torch.where(best, ids, self.vocab_size).amin(-1)
            if inputs.do_sample is not None:
                tokens = torch.where(inputs.do_sample, tokens, logits.argmax(-1))
        logprobs = None
        if inputs.logprobs:
            lp = torch.log_softmax(raw, -1)
            top_values, top_ids = lp.topk(min(inputs.logprobs, lp.size(-1)), -1)
            logprobs = (top_values, top_ids, lp.gather(1, tokens[:, None])[:, 0])
        return tokens, logprobs

    def adjusted(self, logits: torch.Tensor, inputs: SamplingInputs) -> torch.Tensor:
        """The logits every row chooses from, greedy or not: repetition penalty applied, stop ids at -inf while a
        row is short of its min_new_tokens."""
        if inputs.penalty is not None:
            seen = logits.gather(1, inputs.history)
            seen = torch.where(seen < 0, seen * inputs.penalty, seen / inputs.penalty)
            logits = logits.scatter(1, inputs.history, seen)
        if inputs.stop_active is not None:
            masked = torch.where(inputs.stop_active[:, None], -math.inf, logits.gather(1, inputs.stop_ids))
            logits = logits.scatter(1, inputs.stop_ids, masked)
        return logits

    def candidates(self, logits: torch.Tensor, inputs: SamplingInputs):
        """What each sampled row draws from: token ids `[B, K]` (or `[1, V]`, the whole vocabulary) and their
        temperature-scaled logits `[B, K]`, -inf where top-k, top-p or min-p dropped the token."""
        x = logits.float() / inputs.temperature
        ids = self._vocab_ids
        if inputs.top_k is not None:
            # the candidates, best first: top-k's set (or the whole vocabulary when some row has no limit)
            keys = rank_keys(x)
            if inputs.max_top_k < self.vocab_size:
                ids = keys.topk(inputs.max_top_k, -1).indices
            else:
                ids = keys.sort(-1, descending=True).indices
            x = x.gather(1, ids)
            rank = torch.arange(x.size(-1), device=x.device)[None]
            x = x.masked_fill(rank >= inputs.top_k[:, None], -math.inf)
            if inputs.top_p is not None:
                # float64: the sums then hardly depend on how many candidates the batch carries
                probs = x.double().softmax(-1)
                # keep a token while the mass before it is short of top_p; the best token always stays
                x = x.masked_fill(probs.cumsum(-1) - probs >= inputs.top_p, -math.inf)
        if inputs.log_min_p is not None:
            # p < min_p * p_max  <=>  logit < max_logit + log(min_p)
            x = x.masked_fill(x < x.max(-1, keepdim=True).values + inputs.log_min_p, -math.inf)
        return x, ids


def rank_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys that order each row of float32 `x` from high to low, equal values by lower token id.

    Unique keys make top-k well defined: a row keeps the same k tokens, in the same order, however wide the
    batch's candidate set is (topk and sort may break ties either way, and bfloat16 logits tie often).
    """
    vocab = x.size(-1)
    bits = (x + 0.0).view(torch.int32).long()          # + 0.0 turns -0.0 into 0.0, which it equals
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)   # negative floats: larger magnitude, smaller key
    return bits * vocab + (vocab - 1 - torch.arange(vocab, device=x.device))


def logprob_dicts(logprobs, want: list[int], tokens: list[int]) -> list[dict[int, float] | None]:
    """Host dicts {token id: logprob}: each row's top-N and its chosen token."""
    top_values, top_ids, chosen = (t.tolist() for t in logprobs)
    out = []
    for n, values, ids, token, lp in zip(want, top_values, top_ids, tokens, chosen):
        if not n:
            out.append(None)
            continue
        row = dict(zip(ids[:n], values[:n]))
        row[token] = lp
        out.append(row)
    return out
