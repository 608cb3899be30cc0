"""Registration: the built-in MODULE_MAP and a user's custom module map from a file outside lmdp."""
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from lmdp.config import ModelConfig
from lmdp.engine import StepRunner
from lmdp.errors import ArchitectureError
from lmdp.models import MODULE_MAP, get_model_class, load_custom_module_map

# A port written exactly like the seed guide: forward returns float logits for every token, no get_logits.
SEED_STYLE_PORT = '''
import torch
from torch import nn
from lmdp.models.llama import LlamaModel
from lmdp.nn import build_rowwise_linear
from lmdp.weight_loader import load_weight

CALLS = []

class MyLlamaForCausalLM(nn.Module):
    support_cuda_graph = True

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        super().__init__()
        self.config, self.ctx_mgr = config, ctx_mgr
        self.model = LlamaModel(config, dtype=dtype, device=device)
        self.lm_head = build_rowwise_linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype,
                                            device=device)

    def forward(self, input_ids, position_ids, past_key_values, attn_metadata=None, inputs_embeds=None, **kwargs):
        CALLS.append(input_ids.shape[-1])
        hidden_states = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=past_key_values,
                                   attn_metadata=attn_metadata, inputs_embeds=inputs_embeds)
        return self.lm_head(hidden_states).float()

    def prepare_inputs_for_generation(self, past_key_values, inputs_embeds=None, context=None):
        return dict(input_ids=context.input_ids, position_ids=context.position_ids,
                    past_key_values=past_key_values, attn_metadata=context.attn_metadata,
                    inputs_embeds=inputs_embeds)

    def load_weights(self, weights):
        mapping = [('.qkv_proj', '.q_proj', 'q'), ('.qkv_proj', '.k_proj', 'k'), ('.qkv_proj', '.v_proj', 'v'),
                   ('.gate_up_proj', '.gate_proj', 0), ('.gate_up_proj', '.up_proj', 1)]
        params = dict(self.named_parameters())
        for name, w in weights:
            for param_name, weight_name, shard in mapping:
                if weight_name in name:
                    load_weight(params[name.replace(weight_name, param_name)], w, shard_id=shard)
                    break
            else:
                load_weight(params[name], w)
'''


@pytest.fixture()
def user_port(tmp_path):
    """A user's folder, outside lmdp: the port and a module_map.py that registers it by a dotted path."""
    folder = tmp_path / 'my_port'
    folder.mkdir()
    (folder / 'my_llama_port.py').write_text(SEED_STYLE_PORT)
    (folder / 'module_map.py').write_text(textwrap.dedent('''
        MODULE_MAP = {'LlamaForCausalLM': 'my_llama_port.MyLlamaForCausalLM'}
    '''))
    return folder


def test_builtin_map_resolves_llama(tiny_llama):
    cfg = ModelConfig.from_pretrained(tiny_llama)
    cls = get_model_class(cfg.hf_config)
    assert cls.__name__ == 'LlamaForCausalLM' and cls.__module__ == 'lmdp.models.llama'
    assert MODULE_MAP['LlamaForCausalLM'] == 'lmdp.models.llama.LlamaForCausalLM'


def test_custom_module_map_overrides_and_the_runner_uses_it(tiny_llama, user_port):
    mapping = load_custom_module_map(str(user_port / 'module_map.py'))
    assert mapping == {'LlamaForCausalLM': 'my_llama_port.MyLlamaForCausalLM'}
    runner = StepRunner.from_pretrained(tiny_llama, dtype='float32', num_blocks=32, block_size=16,
                                        custom_module_map=str(user_port / 'module_map.py'))
    assert type(runner.model).__name__ == 'MyLlamaForCausalLM'
    assert type(runner.model).__module__ == 'my_llama_port'
    prompts = [[5, 6, 7, 8], list(range(10, 40))]
    tokens, logits = runner.generate_greedy(prompts, 4)
    import my_llama_port
    assert my_llama_port.CALLS == [34, 2, 2, 2]                   # one packed prefill, then decode steps

    builtin = StepRunner.from_pretrained(tiny_llama, dtype='float32', num_blocks=32, block_size=16)
    ref_tokens, ref_logits = builtin.generate_greedy(prompts, 4)
    assert tokens == ref_tokens
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_custom_module_map_as_dict_with_a_class(tiny_llama):
    from lmdp.models.llama import LlamaForCausalLM

    class Marked(LlamaForCausalLM):
        pass
    cfg = ModelConfig.from_pretrained(tiny_llama)
    assert get_model_class(cfg.hf_config, {'LlamaForCausalLM': Marked}) is Marked


