"""Prefix caching: a prompt that shares full blocks with an earlier one reuses them and gives the same output."""
from lmdp import GenerationConfig


def test_second_request_reuses_a_three_block_prefix(tiny2, make_pipe, random_prompts):
    shared = random_prompts(1, 48, 48, seed=11)[0]             # exactly three 16-token blocks
    first = shared + random_prompts(1, 6, 6, seed=12)[0][1:]
    second = shared + random_prompts(1, 10, 10, seed=13)[0][1:]
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True)

    pipe = make_pipe(tiny2, enable_prefix_caching=True)
    stats = pipe.engine.block_manager.stats
    pipe(first, gen)
    assert stats.hit_blocks == 0
    computed = pipe.engine.stats.prefill_tokens
    out = pipe(second, gen)
    assert stats.hit_blocks == 3 and stats.hit_tokens == 48
    assert pipe.engine.stats.prefill_tokens - computed == len(second) - 48   # only the tail was computed
    assert out.token_ids == make_pipe(tiny2)(second, gen).token_ids
    assert pipe.engine.block_manager.num_used == 0


def test_running_requests_share_blocks_and_a_whole_prompt_match_still_computes_a_token(tiny2, make_pipe,
                                                                                     random_prompts):
    prompt = random_prompts(1, 32, 32, seed=14)[0]            # two full blocks and nothing else
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    pipe = make_pipe(tiny2, enable_prefix_caching=True)
    alone = pipe(prompt, gen)
    # the same prompt again: only one block can be reused, the last token is recomputed for its logits
    again = pipe(prompt, gen)
    assert pipe.engine.block_manager.stats.hit_blocks == 1
    assert again.token_ids == alone.token_ids
    # two at once: the first block is held by both; the longer one can also take the second full block
    both = pipe([prompt, prompt + [9, 10]], gen)
    assert pipe.engine.block_manager.stats.hit_blocks == 1 + 1 + 2
    assert both[0].token_ids == alone.token_ids
    assert pipe.engine.block_manager.num_used == 0
