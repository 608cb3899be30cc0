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


def load_hf_config(model_path: str, trust_remote_code: bool = False):
    """The transformers config of a checkpoint folder."""
    cfg = read_config_dict(model_path)
    if 'model_type' not in cfg:
        raise ConfigError(f"config.json in {model_path!r} has no 'model_type'; transformers needs it to pick the "
                          "config class (e.g. \"model_type\": \"llama\")")
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError depending on the problem
        raise ConfigError(f"transformers could not parse config.json in {model_path!r} "
                          f"(model_type {cfg['model_type']!r}): {e}. If the architecture ships its own code, "
                          'pass trust_remote_code=True') from e
