"""A request's settings hold whatever shares its batch: one row with no top-k limit must not lift another's.

The bug this pins: a sampled row with top_k=0 made the batch's candidate set the whole vocabulary, and with no row
using top-p the per-row top-k mask was skipped, so every other row sampled without its top-k.
"""
import pytest
import torch

from lmdp import GenerationConfig
from lmdp.engine.sampler import Sampler, logprob_dicts
from lmdp.engine.sequence import SamplingParams, Sequence

TOP1 = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=1, random_seed=3, ignore_eos=True)
UNLIMITED = dict(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0, random_seed=5, ignore_eos=True)


def _draw(logits, params):
    sampler = Sampler(logits.size(-1), 'cpu')
    seqs = [Sequence(i, [1], 1, p) for i, p in enumerate(params)]
    return sampler(logits, sampler.prepare(seqs))[0].tolist()


def test_top_k_holds_beside_a_row_with_no_top_k_limit():
    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    top1 = SamplingParams(max_new_tokens=1, greedy=False, temperature=1.5, top_k=1, seed=3)
    unlimited = SamplingParams(max_new_tokens=1, greedy=False, top_k=0, seed=5)
    best = logits[0].argmax().item()
    assert _draw(logits[:1], [top1]) == [best]
    assert _draw(logits, [top1, unlimited])[0] == best


def test_seeded_top_k_1_request_repeats_its_greedy_tokens_in_a_mixed_batch(pipe, random_prompts):
    prompt, other = random_prompts(2, 6, 12, seed=20)
    greedy = pipe(prompt, GenerationConfig(max_new_tokens=16, ignore_eos=True)).token_ids
    alone = pipe(prompt, GenerationConfig(**TOP1)).token_ids
    mixed = pipe([prompt, other], [GenerationConfig(**TOP1), GenerationConfig(**UNLIMITED)])
    assert alone == greedy
    assert mixed[0].token_ids == alone


def test_logprobs_go_to_the_rows_that_asked_for_them():
    logits = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    asked = [0, 3, 0, 1]
    params = [SamplingParams(max_new_tokens=1, greedy=i % 2 == 0, seed=i, logprobs=n) for i, n in enumerate(asked)]
    sampler = Sampler(16, 'cpu')
    inputs = sampler.prepare([Sequence(i, [1], 1, p) for i, p in enumerate(params)])
    tokens, logprobs = sampler(logits, inputs)
    rows = logprob_dicts(logprobs, inputs.want_logprobs, tokens.tolist())
    assert [r is None for r in rows] == [True, False, True, False]
    expected = torch.log_softmax(logits, -1)
    for b in (1, 3):
        top = expected[b].topk(asked[b]).indices.tolist()
        assert set(rows[b]) == set(top) | {tokens[b].item()}
        assert all(abs(v - expected[b, t].item()) < 1e-6 for t, v in rows[b].items())
    # no row asks: no logprobs at all (the engine reads them back only when there are some)
    none_asked = [SamplingParams(max_new_tokens=1, greedy=i % 2 == 0, seed=i) for i in range(4)]
    inputs = sampler.prepare([Sequence(i + 4, [1], 1, p) for i, p in enumerate(none_asked)])
    assert sampler(logits, inputs)[1] is None


@pytest.mark.gpu
def test_a_seeded_batch_draws_the_same_tokens_on_the_gpu_as_on_the_cpu():
    """The noise is a hash of (seed, position, token), so the device must not matter."""
    if not torch.cuda.is_available():
        pytest.skip('needs a CUDA device')
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 1000, generator=g) * 3
    settings = [dict(top_k=0), dict(top_k=1), dict(top_k=40), dict(top_p=0.9), dict(min_p=0.1),
                dict(top_k=20, top_p=0.8, min_p=0.05, temperature=0.7), dict(greedy=True)]
    params = [SamplingParams(**dict(dict(max_new_tokens=1, greedy=False, seed=i, repetition_penalty=1.2),
                                    **settings[i % len(settings)])) for i in range(64)]
    seqs = [Sequence(i, [i % 7, 3], 2, p) for i, p in enumerate(params)]
    drawn = []
    for device in ('cpu', 'cuda'):
        sampler = Sampler(1000, device)
        drawn.append(sampler(logits.to(device), sampler.prepare(seqs))[0].tolist())
    assert drawn[0] == drawn[1]
