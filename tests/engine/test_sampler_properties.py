"""The sampler's rules as properties over random batches that mix every setting (hypothesis).

Each row chooses from exactly what its own settings allow -- top-k keeps exactly k (equal logits go to the lower
token id), top-p keeps the token that crosses top_p, min-p keeps p >= min_p * p_max (so min_p=1 keeps the best
token and its ties), the repetition penalty and min_new_tokens' stop-id mask change just their tokens -- and a
seeded request draws the same tokens alone as in any batch, over whole generations. The rules are checked
against `sampler_reference`, written from the definitions; the boundary cases each filter has are pinned by
examples below the properties.
"""
import math

import pytest
import torch
from sampler_reference import adjusted_row, greedy_token, sampled_token, scaled_row, support

from lmdp.engine.sampler import Sampler, gumbel_noise, row_key
from lmdp.engine.scheduler import finish_reason
from lmdp.engine.sequence import SamplingParams, Sequence, SequenceStatus

pytest.importorskip('hypothesis', reason='the property tests need hypothesis (the [test] extra)')
from hypothesis import given, settings, strategies as st  # noqa: E402

# Logits on a coarse grid tie often, as bfloat16 logits do; arbitrary floats put filters' bounds anywhere.
LOGIT = st.one_of(st.integers(-8, 8).map(lambda i: i / 2), st.floats(-12, 12, width=32))


@st.composite
def sampling_params(draw, vocab):
    return SamplingParams(
        max_new_tokens=draw(st.integers(1, 6)),
        min_new_tokens=draw(st.sampled_from([0, 0, 1, 2, 4])),
        greedy=draw(st.sampled_from([True, False, False])),
        temperature=draw(st.one_of(st.sampled_from([0.5, 1.0, 2.0]), st.floats(0.1, 4.0))),
        top_k=draw(st.one_of(st.sampled_from([0, 0, 1]), st.integers(1, vocab + 2))),
        top_p=draw(st.one_of(st.just(1.0), st.floats(0.05, 1.0))),
        min_p=draw(st.one_of(st.sampled_from([0.0, 0.0, 1.0]), st.floats(0.0, 1.0))),
        repetition_penalty=draw(st.one_of(st.just(1.0), st.floats(0.5, 2.0))),
        seed=draw(st.integers(0, 2 ** 63 - 1)),
        stop_ids=draw(st.frozensets(st.integers(0, vocab - 1), max_size=min(3, vocab - 1))))


@st.composite
def steps(draw):
    """One step's batch: per row its logits, settings, prompt and tokens generated so far."""
    vocab = draw(st.integers(2, 24))
    rows = []
    for i in range(draw(st.integers(1, 5))):
        params = draw(sampling_params(vocab))
        tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8))
        num_prompt = draw(st.integers(1, len(tokens)))
        logits = draw(st.lists(LOGIT, min_size=vocab, max_size=vocab))
        rows.append((Sequence(i, tokens, num_prompt, params), logits))
    return vocab, [s for s, _ in rows], torch.tensor([x for _, x in rows], dtype=torch.float32)


def _sample(vocab, seqs, logits, ahead=0):
    """A fresh sampler (its per-batch cache is keyed by sequence ids) on one step."""
    sampler = Sampler(vocab, 'cpu')
    inputs = sampler.prepare(seqs, ahead=ahead)
    return sampler, inputs, sampler(logits, inputs)[0]


def _row_support(x, ids, b):
    row_ids = ids[0] if ids.size(0) == 1 else ids[b]
    return {t: v for t, v in zip(row_ids.tolist(), x[b].tolist()) if v > -math.inf}


@settings(max_examples=300)
@given(steps())
def test_each_row_chooses_from_exactly_what_its_own_settings_allow(step):
    vocab, seqs, logits = step
    sampler, inputs, tokens = _sample(vocab, seqs, logits)
    adjusted = sampler.adjusted(logits, inputs)
    candidates = None if inputs.greedy else sampler.candidates(adjusted, inputs)
    for b, seq in enumerate(seqs):
        p = seq.params
        expected = adjusted_row(logits[b], p, seq.token_ids, seq.num_generated)
        assert torch.equal(adjusted[b], expected), f'row {b}: penalty or stop mask differs'
        if p.greedy:
            assert tokens[b].item() == greedy_token(expected)
            continue
        x = scaled_row(expected, p)
        sure, maybe = support(x, p)
        got = _row_support(*candidates, b)
        assert sure <= set(got) <= sure | maybe, f'row {b} ({p}): kept {sorted(got)}, expected {sorted(sure)}' \
                                                 f' (+ maybe {sorted(maybe)})'
        assert all(v == x[t].item() for t, v in got.items()), 'a kept token must keep its scaled logit'
        assert tokens[b].item() in got
        if not maybe:
            assert tokens[b].item() == sampled_token(x, sure, p.seed, seq.num_generated)


