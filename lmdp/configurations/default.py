"""The builder for llama-like configs, asked after every other builder."""
from ..config import ModelConfig
from .builder import AutoModelConfigBuilder


def head_dim_of(hf_config) -> int:
    """`head_dim` when the config sets it, else hidden_size / num_attention_heads."""
    head_dim = getattr(hf_config, 'head_dim', None)
    if head_dim:
        return head_dim
    hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
    if hidden % heads:
        from ..errors import ConfigError
        raise ConfigError(f'hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) and config.json '
                          'sets no head_dim; set head_dim explicitly')
    return hidden // heads


def sliding_window_of(hf_config) -> int:
    """The window when every layer slides (qwen2 gates it with use_sliding_window; `layer_types` may name only
    some layers sliding), else -1: then the port reads each layer's window from hf_config."""
    window = getattr(hf_config, 'sliding_window', None)
    if not window or getattr(hf_config, 'use_sliding_window', True) is False:
        return -1
    layer_types = getattr(hf_config, 'layer_types', None)
    if layer_types and any(t != 'sliding_attention' for t in layer_types):
        return -1
    return window


def llama_like_config(hf_config, **overrides) -> ModelConfig:
    """ModelConfig from the field names most HF decoder configs share."""
    num_kv_heads = getattr(hf_config, 'num_key_value_heads', None) or hf_config.num_attention_heads
    fields = dict(hidden_size=hf_config.hidden_size,
                  num_layers=hf_config.num_hidden_layers,
                  num_attention_heads=hf_config.num_attention_heads,
                  num_key_value_heads=num_kv_heads,
                  bos_token_id=getattr(hf_config, 'bos_token_id', None),
                  eos_token_id=getattr(hf_config, 'eos_token_id', None),
                  head_dim=head_dim_of(hf_config),
                  vocab_size=hf_config.vocab_size,
                  sliding_window=sliding_window_of(hf_config),
                  tie_word_embeddings=bool(getattr(hf_config, 'tie_word_embeddings', False)),
                  max_position_embeddings=getattr(hf_config, 'max_position_embeddings', None))
    fields.update(overrides)
    return ModelConfig(**fields)


@AutoModelConfigBuilder.register_default
class DefaultModelConfigBuilder(AutoModelConfigBuilder):

    @classmethod
    def condition(cls, hf_config):
        return True

    @classmethod
    def build(cls, hf_config, model_path: str = None, **kwargs):
        return llama_like_config(hf_config)


#: the fields llama_like_config reads that transformers would otherwise fill with a silent default
REQUIRED_FIELDS = ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'vocab_size')


def unset_required_fields(raw_config: dict, hf_config, fields=REQUIRED_FIELDS):
    """Required fields config.json does not set itself (directly or under the family's own name)."""
    aliases = getattr(hf_config, 'attribute_map', {}) or {}
    return [f for f in fields if f not in raw_config and aliases.get(f) not in raw_config]

#: built-in builders that read REQUIRED_FIELDS by these names (a user's builder may read others)
BUILTIN_BUILDERS = ('DefaultModelConfigBuilder', 'LlamaModelConfigBuilder', 'GemmaModelConfigBuilder')
