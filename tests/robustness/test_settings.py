"""GenerationConfig and PytorchEngineConfig check every field whenever it is set: a wrong type is a TypeError and a
wrong value a ValueError, each naming the field; a refused value is never stored."""
import math
from dataclasses import fields

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lmdp import GenerationConfig, PytorchEngineConfig

# (field, value, error type, words the message must hold besides the field's name)
BAD_GENERATION = [
    ('temperature', '0.5', TypeError, ["got str '0.5'"]),
    ('temperature', -0.5, ValueError, ['>= 0 (0 means greedy)']),
    ('temperature', math.inf, ValueError, ['inf']),
    ('random_seed', 1.5, TypeError, ['an integer or None', 'float 1.5']),
    ('random_seed', '7', TypeError, ["str '7'"]),
    ('stop_token_ids', ['a'], TypeError, ['stop_token_ids[0]', "str 'a'"]),
    ('stop_token_ids', [3, -1], ValueError, ['stop_token_ids[1]', '>= 0']),
    ('stop_token_ids', 'eos', TypeError, ['a list of integers']),
    ('stop_token_ids', [True], TypeError, ['bool']),
    ('do_sample', 1, TypeError, ['True or False', 'int 1']),
    ('ignore_eos', 'no', TypeError, ['True or False']),
    ('max_new_tokens', True, TypeError, ['an integer', 'bool True']),
    ('max_new_tokens', 8.0, TypeError, ['an integer', 'float 8.0']),
    ('max_new_tokens', -1, ValueError, ['>= 0, got -1']),
    ('min_new_tokens', -2, ValueError, ['>= 0, got -2']),
    ('top_k', 2.0, TypeError, ['an integer']),
    ('top_k', -1, ValueError, ['>= 0']),
    ('top_p', 0.0, ValueError, ['(0, 1]']),
    ('top_p', math.nan, ValueError, ['nan']),
    ('top_p', 1.5, ValueError, ['(0, 1]']),
    ('min_p', 2.0, ValueError, ['[0, 1]']),
    ('repetition_penalty', 0, ValueError, ['> 0 (1: none)']),
    ('logprobs', '3', TypeError, ['an integer or None']),
    ('logprobs', -1, ValueError, ['>= 0']),
    ('stop_words', 5, TypeError, ['a list of strings', 'int']),
    ('stop_words', ['ok', ''], ValueError, ['stop_words[1]', 'empty']),
    ('stop_words', ['\ud800'], ValueError, ['stop_words[0]', 'not valid Unicode']),
    ('skip_special_tokens', None, TypeError, ['True or False']),
]


@pytest.mark.parametrize('name, value, error_type, words', BAD_GENERATION)
def test_a_bad_generation_setting_is_refused_in_the_constructor_and_later(name, value, error_type, words):
    with pytest.raises(error_type) as info:
        GenerationConfig(**{name: value})
    for word in [f'GenerationConfig.{name}'.split('[')[0]] + words:
        assert word in str(info.value), f'{word!r} not in {info.value}'
    g = GenerationConfig()
    before = getattr(g, name)
    with pytest.raises(error_type):
        setattr(g, name, value)
    assert getattr(g, name) == before, 'a refused value was stored'


def test_a_misspelt_field_is_refused_not_stored():
    g = GenerationConfig()
    with pytest.raises(AttributeError, match="GenerationConfig has no field 'temprature'; its fields: max_new_tokens"):
        g.temprature = 0.2
    with pytest.raises(AttributeError, match="PytorchEngineConfig has no field 'session_length'"):
        PytorchEngineConfig().session_length = 4096


def test_numpy_numbers_are_taken_as_plain_ones():
    g = GenerationConfig(max_new_tokens=np.int64(5), temperature=np.float32(0.5), stop_token_ids=np.int32(7),
                         do_sample=np.bool_(True))
    assert (g.max_new_tokens, g.temperature, g.stop_token_ids, g.do_sample) == (5, 0.5, [7], True)
    assert type(g.max_new_tokens) is int and type(g.temperature) is float and type(g.do_sample) is bool


BAD_ENGINE = [
    ('session_len', '4096', TypeError, ["str '4096'"]),
    ('session_len', 0, ValueError, ['>= 1']),
    ('block_size', 48, ValueError, ['power of two']),
    ('num_gpu_blocks', -1, ValueError, ['>= 0']),
    ('cache_max_entry_count', 0, ValueError, ['(0, 1]']),
    ('cache_max_entry_count', '0.5', TypeError, ['a number']),
    ('device_type', 'tpu', ValueError, ["'auto', 'cuda', 'cpu'", "'tpu'"]),
    ('eager_mode', 'yes', TypeError, ['True or False']),
    ('tp', 0, ValueError, ['>= 1', 'got 0']),
    ('tp', '2', TypeError, ["str '2'"]),
    ('cudagraph_capture_batch_sizes', [1, 0], ValueError, ['cudagraph_capture_batch_sizes[1]', '>= 1']),
    ('max_prefill_token_num', 0, ValueError, ['>= 1']),
    ('dtype', 16, TypeError, ["'auto', 'float32', 'float16' or 'bfloat16'"]),
]


@pytest.mark.parametrize('name, value, error_type, words', BAD_ENGINE)
def test_a_bad_engine_setting_is_refused(name, value, error_type, words):
    with pytest.raises(error_type) as info:
        PytorchEngineConfig(**{name: value})
    for word in [f'PytorchEngineConfig.{name}'] + words:
        assert word in str(info.value), f'{word!r} not in {info.value}'


_ANYTHING = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                      st.text(max_size=5), st.lists(st.integers(-3, 600), max_size=3),
                      st.lists(st.text(max_size=3), max_size=2), st.dictionaries(st.text(max_size=2), st.integers()))


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from([f.name for f in fields(GenerationConfig)]), value=_ANYTHING)
def test_any_value_is_stored_checked_or_refused_by_name(name, value):
    """Whatever a field is set to, the config either holds a value that passes its check again, or raises a
    TypeError/ValueError naming the field and keeps the old value."""
    g = GenerationConfig()
    before = getattr(g, name)
    try:
        setattr(g, name, value)
    except (TypeError, ValueError) as e:
        assert f'GenerationConfig.{name}' in str(e)
        assert getattr(g, name) == before
        return
    stored = getattr(g, name)
    assert GenerationConfig(**{name: stored}) == g      # what was stored passes the checks as it stands
