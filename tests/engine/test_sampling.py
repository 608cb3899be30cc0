"""Sampling: seeds repeat, top_k=1 is greedy, and sampled frequencies follow the filtered distribution.

The statistical check. For a distribution p over K categories and the empirical distribution p^ of n independent
draws, Weissman et al. (2003, "Inequalities for the L1 deviation of the empirical distribution") give
    P(||p^ - p||_1 >= e) <= (2^K - 2) exp(-n e^2 / 2),
so TV(p^, p) = ||p^ - p||_1 / 2 stays below
    tol(K, n, delta) = sqrt(2 (K ln 2 + ln(1/delta)) / n) / 2
with probability at least 1 - delta. We take delta = 1e-6: a correct sampler fails one check about once in a
million seed sets (and the seeds are fixed, so the test is deterministic). Tokens whose expected count is below 20
are pooled into one category, which keeps K, and so the tolerance, small (n = 4000 and K <= 40 give tol <= 0.072).
The check has power: a sampler drawing from a wrong q has TV(p^, p) >= TV(q, p) - tol, so every test also asserts
that the distributions of plausible bugs (a filter left out, or applied in another order) are more than
2 tol away from p, and would therefore fail. On top, no token outside the filtered support may be drawn at all.
"""
import math

import pytest
import torch

from lmdp import GenerationConfig
from lmdp.engine.sampler import Sampler
from lmdp.engine.sequence import SamplingParams, Sequence

N = 4000
DELTA = 1e-6
PROMPT = [1, 300, 200, 100, 50, 25]


