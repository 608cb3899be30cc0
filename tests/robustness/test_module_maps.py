"""Broken custom module maps: each is an error naming the map file or the entry and what to fix, raised before the
model is built, and `lmdp check --custom-module-map` reports it in the same words."""
import textwrap

import pytest

from lmdp.check_env import check_model
from lmdp.errors import ArchitectureError, ConfigError

_PORT = '''
import torch


class NoLoad(torch.nn.Module):
    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__()

    def forward(self, input_ids, position_ids, past_key_values, attn_metadata=None, inputs_embeds=None):
        return input_ids

    def prepare_inputs_for_generation(self, past_key_values, inputs_embeds=None, context=None):
        return {}


class Exploding(NoLoad):
    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__(config, ctx_mgr)
        self.width = config.hidden_size // config.no_such_field

    def load_weights(self, weights):
        pass
'''

# (the map file's text, error type, words the message must hold)
MAPS = {
    'a syntax error': ('MODULE_MAP = {"LlamaForCausalLM": \n', ArchitectureError,
                       ['could not be run', 'SyntaxError', 'fix the file']),
    'a name error at import': ('MODULE_MAP = {"LlamaForCausalLM": Missing}\n', ArchitectureError,
                               ['could not be run', "NameError: name 'Missing' is not defined"]),
    'no MODULE_MAP': ('MAP = {}\n', ArchitectureError, ['defines no MODULE_MAP dict']),
    'MODULE_MAP a list': ('MODULE_MAP = ["LlamaForCausalLM"]\n', ArchitectureError, ['defines no MODULE_MAP dict']),
    'an entry to a missing module': ('MODULE_MAP = {"LlamaForCausalLM": "no_such_pkg.models.Llama"}\n',
                                     ArchitectureError, ["'no_such_pkg.models.Llama' cannot be imported"]),
    'an entry to a missing class': ('MODULE_MAP = {"LlamaForCausalLM": "lmdp.models.llama.NoSuchForCausalLM"}\n',
                                    ArchitectureError, ["'lmdp.models.llama.NoSuchForCausalLM' cannot be imported",
                                                        'NoSuchForCausalLM']),
    'an entry that is no class': ('MODULE_MAP = {"LlamaForCausalLM": 42}\n', ArchitectureError,
                                  ["'LlamaForCausalLM' is 42, not a class"]),
    'a class without load_weights': (_PORT + 'MODULE_MAP = {"LlamaForCausalLM": NoLoad}\n', ArchitectureError,
                                      ['NoLoad has no load_weights()']),
    'a class whose constructor fails on the config': (_PORT + 'MODULE_MAP = {"LlamaForCausalLM": Exploding}\n',
                                                      ConfigError, ['Exploding could not be built from config.json',
                                                                    'no_such_field']),
}


@pytest.mark.parametrize('case', list(MAPS))
def test_a_broken_module_map_is_named(case, tiny, tmp_path, make_pipe, monkeypatch):
    text, error_type, words = MAPS[case]
    map_file = tmp_path / f'map_{len(case)}.py'
    map_file.write_text(textwrap.dedent(text))
    import lmdp.engine.engine as engine_module
    monkeypatch.setattr(engine_module.ModelAgent, 'from_pretrained',
                        classmethod(lambda cls, *a, **k: pytest.fail('the model was built')))
    with pytest.raises(error_type) as info:
        make_pipe(tiny, custom_module_map=str(map_file))
    message = str(info.value)
    for word in words:
        assert word in message, f'{case}: {word!r} not in {message!r}'
    assert message in check_model(tiny, custom_module_map=str(map_file)).problems


@pytest.mark.parametrize('value, error_type, words', [
    ('/no/such/module_map.py', FileNotFoundError, ["'/no/such/module_map.py' does not exist", 'MODULE_MAP']),
    (3, TypeError, ['custom_module_map must be the path of a .py file', 'got int']),
])
def test_a_module_map_that_is_no_file_is_refused_in_the_config(value, error_type, words):
    from lmdp import PytorchEngineConfig
    with pytest.raises(error_type) as info:
        PytorchEngineConfig(custom_module_map=value)
    for word in words:
        assert word in str(info.value)
