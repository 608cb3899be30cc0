"""`ModelConfig`: the engine's normalised view of a HuggingFace config."""
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError

_DTYPES = {'float32': torch.float32, 'float': torch.float32, 'float16': torch.float16, 'half': torch.float16,
           'bfloat16': torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, hf_config=None) -> torch.dtype:
    """A torch dtype from a name, a torch.dtype, or 'auto': the checkpoint's own dtype (float32 if it names none)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f'dtype {dtype} is not supported; use one of float32, float16, bfloat16')
        return dtype
    if dtype in (None, 'auto'):
        found = getattr(hf_config, 'dtype', None) or getattr(hf_config, 'torch_dtype', None)
        if found is None:
            return torch.float32
        return resolve_dtype(found if isinstance(found, torch.dtype) else str(found))
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not supported; use 'auto', 'float32', 'float16' or 'bfloat16'")
    return _DTYPES[dtype]


@dataclass
class ModelConfig:
    """What the engine needs to know about a model, whatever its config.json calls it.

    `eos_token_id` is always a list. `k_head_dim`/`v_head_dim` default to `head_dim`. `sliding_window` is -1
    when the model has none (or only some layers have one: the port reads that from `hf_config`).
    """
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    bos_token_id: int | None
    eos_token_id: list[int]
    head_dim: int
    vocab_size: int = 40000
    k_head_dim: int | None = None
    v_head_dim: int | None = None
    sliding_window: int = -1
    dtype: torch.dtype = torch.float16
    tie_word_embeddings: bool = False
    max_position_embeddings: int | None = None
    hf_config: Any = field(default=None, repr=False)
    quant_config: Any = None
    model_arch: str | None = None

    def __post_init__(self):
        if self.eos_token_id is None:
            self.eos_token_id = []
        elif isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        else:
            self.eos_token_id = list(self.eos_token_id)
        if self.k_head_dim is None:
            self.k_head_dim = self.head_dim
        if self.v_head_dim is None:
            self.v_head_dim = self.head_dim
        if self.sliding_window is None:
            self.sliding_window = -1
        self.validate()

    def validate(self):
        """Raise ConfigError on values no model can run with."""
        for name in ('hidden_size', 'num_layers', 'num_attention_heads', 'num_key_value_heads', 'head_dim',
                     'vocab_size'):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f'ModelConfig.{name} must be a positive integer, got {value!r}')
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f'num_attention_heads ({self.num_attention_heads}) is not a multiple of '
                              f'num_key_value_heads ({self.num_key_value_heads}); grouped-query attention needs it')

    @classmethod
    def from_hf_config(cls, hf_config, model_path: str | None = None, dtype='auto') -> 'ModelConfig':
        """Build through the first ConfigBuilder whose `condition` holds for this config."""
        from .configurations import AutoModelConfigBuilder
        cfg = AutoModelConfigBuilder.build(hf_config, model_path=model_path)
        cfg.hf_config = hf_config
        cfg.dtype = resolve_dtype(dtype, hf_config)
        archs = getattr(hf_config, 'architectures', None) or []
        cfg.model_arch = archs[0] if archs else None
        if cfg.quant_config is None:
            cfg.quant_config = getattr(hf_config, 'quantization_config', None)
        return cfg

    @classmethod
    def from_pretrained(cls, model_path: str, dtype='auto', trust_remote_code: bool = False) -> 'ModelConfig':
        from .hf_config import load_hf_config, read_config_dict
        hf_config = load_hf_config(model_path, trust_remote_code)
        return build_model_config(hf_config, model_path, dtype, raw_config=read_config_dict(model_path))


def build_model_config(hf_config, model_path: str | None = None, dtype='auto',
                       raw_config: dict | None = None) -> ModelConfig:
    """`ModelConfig.from_hf_config` with every problem a ConfigError naming config.json and the field: required
    fields that config.json leaves to transformers' defaults (given `raw_config`, its own dict), rope settings of
    the wrong type, and anything the ConfigBuilder raises."""
    from .configurations import AutoModelConfigBuilder
    from .configurations.default import BUILTIN_BUILDERS, unset_required_fields
    from .hf_config import check_rope_values
    where = f'config.json in {model_path!r}' if model_path else 'the config'
    builder = AutoModelConfigBuilder.find_builder(hf_config)
    if raw_config is not None and builder.__name__ in BUILTIN_BUILDERS:
        missing = unset_required_fields(raw_config, hf_config)
        if missing:
            adds = ', '.join(f'"{name}": ...' for name in missing)
            raise ConfigError(f"{where} does not set {', '.join(missing)}; transformers would fill in its own "
                              f'default, which almost never matches the weights. Add {adds} to config.json')
    check_rope_values(hf_config, where)
    try:
        return ModelConfig.from_hf_config(hf_config, model_path, dtype)
    except ConfigError as e:
        if 'config.json' in str(e):
            raise
        raise ConfigError(f'{where}: {e}') from e
    except Exception as e:
        raise ConfigError(f'{builder.__name__} could not build a ModelConfig from {where} ({type(e).__name__}: '
                          f'{e}); a value there is probably missing or of the wrong type') from e