@settings(max_examples=200)
@given(steps(), st.randoms(use_true_random=False))
def test_a_row_draws_the_same_token_alone_and_in_any_batch(step, rng):
    vocab, seqs, logits = step
    order = list(range(len(seqs)))
    rng.shuffle(order)
    _, _, tokens = _sample(vocab, [seqs[i] for i in order], logits[order])
    for j, i in enumerate(order):
        _, _, alone = _sample(vocab, [seqs[i]], logits[i:i + 1])
        assert tokens[j].item() == alone.item(), f'{seqs[i].params} draws {alone.item()} alone, ' \
                                                 f'{tokens[j].item()} in a batch'


@settings(max_examples=100)
@given(steps())
def test_a_step_launched_ahead_of_the_host_draws_what_a_lockstep_step_draws(step):
    """`ahead=1`: the row's previous token is still on the device, its host record one token short."""
    vocab, seqs, logits = step
    seqs = [s for s in seqs if s.num_generated and s.params.repetition_penalty == 1.0]
    if not seqs:
        return
    _, _, lockstep = _sample(vocab, seqs, logits[[s.seq_id for s in seqs]])
    behind = [Sequence(s.seq_id, s.token_ids[:-1], s.num_prompt_tokens, s.params) for s in seqs]
    _, _, ahead = _sample(vocab, behind, logits[[s.seq_id for s in seqs]], ahead=1)
    assert ahead.tolist() == lockstep.tolist()


def test_a_step_launched_ahead_lifts_the_stop_id_mask_on_the_same_token_as_a_lockstep_step():
    """The stop id is the best token. A row whose host record shows n tokens while one more is on the device is
    drawing its token number n + 2: the stop id is allowed from min_new_tokens = n + 1 down."""
    logits = torch.tensor([[0.0, 1.0, 4.0, 0.5]])
    for greedy in (True, False):
        for n in range(3):
            for m in range(n + 4):
                p = SamplingParams(max_new_tokens=10, min_new_tokens=m, greedy=greedy, top_k=2, seed=3,
                                   stop_ids=frozenset({2}))
                behind = Sequence(0, [1] + [3] * n, 1, p)
                _, _, token = _sample(4, [behind], logits, ahead=1)
                assert (token.item() == 2) == (n + 1 >= m), (greedy, n, m, token.item())


class ToyModel:
    """Next-token logits from the last two tokens, on a coarse grid (ties, as in bfloat16), stop ids favoured."""

    def __init__(self, vocab, seed):
        g = torch.Generator().manual_seed(seed)
        self.table = (torch.randn(vocab, vocab, vocab, generator=g) * 2).round() / 2

    def __call__(self, token_ids):
        return self.table[token_ids[-2] if len(token_ids) > 1 else 0, token_ids[-1]]


def generate(model, vocab, requests):
    """Run (prompt, params) requests to the end, batched, as the engine's step loop would; tokens per request."""
    sampler = Sampler(vocab, 'cpu')
    seqs = [Sequence(i, list(prompt), len(prompt), params) for i, (prompt, params) in enumerate(requests)]
    live = list(seqs)
    while live:
        tokens, _ = sampler(torch.stack([model(s.token_ids) for s in live]), sampler.prepare(live))
        for seq, token in zip(live, tokens.tolist()):
            seq.token_ids.append(token)
            if finish_reason(seq, token, session_len=10 ** 6):
                seq.status = SequenceStatus.FINISHED
        live = [s for s in live if not s.is_finished]
    return [s.token_ids[s.num_prompt_tokens:] for s in seqs]


def greedy_generation(model, prompt, p):
    tokens = list(prompt)
    while True:
        token = greedy_token(adjusted_row(model(tokens), p, tokens, len(tokens) - len(prompt)))
        tokens.append(token)
        n = len(tokens) - len(prompt)
        if token in p.stop_ids or n >= p.max_new_tokens:
            return tokens[len(prompt):]


@st.composite
def workloads(draw):
    vocab = draw(st.integers(2, 12))
    requests = [(draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4)), draw(sampling_params(vocab)))
                for _ in range(draw(st.integers(2, 6)))]
    return vocab, draw(st.integers(0, 2 ** 32 - 1)), requests


