"""README's claim, tested: a port written against lmdeploy's PyTorch-engine API (its role builders, CudaGraphMixin,
`cos[0]`, ApplyRotaryEmb then Attention, SiluAndMul then down_proj) runs on lmdp once its import prefix
`lmdeploy.pytorch` is changed to `lmdp`, and passes the parity harness."""
import os
import re

import pytest

import parity

PORT = os.path.join(os.path.dirname(__file__), 'lmdeploy_port', 'qwen3_lmdeploy.py')


@pytest.fixture(scope='module')
def ported(tmp_path_factory):
    """The lmdeploy port with only its prefix changed, and a module map naming it."""
    source = open(PORT, encoding='utf-8').read()
    assert 'from lmdeploy.pytorch.nn.linear import' in source and not re.search(r'^(from|import) lmdp', source, re.M)
    folder = tmp_path_factory.mktemp('lmdeploy_port')
    (folder / 'qwen3_from_lmdeploy.py').write_text(source.replace('lmdeploy.pytorch', 'lmdp'), encoding='utf-8')
    (folder / 'module_map.py').write_text(
        "MODULE_MAP = {'Qwen3ForCausalLM': 'qwen3_from_lmdeploy.Qwen3ForCausalLM'}\n", encoding='utf-8')
    return folder


def test_the_prefix_is_the_only_change(ported):
    original = open(PORT, encoding='utf-8').read()
    changed = (ported / 'qwen3_from_lmdeploy.py').read_text(encoding='utf-8')
    assert changed == original.replace('lmdeploy.pytorch', 'lmdp')
    imports = set(re.findall(r'^from (lmdp[\w.]*) import', changed, re.M))
    assert imports == {'lmdp.model_inputs', 'lmdp.models.utils.cudagraph', 'lmdp.nn', 'lmdp.nn.linear',
                       'lmdp.weight_loader.model_weight_loader'}


def test_an_lmdeploy_port_passes_parity_after_changing_its_prefix(ported, tmp_path):
    from lmdp.tiny import make_tiny
    path = str(make_tiny('qwen3', tmp_path / 'qwen3'))
    report = parity.compare(path, device='cpu', custom_module_map=str(ported / 'module_map.py'))
    assert report.passed, report.summary()
    assert report.port_class.endswith('qwen3_from_lmdeploy.Qwen3ForCausalLM')
    assert report.check('weight_coverage').passed
