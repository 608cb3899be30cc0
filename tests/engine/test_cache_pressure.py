"""Under cache pressure requests are preempted and recomputed, and still give exactly what they give unhindered."""
import random

import pytest

from lmdp import GenerationConfig

BLOCK = 16


def _requests(random_prompts, n=200, seed=0, new_tokens=(2, 14)):
    prompts = random_prompts(n, 4, 60, seed=seed)
    rng = random.Random(seed)
    configs = [GenerationConfig(max_new_tokens=rng.randint(*new_tokens), ignore_eos=True) for _ in prompts]
    return prompts, configs


def _blocks_at_end(prompts, configs):
    return [-(-(len(p) + g.max_new_tokens) // BLOCK) for p, g in zip(prompts, configs)]


# Prefill first admits every prompt that fits, and the decodes that follow run out of blocks even with short outputs.
# With mixed prefill the decodes take their blocks before any prompt is admitted, so the pool runs out only when the
# running sequences outgrow it: longer outputs (fewer requests keep the run short).
@pytest.mark.parametrize('mixed, n, new_tokens', [(False, 200, (2, 14)), (True, 100, (20, 60))],
                         ids=['prefill-first', 'mixed'])
def test_requests_under_pressure_equal_an_unconstrained_run(tiny2, make_pipe, random_prompts, mixed, n, new_tokens):
    prompts, configs = _requests(random_prompts, n, new_tokens=new_tokens)
    need = _blocks_at_end(prompts, configs)
    free_run = make_pipe(tiny2, max_batch_size=256, num_gpu_blocks=sum(need), mixed_prefill=mixed)
    expected = free_run(prompts, configs)
    assert free_run.engine.scheduler.num_preemptions == 0

    # room for about a third of the requests at their full length
    tight = make_pipe(tiny2, max_batch_size=256, num_gpu_blocks=sum(need) // 3, max_prefill_token_num=512,
                      mixed_prefill=mixed)
    got = tight(prompts, configs)
    engine = tight.engine
    assert engine.scheduler.num_preemptions > 0, 'the pool was not tight enough to preempt anything'
    assert engine.stats.prefill_tokens > sum(len(p) for p in prompts), 'preempted requests were not recomputed'
    for g, e, c in zip(got, expected, configs):
        assert g.finish_reason == 'length' and len(g.token_ids) == c.max_new_tokens
        assert g.token_ids == e.token_ids
    assert engine.block_manager.num_used == 0 and engine.block_manager.num_free == engine.block_manager.num_blocks
    assert not engine.scheduler.has_unfinished()


def test_pressure_with_prefix_caching_shares_evicts_and_still_agrees(tiny2, make_pipe, random_prompts):
    # 60 requests over four shared 40-token heads: blocks are shared, cached, evicted and revived
    rng = random.Random(1)
    heads = random_prompts(4, 40, 40, seed=7)
    tails = random_prompts(60, 2, 20, seed=8)
    prompts = [heads[rng.randrange(4)] + t[1:] for t in tails]
    configs = [GenerationConfig(max_new_tokens=rng.randint(2, 10), ignore_eos=True) for _ in prompts]
    expected = make_pipe(tiny2, max_batch_size=256, num_gpu_blocks=1024)(prompts, configs)
    tight = make_pipe(tiny2, max_batch_size=256, enable_prefix_caching=True, mixed_prefill=False,
                      num_gpu_blocks=sum(_blocks_at_end(prompts, configs)) // 3)
    got = tight(prompts, configs)
    engine = tight.engine
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.stats.hit_blocks > 0
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert engine.block_manager.num_used == 0