def test_missing_custom_module_map_file(tmp_path, tiny_llama):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        StepRunner.from_pretrained(tiny_llama, custom_module_map=str(tmp_path / 'nope.py'))


def test_map_file_without_module_map(tmp_path):
    (tmp_path / 'm.py').write_text('X = 1\n')
    with pytest.raises(ArchitectureError, match='defines no MODULE_MAP'):
        load_custom_module_map(str(tmp_path / 'm.py'))


def test_unknown_architecture_lists_registered(tiny_llama):
    cfg = ModelConfig.from_pretrained(tiny_llama)
    with pytest.raises(ArchitectureError) as err:
        get_model_class(cfg.hf_config, architecture='NopeForCausalLM')
    assert "'NopeForCausalLM' is not registered" in str(err.value) and 'LlamaForCausalLM' in str(err.value)


def test_unimportable_entry(tiny_llama):
    cfg = ModelConfig.from_pretrained(tiny_llama)
    with pytest.raises(ArchitectureError, match='cannot be imported'):
        get_model_class(cfg.hf_config, {'LlamaForCausalLM': 'no_such_pkg.Model'})


def test_builder_imported_by_the_map_file_is_asked_first(tiny_llama, tmp_path):
    """A ConfigBuilder that lives beside the user's port is registered before the config is built."""
    from lmdp.check_env import check_model
    from lmdp.configurations import AutoModelConfigBuilder
    from lmdp.engine import ModelAgent
    folder = tmp_path / 'port_with_builder'
    folder.mkdir()
    (folder / 'my_builder.py').write_text(textwrap.dedent('''
        from lmdp.configurations import AutoModelConfigBuilder
        from lmdp.configurations.default import llama_like_config

        class MarkedLlamaBuilder(AutoModelConfigBuilder):
            @classmethod
            def condition(cls, hf_config):
                return hf_config.model_type == 'llama'

            @classmethod
            def build(cls, hf_config, model_path=None):
                return llama_like_config(hf_config, max_position_embeddings=123)
    '''))
    (folder / 'module_map.py').write_text('import my_builder  # noqa: F401\nMODULE_MAP = {}\n')
    try:
        agent = ModelAgent.from_pretrained(tiny_llama, custom_module_map=str(folder / 'module_map.py'))
        assert agent.model_config.max_position_embeddings == 123
        report = check_model(tiny_llama, custom_module_map=str(folder / 'module_map.py'))
        assert report.builder == 'MarkedLlamaBuilder', str(report)
    finally:
        AutoModelConfigBuilder._sub_classes[:] = [b for b in AutoModelConfigBuilder._sub_classes
                                                  if b.__name__ != 'MarkedLlamaBuilder']


# --- a map is read afresh each time: version 2 of a port runs version 2's code in the same interpreter ---

PORT_VERSION = '''
from lmdp.models.llama import LlamaForCausalLM

class Port(LlamaForCausalLM):
    VERSION = {version}
'''


def _write_port(folder, version, map_imports_class=False):
    folder.mkdir(exist_ok=True)
    (folder / 'versioned_port.py').write_text(PORT_VERSION.format(version=version))
    if map_imports_class:   # the map file imports the class itself, as notebooks often do
        (folder / 'module_map.py').write_text('from versioned_port import Port\n'
                                              "MODULE_MAP = {'LlamaForCausalLM': Port}\n")
    else:
        (folder / 'module_map.py').write_text("MODULE_MAP = {'LlamaForCausalLM': 'versioned_port.Port'}\n")
    return str(folder / 'module_map.py')


