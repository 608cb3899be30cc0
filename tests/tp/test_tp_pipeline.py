"""pipeline(..., PytorchEngineConfig(tp=N)) on the CPU (gloo): the ranks hold shards, and greedy outputs are those
of tp=1, token for token."""
import pytest
from tp_helpers import make_pipe, random_prompts

from lmdp import GenerationConfig


def _greedy(path, prompts, max_new_tokens, **config):
    with make_pipe(path, **config) as pipe:
        responses = pipe(prompts, GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True))
        return [r.token_ids for r in responses]


def test_tp2_greedy_equals_tp1_for_32_prompts(tiny_llama2):
    # lengths 3..70 span 1..5 blocks of 16, so prefill packs several block tables and decode crosses blocks
    prompts = random_prompts(32, 3, 70, seed=1)
    single = _greedy(tiny_llama2, prompts, 12)
    assert _greedy(tiny_llama2, prompts, 12, tp=2) == single


def test_tp4_replicates_two_kv_heads_and_matches_tp1(tiny_llama2):
    prompts = random_prompts(6, 3, 40, seed=2)
    assert _greedy(tiny_llama2, prompts, 6, tp=4) == _greedy(tiny_llama2, prompts, 6)


def test_tp_that_does_not_divide_the_heads_is_refused_before_any_rank_starts(tiny_llama2):
    from lmdp.errors import ConfigError
    with pytest.raises(ConfigError, match=r'tp=3 .*(heads|split)'):
        make_pipe(tiny_llama2, tp=3)
