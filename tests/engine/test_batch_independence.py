"""The README's promise through the whole engine: a request with a seed gets the same tokens whatever shares its
batch (hypothesis over mixed batches of every sampling setting, on the tiny llama).

The sampler-level properties (test_sampler_properties.py) cover many more settings; this one checks that the
engine around the sampler -- scheduling, decode steps launched ahead of the host, the per-batch settings cache --
keeps the promise too.
"""
import pytest

from lmdp import GenerationConfig

pytest.importorskip('hypothesis', reason='the property tests need hypothesis (the [test] extra)')
from hypothesis import given, settings, strategies as st  # noqa: E402


@st.composite
def generation_configs(draw):
    return GenerationConfig(
        max_new_tokens=draw(st.integers(1, 8)),
        min_new_tokens=draw(st.sampled_from([None, 2])),
        do_sample=draw(st.booleans()),
        temperature=draw(st.sampled_from([0.0, 0.7, 1.0, 1.5])),
        top_k=draw(st.sampled_from([0, 1, 5, 50])),
        top_p=draw(st.sampled_from([1.0, 0.9, 0.5])),
        min_p=draw(st.sampled_from([0.0, 0.1, 1.0])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.3])),
        random_seed=draw(st.integers(0, 2 ** 32)),
        # stop ids among the tokens this model likes after its prompts (seen in greedy runs), or none
        stop_token_ids=draw(st.sampled_from([None, [7], [100, 200]])),
        ignore_eos=True)


@settings(max_examples=15)
@given(st.lists(generation_configs(), min_size=2, max_size=5), st.integers(0, 1000))
def test_each_request_gets_its_solo_tokens_in_any_mixed_batch(pipe, random_prompts, gens, prompt_seed):
    prompts = random_prompts(len(gens), 3, 12, seed=prompt_seed)
    batched = pipe(prompts, gens)
    for prompt, gen, got in zip(prompts, gens, batched):
        alone = pipe(prompt, gen)
        assert (got.token_ids, got.finish_reason) == (alone.token_ids, alone.finish_reason), gen