@pytest.fixture()
def own_sys_path(monkeypatch):
    """Each map load puts its folder first on sys.path; these tests give the session's sys.path back after."""
    import sys
    monkeypatch.setattr(sys, 'path', list(sys.path))


def _llama_config():
    from types import SimpleNamespace
    return SimpleNamespace(architectures=['LlamaForCausalLM'])


def test_second_version_of_a_port_in_another_folder_runs_its_own_code(tiny_llama, tmp_path, own_sys_path):
    from lmdp.engine import ModelAgent
    v1, v2 = _write_port(tmp_path / 'v1', 1), _write_port(tmp_path / 'v2', 2)
    assert type(ModelAgent.from_pretrained(tiny_llama, custom_module_map=v1).model).VERSION == 1
    assert type(ModelAgent.from_pretrained(tiny_llama, custom_module_map=v2).model).VERSION == 2
    assert type(ModelAgent.from_pretrained(tiny_llama, custom_module_map=v1).model).VERSION == 1


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.booleans(), st.integers(1, 9), st.booleans()), min_size=1, max_size=5))
def test_the_last_written_version_is_the_one_resolved(tmp_path, monkeypatch, own_sys_path, steps):
    """Any sequence of edits in place (same file size, same second) and new folders, with the class named by a
    dotted path or imported by the map file: the class resolved is the version last written."""
    import sys
    monkeypatch.setattr(sys, 'dont_write_bytecode', False)   # as in a user's kernel: bytecode caches get written
    base = tmp_path / f'run{len(list(tmp_path.iterdir()))}'
    base.mkdir()
    folder = base / 'f0'
    for i, (new_folder, version, map_imports_class) in enumerate(steps):
        if new_folder:
            folder = base / f'f{i + 1}'
        path = _write_port(folder, version, map_imports_class)
        assert get_model_class(_llama_config(), path).VERSION == version, steps[:i + 1]


def test_a_bare_class_name_is_the_class_in_the_map_file(tmp_path, own_sys_path):
    (tmp_path / 'bare_map.py').write_text(textwrap.dedent('''
        from lmdp.models.llama import LlamaForCausalLM

        class MyLlama(LlamaForCausalLM):
            pass

        MODULE_MAP = {'LlamaForCausalLM': 'MyLlama'}
    '''))
    cls = get_model_class(_llama_config(), str(tmp_path / 'bare_map.py'))
    assert cls.__name__ == 'MyLlama' and cls.__module__.startswith('lmdp_custom_module_map_')


def test_a_bare_name_the_map_file_does_not_define(tmp_path, own_sys_path):
    (tmp_path / 'bare_map.py').write_text("MODULE_MAP = {'LlamaForCausalLM': 'Missing'}\n")
    with pytest.raises(ArchitectureError, match=r"'Missing' in .*bare_map.py: a bare name must be a class"):
        get_model_class(_llama_config(), str(tmp_path / 'bare_map.py'))
    with pytest.raises(ArchitectureError, match="'Missing' is a bare name; give the class itself or a dotted"):
        get_model_class(_llama_config(), {'LlamaForCausalLM': 'Missing'})


def test_installed_and_lmdp_modules_are_never_reloaded(tmp_path, own_sys_path):
    """A map beside files named like the standard library or lmdp (a map in a checkout's root) leaves those
    modules as they are: reloading them would split class identities across the program."""
    import textwrap as textwrap_module

    import lmdp.models.registry as registry_module
    (tmp_path / 'textwrap.py').write_text('BROKEN = True\n')
    (tmp_path / 'lmdp').mkdir()
    (tmp_path / 'lmdp' / '__init__.py').write_text('BROKEN = True\n')
    (tmp_path / 'module_map.py').write_text("MODULE_MAP = {'LlamaForCausalLM': 'lmdp.models.llama.LlamaForCausalLM'}\n")
    import sys
    get_model_class(_llama_config(), str(tmp_path / 'module_map.py'))
    assert sys.modules['textwrap'] is textwrap_module
    assert sys.modules['lmdp.models.registry'] is registry_module
