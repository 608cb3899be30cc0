"""Bad input gives a clear error, and a bad request in a batch leaves the good ones beside it alone."""
import pytest

from lmdp import GenerationConfig, PytorchEngineConfig


@pytest.mark.parametrize('kwargs, words', [
    (dict(max_new_tokens=-1), 'max_new_tokens must be an integer >= 0'),
    (dict(top_p=0.0), r'top_p must be in \(0, 1\]'),
    (dict(top_p=1.5), r'top_p must be in \(0, 1\]'),
    (dict(temperature=-0.5), 'temperature must be >= 0'),
    (dict(top_k=-1), 'top_k must be an integer >= 0'),
    (dict(min_p=2.0), 'min_p must be in'),
])
def test_bad_generation_config(kwargs, words):
    with pytest.raises(ValueError, match=words):
        GenerationConfig(**kwargs)


def test_missing_custom_module_map(tmp_path):
    missing = tmp_path / 'nope' / 'module_map.py'
    with pytest.raises(FileNotFoundError, match='custom_module_map .*nope/module_map.py.* does not exist'):
        PytorchEngineConfig(custom_module_map=str(missing))


def test_bad_engine_config():
    with pytest.raises(ValueError, match='block_size must be a power of two'):
        PytorchEngineConfig(block_size=48)
    with pytest.raises(ValueError, match='cache_max_entry_count'):
        PytorchEngineConfig(cache_max_entry_count=1.5)


def test_bad_requests_in_a_batch_leave_the_good_ones_alone(pipe):
    session_len = pipe.engine.session_len
    good = [[1, 20, 21, 22], 'Tell me a story']
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    alone = pipe(good, gen)
    batch = ['', good[0], [1] * session_len, [], good[1], [1, 9999], 3.5]
    out = pipe(batch, gen)
    assert [r.finish_reason for r in out] == ['error', 'length', 'error', 'error', 'length', 'error', 'error']
    assert 'prompt is empty' in out[0].error and 'prompt is empty' in out[3].error
    assert f'session_len is {session_len}' in out[2].error
    assert 'outside the vocabulary' in out[5].error
    assert 'a prompt must be a string' in out[6].error
    assert [out[1].token_ids, out[4].token_ids] == [r.token_ids for r in alone]
    assert [r.index for r in out] == list(range(len(batch)))
    assert pipe.engine.block_manager.num_used == 0


def test_a_single_bad_prompt_and_bad_calls(pipe):
    out = pipe('', GenerationConfig(max_new_tokens=3))
    assert out.finish_reason == 'error' and 'empty' in out.error and out.text == ''
    with pytest.raises(ValueError, match='no prompts given'):
        pipe([])
    with pytest.raises(ValueError, match='2 generation configs for 3 prompts'):
        pipe(['a', 'b', 'c'], [GenerationConfig(), GenerationConfig()])
