"""ConfigBuilders and ModelConfig."""
import json

import pytest
import torch
import transformers

from lmdp.config import ModelConfig
from lmdp.configurations import AutoModelConfigBuilder, DefaultModelConfigBuilder
from lmdp.errors import ConfigError


def test_llama_config_is_normalised(tiny_llama):
    cfg = ModelConfig.from_pretrained(tiny_llama)
    hf = transformers.AutoConfig.from_pretrained(tiny_llama)
    assert (cfg.hidden_size, cfg.num_layers) == (hf.hidden_size, hf.num_hidden_layers)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (hf.num_attention_heads, hf.num_key_value_heads)
    assert cfg.head_dim == hf.hidden_size // hf.num_attention_heads
    assert cfg.eos_token_id == [hf.eos_token_id]
    assert cfg.dtype == torch.float32 and cfg.model_arch == 'LlamaForCausalLM'
    assert cfg.k_head_dim == cfg.v_head_dim == cfg.head_dim
    assert ModelConfig.from_pretrained(tiny_llama, dtype='bfloat16').dtype == torch.bfloat16


def test_gemma_builders_pick_head_dim_and_window():
    gemma = transformers.AutoConfig.for_model('gemma', hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                              head_dim=32, num_hidden_layers=2, intermediate_size=96, vocab_size=100)
    assert AutoModelConfigBuilder.find_builder(gemma).__name__ == 'GemmaModelConfigBuilder'
    cfg = ModelConfig.from_hf_config(gemma)
    assert cfg.head_dim == 32 and cfg.num_key_value_heads == 1
    gemma2 = transformers.AutoConfig.for_model('gemma2', hidden_size=64, num_attention_heads=4, head_dim=24,
                                               num_key_value_heads=2, num_hidden_layers=2, vocab_size=100,
                                               sliding_window=16)
    cfg2 = ModelConfig.from_hf_config(gemma2)
    assert cfg2.head_dim == 24 and cfg2.sliding_window == -1   # only every other layer slides


@pytest.mark.parametrize('max_window_layers, window', [(0, 16), (1, -1)])
def test_a_model_wide_window_only_when_every_layer_slides(max_window_layers, window):
    """Qwen2 slides from layer max_window_layers on: the model-wide figure is the window only if that is all."""
    qwen2 = transformers.AutoConfig.for_model('qwen2', hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                              num_hidden_layers=3,
                                              vocab_size=100, use_sliding_window=True, sliding_window=16,
                                              max_window_layers=max_window_layers)
    assert ModelConfig.from_hf_config(qwen2).sliding_window == window
    gemma3 = transformers.AutoConfig.for_model('gemma3_text', hidden_size=64, num_attention_heads=4, head_dim=16,
                                               num_key_value_heads=2,
                                               num_hidden_layers=2, vocab_size=100, sliding_window=16)
    assert AutoModelConfigBuilder.find_builder(gemma3).__name__ == 'GemmaModelConfigBuilder'
    assert ModelConfig.from_hf_config(gemma3).head_dim == 16


def test_user_builder_defined_later_wins_and_default_is_last():
    hf = transformers.AutoConfig.for_model('llama', hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                           vocab_size=100)
    assert AutoModelConfigBuilder.find_builder(hf).__name__ == 'LlamaModelConfigBuilder'

    class MyLlamaBuilder(AutoModelConfigBuilder):
        @classmethod
        def condition(cls, hf_config):
            return hf_config.model_type == 'llama'

        @classmethod
        def build(cls, hf_config, model_path=None):      # the seed's signature, without **kwargs
            return ModelConfig(hidden_size=hf_config.hidden_size, num_layers=hf_config.num_hidden_layers,
                               num_attention_heads=hf_config.num_attention_heads, num_key_value_heads=1,
                               bos_token_id=1, eos_token_id=2, head_dim=16, vocab_size=hf_config.vocab_size)
    try:
        assert AutoModelConfigBuilder.find_builder(hf) is MyLlamaBuilder
        assert ModelConfig.from_hf_config(hf).num_key_value_heads == 1
        assert AutoModelConfigBuilder.builders()[0] is MyLlamaBuilder
        assert AutoModelConfigBuilder.builders()[-1] is DefaultModelConfigBuilder
    finally:
        AutoModelConfigBuilder._sub_classes.remove(MyLlamaBuilder)
    assert AutoModelConfigBuilder.find_builder(hf).__name__ == 'LlamaModelConfigBuilder'


def test_unknown_family_falls_back_to_default_builder():
    hf = transformers.AutoConfig.for_model('phi3', hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                           vocab_size=100, num_key_value_heads=4)
    assert AutoModelConfigBuilder.find_builder(hf) is DefaultModelConfigBuilder
    assert ModelConfig.from_hf_config(hf).head_dim == 16


@pytest.mark.parametrize('bad, words', [
    (dict(num_attention_heads=6, num_key_value_heads=4), 'not a multiple of num_key_value_heads'),
    (dict(hidden_size=0), 'hidden_size must be a positive integer'),
])
def test_model_config_rejects_impossible_values(bad, words):
    fields = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                  eos_token_id=[2, 3], head_dim=16, vocab_size=100)
    fields.update(bad)
    with pytest.raises(ConfigError, match=words):
        ModelConfig(**fields)


def test_missing_required_field_is_refused_not_defaulted(tiny_llama, tmp_path):
    cfg = json.load(open(f'{tiny_llama}/config.json'))
    del cfg['num_attention_heads']
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match='does not set num_attention_heads'):
        ModelConfig.from_pretrained(str(tmp_path))