@settings(max_examples=100)
@given(workloads(), st.randoms(use_true_random=False))
def test_each_request_generates_the_same_tokens_alone_and_in_any_batch(workload, rng):
    vocab, model_seed, requests = workload
    model = ToyModel(vocab, model_seed)
    order = list(range(len(requests)))
    rng.shuffle(order)
    batched = generate(model, vocab, [requests[i] for i in order])
    for j, i in enumerate(order):
        prompt, p = requests[i]
        alone = generate(model, vocab, [requests[i]])[0]
        assert batched[j] == alone, f'request {i} ({p}) alone {alone}, in the batch {batched[j]}'
        stops = [k for k, t in enumerate(alone) if t in p.stop_ids]
        assert len(alone) <= p.max_new_tokens and stops in ([], [len(alone) - 1])
        assert not stops or stops[0] >= p.min_new_tokens, 'a stop id drawn before min_new_tokens'
        if p.greedy:
            assert alone == greedy_generation(model, prompt, p)


# The boundaries, one example each: the properties above leave a hair's breadth around top-p's and min-p's
# bounds undecided, and random logits rarely sit exactly on them.

def _support(logits, **params):
    params = SamplingParams(**dict(dict(max_new_tokens=1, greedy=False), **params))
    logits = torch.tensor([logits], dtype=torch.float32)
    sampler = Sampler(logits.size(-1), 'cpu')
    inputs = sampler.prepare([Sequence(0, [0], 1, params)])
    return sorted(_row_support(*sampler.candidates(sampler.adjusted(logits, inputs), inputs), 0))


@pytest.mark.parametrize('k', [1, 2, 3, 5])
def test_top_k_keeps_exactly_k_tokens_with_ties_to_the_lower_id(k):
    logits = [1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0]
    assert _support(logits, top_k=k) == sorted([1, 3, 2, 4, 5][:k])
    assert _support([0.0, 1e-9, -1.0], top_k=1) == [1]          # logits a hair apart are not a tie


def test_top_p_is_compared_at_the_precision_it_was_given():
    """top_p a hair above the mass before the second token: that token crosses top_p and stays (top_p rounded to
    float32 would fall below that mass and drop it)."""
    for a in (0.3, 0.7, 1.1, 1.9, 2.3, 2.9):
        m = torch.tensor([a, 0.0]).double().softmax(-1)[0].item()
        if torch.tensor(m + 1e-15, dtype=torch.float32).item() < m - 1e-15:
            break
    else:
        pytest.fail('no logits whose mass rounds down in float32: pick others')
    assert _support([a, 0.0], top_p=m + 1e-15) == [0, 1]
    assert _support([a, 0.0], top_p=m - 1e-15) == [0]


def test_top_p_keeps_the_token_that_crosses_it_and_not_one_more():
    logits = [math.log(0.5), math.log(0.3), math.log(0.2)]
    assert _support(logits, top_p=0.45) == [0]
    assert _support(logits, top_p=0.55) == [0, 1]         # token 1 takes the mass from 0.5 past 0.55
    assert _support(logits, top_p=0.85) == [0, 1, 2]
    # two equal halves: the mass before the second is exactly 0.5, which is not short of top_p=0.5
    assert _support([0.0, 0.0], top_p=0.5) == [0]
    assert _support([0.0, 0.0], top_p=0.5001) == [0, 1]


def test_min_p_keeps_a_token_exactly_at_its_threshold():
    for min_p in (0.1, 0.5, 0.9):
        at = torch.tensor(math.log(min_p), dtype=torch.float32)       # p = min_p * p_max, in float32
        below = torch.nextafter(at, torch.tensor(-math.inf))
        assert _support([0.0, at.item(), below.item(), -40.0], min_p=min_p) == [0, 1]


def test_min_p_1_keeps_the_best_token_and_its_ties():
    assert _support([0.5, 2.0, -1.0, 2.0], min_p=1.0) == [1, 3]
    assert _support([0.5, 2.0, -1.0, 1.5], min_p=1.0) == [1]


def test_min_new_tokens_masks_stop_ids_for_exactly_that_many_tokens():
    """The stop id is the model's favourite: it comes as token number min_new_tokens + 1, not later."""
    vocab = 6
    model = lambda tokens: torch.tensor([0.0, 1.0, 2.0, 0.5, 5.0, -1.0])   # noqa: E731 (token 4 always best)
    for greedy in (True, False):
        for m in range(4):
            p = SamplingParams(max_new_tokens=10, min_new_tokens=m, greedy=greedy, top_k=2, stop_ids=frozenset({4}),
                               seed=1)
            out = generate(model, vocab, [([1], p)])[0]
            assert out[-1] == 4 and len(out) == m + 1 and 4 not in out[:-1]