def reference(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The filtered distribution, in float64, written independently of the sampler (transformers' order:
    temperature, top-k, top-p on the renormalised top-k set, min-p)."""
    x = logits.double() / temperature
    order = x.argsort(descending=True)
    keep = torch.ones_like(x, dtype=torch.bool)
    if top_k:
        keep[:] = False
        keep[order[:top_k]] = True
    probs = torch.where(keep, x, -math.inf).softmax(-1)[order]
    mass_before = probs.cumsum(0) - probs
    keep[order[mass_before >= top_p]] = False
    probs = torch.where(keep, x, -math.inf).softmax(-1)
    keep &= probs >= min_p * probs.max()
    return torch.where(keep, x, -math.inf).softmax(-1)


def pooled(p, values):
    """`values` over p's categories: each token p expects at least 20 times, then the rest pooled into one."""
    big = p * N >= 20
    return torch.cat([values[big], values[~big].sum()[None]])


def tolerance(k):
    return math.sqrt(2 * (k * math.log(2) + math.log(1 / DELTA)) / N) / 2


def check_frequencies(tokens, p, wrong):
    """The draws `tokens` follow `p`; each distribution in `wrong` would have been caught."""
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0, f'drew tokens outside the support: {torch.nonzero(counts * (p == 0))[:5]}'
    p_b, c_b = pooled(p, p), pooled(p, counts)
    tol = tolerance(p_b.numel())
    tv = 0.5 * (c_b / N - p_b).abs().sum().item()
    assert tv <= tol, f'TV {tv:.4f} > tolerance {tol:.4f} over {p_b.numel()} categories'
    for name, q in wrong.items():
        q_b = pooled(p, q)
        distance = 0.5 * (q_b - p_b).abs().sum().item()
        assert distance > 2 * tol, f'the check could not tell p from {name} (TV {distance:.3f}, tol {tol:.3f})'
    return tv, tol


@pytest.fixture(scope='module')
def position_logits(pipe):
    return pipe.get_logits(PROMPT)[0][-1]


def draw(logits, n=N, seed0=0, **gen):
    """n draws at one position by the engine's sampler, one request per seed."""
    params = dict(max_new_tokens=1, greedy=False, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    params.update(gen)
    seqs = [Sequence(i, list(PROMPT), len(PROMPT), SamplingParams(**dict(params, seed=seed0 + i)))
            for i in range(n)]
    sampler = Sampler(logits.numel(), 'cpu')
    tokens, _ = sampler(logits.expand(n, -1).clone(), sampler.prepare(seqs))
    return tokens


def _late_temperature(logits, g):
    """A bug: cut-offs chosen at temperature 1, temperature applied afterwards."""
    support = reference(logits, **dict(g, temperature=1.0)) > 0
    return torch.where(support, logits.double() / g['temperature'], -math.inf).softmax(-1)


def _top_p_before_top_k(logits, g):
    """A bug: top-p measured over the whole vocabulary instead of the renormalised top-k set."""
    q = reference(logits, **dict(g, top_k=0)) * (reference(logits, temperature=g['temperature'], top_k=g['top_k']) > 0)
    return q / q.sum()


def _without(name, neutral):
    return f'no {name}', lambda logits, g: reference(logits, **dict(g, **{name: neutral}))


# Top-k, top-p and min-p each keep a prefix of the tokens sorted by probability, so in one request only the
# shortest prefix binds; each filter gets a case of its own, and the combined case pins the order of operations.
CASES = {
    'temperature': (dict(temperature=0.5), [_without('temperature', 1.0)]),
    'top_k': (dict(top_k=8), [_without('top_k', 0)]),
    'top_p': (dict(temperature=0.5, top_p=0.5), [_without('top_p', 1.0), _without('temperature', 1.0)]),
    'min_p': (dict(min_p=0.6), [_without('min_p', 0.0)]),
    'all four': (dict(temperature=0.3, top_k=8, top_p=0.6, min_p=0.1),
                 [_without('temperature', 1.0), _without('top_k', 0), _without('top_p', 1.0),
                  ('temperature after the cut-offs', _late_temperature),
                  ('top-p before top-k', _top_p_before_top_k)]),
}


def _case(logits, name):
    gen, wrong = CASES[name]
    return gen, reference(logits, **gen), {label: q(logits, gen) for label, q in wrong}


@pytest.mark.parametrize('case', list(CASES))
def test_4000_seeded_draws_follow_the_filtered_distribution(position_logits, case):
    gen, p, wrong = _case(position_logits, case)
    check_frequencies(draw(position_logits, **gen), p, wrong)


def test_4000_requests_through_the_pipeline_follow_the_distribution(pipe, position_logits):
    gen, p, wrong = _case(position_logits, 'all four')
    configs = [GenerationConfig(max_new_tokens=1, do_sample=True, random_seed=i, ignore_eos=True, **gen)
               for i in range(N)]
    responses = pipe([PROMPT] * N, configs)
    tokens = torch.tensor([r.token_ids[0] for r in responses])
    # the same seeds give the same draws as the bare sampler: the seed reaches it unchanged
    assert torch.equal(tokens, draw(position_logits, **gen))
    check_frequencies(tokens, p, wrong)


def test_seeded_runs_repeat_and_do_not_depend_on_the_batch(pipe, random_prompts):
    prompts = random_prompts(3, 5, 20, seed=21)
    gen = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0, random_seed=7,
                           ignore_eos=True)
    first = [r.token_ids for r in pipe(prompts, gen)]
    assert first == [r.token_ids for r in pipe(prompts, gen)]
    # alone, or beside other (unseeded) requests, a seeded request draws the same tokens
    noisy = GenerationConfig(max_new_tokens=16, do_sample=True, top_k=0, ignore_eos=True)
    mixed = pipe([prompts[1]] + prompts, [gen, noisy, noisy, noisy])
    assert mixed[0].token_ids == first[1] == pipe(prompts[1], gen).token_ids
    other_seed = GenerationConfig(**dict(vars(gen), random_seed=8))
    assert pipe(prompts[1], other_seed).token_ids != first[1]


def test_top_k_1_equals_greedy(pipe, random_prompts):
    prompts = random_prompts(4, 5, 30, seed=22)
    greedy = pipe(prompts, GenerationConfig(max_new_tokens=16, ignore_eos=True))
    top1 = pipe(prompts, GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=1,
                                          ignore_eos=True))
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]
    sampled = pipe(prompts, GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=0,
                                             random_seed=0, ignore_eos=True))
    assert [r.token_ids for r in sampled] != [r.token_ids for r in greedy]


def test_logprobs_are_the_raw_model_logprobs(pipe, position_logits):
    out = pipe(PROMPT, GenerationConfig(max_new_tokens=3, logprobs=4, ignore_eos=True))
    assert len(out.logprobs) == 3
    expected = torch.log_softmax(position_logits, -1)
    first = out.logprobs[0]
    top4 = expected.topk(4)
    assert set(top4.indices.tolist()) <= set(first) and out.token_ids[0] in first
    for token, lp in first.items():
        assert abs(lp - expected[token].item()) < 1e-5
