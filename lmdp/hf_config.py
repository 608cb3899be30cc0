"""Reading a checkpoint's config.json into a transformers config, with errors a person can act on."""
import json
import os

from .errors import ConfigError


def read_config_dict(model_path: str) -> dict:
    """config.json as a dict; ConfigError when the folder, the file or its JSON is wrong."""
    if not os.path.isdir(model_path):
        raise ConfigError(f'{model_path!r} is not a folder; pass the folder that holds config.json and the weights')
    path = os.path.join(model_path, 'config.json')
    if not os.path.isfile(path):
        raise ConfigError(f'{model_path!r} has no config.json; a HuggingFace checkpoint folder needs one')
    with open(path, encoding='utf-8') as f:
        text = f.read()
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f'config.json in {model_path!r} is not valid JSON: {e.msg} at line {e.lineno}, '
                          f'column {e.colno}; fix the file (a trailing comma or a missing quote is typical)') from e
    if not isinstance(cfg, dict):
        raise ConfigError(f'config.json in {model_path!r} must hold a JSON object, found {type(cfg).__name__}')
    return cfg


# sizes every decoder config shares: when config.json sets them they must be positive integers
_POSITIVE_INTS = ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads', 'vocab_size',
                  'intermediate_size', 'head_dim', 'max_position_embeddings')


def check_raw_fields(cfg: dict, where: str = 'config.json'):
    """ConfigError naming the field for values of the wrong type, before transformers fails on them less clearly."""
    for name in _POSITIVE_INTS:
        value = cfg.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ConfigError(f'{where}: "{name}" must be a positive integer, got {value!r}')
    archs = cfg.get('architectures')
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ConfigError(f'{where}: "architectures" must be a list of class names such as ["LlamaForCausalLM"], '
                          f'got {archs!r}')
    for name in ('eos_token_id', 'bos_token_id'):
        value = cfg.get(name)
        ids = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ConfigError(f'{where}: "{name}" must be a token id or a list of them, got {value!r}')


def load_hf_config(model_path: str, trust_remote_code: bool = False):
    """The transformers config of a checkpoint folder."""
    cfg = read_config_dict(model_path)
    if 'model_type' not in cfg:
        raise ConfigError(f"config.json in {model_path!r} has no 'model_type'; transformers needs it to pick the "
                          "config class (e.g. \"model_type\": \"llama\")")
    check_raw_fields(cfg, f'config.json in {model_path!r}')
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError depending on the problem
        raise ConfigError(f"transformers could not parse config.json in {model_path!r} "
                          f"(model_type {cfg['model_type']!r}): {e}. If the architecture ships its own code, "
                          'pass trust_remote_code=True') from e


def read_generation_config(model_path: str) -> dict:
    """generation_config.json as a dict ({} when there is none); ConfigError when it is not a JSON object."""
    path = os.path.join(model_path, 'generation_config.json')
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f'generation_config.json in {model_path!r} is not valid JSON ({e}); fix the file or '
                          'remove it (lmdp then uses its own defaults)') from e
    if not isinstance(cfg, dict):
        raise ConfigError(f'generation_config.json in {model_path!r} must hold a JSON object, found '
                          f'{type(cfg).__name__}')
    return cfg


def generation_eos_ids(model_path: str) -> list:
    """The eos ids generation_config.json names (an int or a list of ints), as a list."""
    eos = read_generation_config(model_path).get('eos_token_id')
    if eos is None:
        return []
    ids = [eos] if isinstance(eos, int) else eos
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ConfigError(f'generation_config.json in {model_path!r}: eos_token_id must be a token id or a list of '
                          f'them, got {eos!r}')
    return list(ids)


# rope settings that must be numbers when present (HF's names, 4.x `rope_scaling` and 5.x `rope_parameters` alike)
_ROPE_NUMBERS = ('rope_theta', 'factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings',
                 'attention_factor', 'beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim', 'partial_rotary_factor')
_ROPE_LISTS = ('short_factor', 'long_factor')


def check_rope_values(hf_config, where: str = 'config.json'):
    """ConfigError naming the field for a rope setting of the wrong type (a string rope_theta, say), which would
    otherwise fail deep inside the model's construction. Whether a rope type is supported is the model's to say."""
    for attr in ('rope_parameters', 'rope_scaling'):
        params = getattr(hf_config, attr, None)
        if not isinstance(params, dict):
            continue
        nested = {k: v for k, v in params.items() if isinstance(v, dict)}
        for prefix, group in (nested.items() if nested else [('', params)]):
            label = f'{attr}[{prefix!r}]' if prefix else attr
            kind = group.get('rope_type', group.get('type'))
            if kind is not None and not isinstance(kind, str):
                raise ConfigError(f'{where}: {label}["rope_type"] must be a string such as "linear", got {kind!r}')
            for key in _ROPE_NUMBERS:
                value = group.get(key)
                if value is not None and not _is_number(value):
                    raise ConfigError(f'{where}: {label}["{key}"] must be a number, got {type(value).__name__} '
                                      f'{value!r}')
            for key in _ROPE_LISTS:
                value = group.get(key)
                if value is not None and not (isinstance(value, list) and all(_is_number(v) for v in value)):
                    raise ConfigError(f'{where}: {label}["{key}"] must be a list of numbers, got {value!r:.80}')
    for key in ('rope_theta', 'partial_rotary_factor'):
        value = getattr(hf_config, key, None)
        if value is not None and not _is_number(value):
            raise ConfigError(f'{where}: {key} must be a number, got {type(value).__name__} {value!r}')


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
