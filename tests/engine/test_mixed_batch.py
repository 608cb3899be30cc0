"""A request's settings hold whatever shares its batch: one row with no top-k limit must not lift another's.

The bug this pins: a sampled row with top_k=0 made the batch's candidate set the whole vocabulary, and with no row
using top-p the per-row top-k mask was skipped, so every other row sampled without its top-k.
"""
import torch

from lmdp import GenerationConfig
from lmdp.engine.sampler import Sampler
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