def test_top_k_ranks_minus_zero_and_zero_as_equal():
    """-0.0 == 0.0: the tie goes to the lower token id whichever of the two it holds."""
    assert _support([-0.0, 0.0, -1.0], top_k=1) == [0]
    assert _support([0.0, -0.0, -1.0], top_k=1) == [0]
    assert _support([-1.0, -0.0, 0.0], top_k=2) == [1, 2]


def test_top_k_tells_logits_one_ulp_apart_in_a_wide_vocabulary():
    """The best token is one float32 step above token 0 and has the highest id: no tie, whatever the width."""
    for vocab in (2, 64, 4096):
        logits = [1.0] + [-5.0] * (vocab - 2) + [torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).item()]
        assert _support(logits, top_k=1) == [vocab - 1]
        assert _support(logits, top_k=2) == [0, vocab - 1]


def test_top_p_1_keeps_every_token_however_unlikely_beside_a_top_p_row():
    """The float64 mass before a token 40 nats down rounds to exactly 1.0: a row without a top-p limit must keep
    it all the same, also when another row of the batch brings the top-p op in."""
    vocab = 4
    logits = torch.tensor([[0.0, -40.0, -41.0, -45.0], [0.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(max_new_tokens=1, greedy=False, top_p=1.0, seed=1),
              SamplingParams(max_new_tokens=1, greedy=False, top_p=0.3, seed=2)]
    sampler = Sampler(vocab, 'cpu')
    inputs = sampler.prepare([Sequence(i, [0], 1, p) for i, p in enumerate(params)])
    candidates = sampler.candidates(sampler.adjusted(logits, inputs), inputs)
    assert sorted(_row_support(*candidates, 0)) == [0, 1, 2, 3]
    assert sorted(_row_support(*candidates, 1)) == [0, 1]


def test_a_batch_settings_are_built_once_and_again_when_the_batch_changes():
    """Decode steps of one batch reuse its settings' device tensors (no host-to-device copy per step); another
    batch, even of the same size, gets its own."""
    a = [Sequence(0, [1], 1, SamplingParams(max_new_tokens=4, greedy=False, temperature=0.5, top_k=2, seed=1)),
         Sequence(1, [2], 1, SamplingParams(max_new_tokens=4, greedy=False, temperature=2.0, seed=2))]
    b = [Sequence(2, [1], 1, SamplingParams(max_new_tokens=4, greedy=False, temperature=0.75, top_k=3, seed=3)),
         a[1]]
    sampler = Sampler(8, 'cpu')
    first = sampler.prepare(a)
    assert sampler.prepare(a).temperature is first.temperature and sampler.prepare(a).top_k is first.top_k
    other = sampler.prepare(b)
    assert other.temperature.flatten().tolist() == [0.75, 2.0] and other.top_k.tolist() == [3, 8]
    assert sampler.prepare(a).temperature.flatten().tolist() == [0.5, 2.0]


def test_a_row_draws_the_same_token_alone_and_beside_a_top_k_row_at_an_exact_tie():
    """Logit plus noise equal, in float32, for two tokens: the lower id wins, alone (candidates in token order) and
    beside a top-k row (candidates best first) alike. (argmax's first maximum once took token 0 alone and token 1
    in the batch.)"""
    for seed in range(100):
        g = gumbel_noise(torch.tensor([row_key(seed, 0)]), torch.arange(2)[None])[0]
        x0 = (1.0 + g[1]) - g[0]
        if g[0] > g[1] and x0 + g[0] == 1.0 + g[1]:
            break
    else:
        pytest.fail('no seed gives an exact tie: pick other logits')
    logits = torch.tensor([[x0.item(), 1.0]])
    row = Sequence(0, [0], 1, SamplingParams(max_new_tokens=1, greedy=False, seed=seed))
    top_k = Sequence(1, [0], 1, SamplingParams(max_new_tokens=1, greedy=False, top_k=1, seed=7))
    _, _, alone = _sample(2, [row], logits)
    _, _, batched = _sample(2, [row, top_k], logits.repeat(2, 1))
    assert alone.tolist() == [0] and batched.tolist() == [0, 1]
