"""`pytest parity --model ... --module-map ... --report ...` as a user runs it, in a fresh interpreter."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_pytest_parity_names_the_first_failing_layer(tiny_llama, tmp_path):
    module_map = tmp_path / 'buggy_map.py'
    module_map.write_text('from parity.planted_bugs import MLPDroppedInLayer1\n'
                          "MODULE_MAP = {'LlamaForCausalLM': MLPDroppedInLayer1}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', 'parity', '-q', '-p', 'no:cacheprovider', '--model', tiny_llama,
         '--module-map', str(module_map), '--report', str(tmp_path / 'report'), '--prompts', '2',
         '--decode-steps', '2', '--device', 'cpu'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    # one item per tap and phase: the layer before the bug passes, the bug's own tap fails
    assert 'FAILED parity/test_parity.py::test_tap[prefill-layers.1.residual]' in out
    assert 'test_tap[prefill-layers.1.mlp]' not in out
    assert 'first divergence: layer 1, residual (prefill' in out
    assert '2 prompts of 5, 17 tokens' in out
    report = json.loads((tmp_path / 'report' / 'report.json').read_text())
    assert report['first_divergence'] == {'phase': 'prefill', 'tap': 'layers.1.residual', 'layer': 1,
                                          'kind': 'residual'}
    assert report['decode_steps'] == 2 and not report['passed']
    assert (tmp_path / 'report' / 'report.html').stat().st_size > 1000


def test_pytest_parity_compares_the_routers_of_a_mixture_of_experts(tmp_path):
    """A Mixtral whose layer-1 router reads its experts in another order: the routing items fail and say it is the
    router of layer 1 (hard flips), while layer 0's routing agrees in full."""
    from lmdp.tiny import make_tiny
    model = make_tiny('mixtral', tmp_path / 'mixtral')
    module_map = tmp_path / 'router_map.py'
    module_map.write_text(
        'import torch\n'
        'from lmdp.models.mixtral import MixtralForCausalLM\n\n\n'
        'class RouterRolled(MixtralForCausalLM):\n'
        '    def load_weights(self, weights):\n'
        '        super().load_weights(weights)\n'
        '        gate = self.model.layers[1].mlp.gate.weight\n'
        '        with torch.no_grad():\n'
        '            gate.copy_(gate.roll(1, dims=0))\n\n\n'
        "MODULE_MAP = {'MixtralForCausalLM': RouterRolled}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', 'parity', '-q', '-p', 'no:cacheprovider', '-rfE', '--model', str(model),
         '--module-map', str(module_map), '--report', str(tmp_path / 'report'), '--prompts', '2',
         '--decode-steps', '1', '--device', 'cpu'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert 'FAILED parity/test_parity.py::test_check[routing-prefill]' in out
    assert 'FAILED parity/test_parity.py::test_check[routing-decode]' in out
    line = next(x for x in out.splitlines() if x.startswith('[FAIL] routing (prefill)'))
    assert 'for layers [0, 1, 2] at 100.0%, ' in line and 'HARD flip(s), first at layer 1,' in line
    report = json.loads((tmp_path / 'report' / 'report.json').read_text())
    routing = {c['phase']: c for c in report['checks'] if c['name'] == 'routing'}
    assert routing['prefill']['data']['agreement']['0'] == 1.0
    assert routing['prefill']['data']['agreement']['1'] < 0.5
