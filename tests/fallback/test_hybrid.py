"""Progressive porting: fallback modules replaced by lmdp modules by name pattern, weights through the new
modules' own loaders, the hybrid checked by the parity harness like any port, each tap marked native or not."""
import json
import os
import subprocess
import sys

import pytest
import torch

import parity
from lmdp.engine import ModelAgent, StepRunner
from lmdp.errors import WeightLoadError
from lmdp.fallback import TransformersForCausalLM
from lmdp.fallback.hybrid import Swap, apply_swaps, hybrid, module_impls
from lmdp.fallback.swaps import rms_norm
from lmdp.models.llama import LlamaAttention, LlamaMLP

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NORMS = (Swap('model.layers.*.input_layernorm', rms_norm), Swap('model.layers.*.post_attention_layernorm', rms_norm),
         Swap('model.norm', rms_norm))
MLP = Swap('model.layers.*.mlp', LlamaMLP)
ATTN = Swap('model.layers.*.self_attn', LlamaAttention, kind='attention')


@pytest.fixture(scope='module')
def llama(tiny_fallback):
    return tiny_fallback('llama')


@pytest.mark.parametrize('pattern, name, hit', [
    ('model.layers.*.mlp', 'model.layers.11.mlp', True),
    ('model.layers.*.mlp', 'model.layers.1.mlp.gate_proj', False),
    ('model.layers.*.mlp', 'model.layers.mlp', False),
    ('model.*.mlp', 'model.layers.1.mlp', False),      # one '*' is one name component
    ('model.norm', 'model.norm', True),
])
def test_swap_patterns_match_one_component_per_star(pattern, name, hit):
    assert Swap(pattern, LlamaMLP).matches(name) is hit


def test_each_stage_passes_parity_and_says_which_taps_are_native(llama):
    refs = parity.run_references(llama, dtype='float32', device='cpu', prompts=2, decode_steps=2)
    stages = [NORMS, NORMS + (MLP, ), NORMS + (MLP, ATTN)]
    native_counts = []
    for swaps in stages:
        report = parity.compare(llama, references=refs, custom_module_map={'LlamaForCausalLM': hybrid(*swaps)})
        assert report.passed, report.summary()
        impls = report.module_impls
        assert impls['embed'] == impls['logits'] == 'fallback' and impls['layers.0.residual'] == 'mixed'
        assert impls['final_norm'] == impls['layers.1.input_norm'] == 'native'
        assert impls['layers.1.mlp'] == ('native' if MLP in swaps else 'fallback')
        assert impls['layers.1.attn'] == ('native' if ATTN in swaps else 'fallback')
        native_counts.append(sum(v == 'native' for v in impls.values()))
    assert native_counts == sorted(native_counts) and len(set(native_counts)) == 3


def test_a_wrongly_stacked_swap_fails_parity_at_its_own_tap(llama):
    swapped_gate_up = (('.gate_up_proj', '.gate_proj', 1), ('.gate_up_proj', '.up_proj', 0))
    bad = hybrid(Swap('model.layers.*.mlp', LlamaMLP, stacked_params_mapping=swapped_gate_up))
    report = parity.compare(llama, dtype='float32', device='cpu', prompts=2, decode_steps=1,
                            custom_module_map={'LlamaForCausalLM': bad})
    assert not report.passed
    assert report.first_divergence.tap == 'layers.0.mlp' and report.module_impls['layers.0.mlp'] == 'native'


def test_swapping_a_loaded_model_carries_its_weights(llama):
    agent = ModelAgent.from_pretrained(llama, dtype='float32',
                                       custom_module_map={'LlamaForCausalLM': TransformersForCausalLM})
    prompts = [[1, 40, 41, 300, 7, 9], [1, 22, 8]]
    before, logits_before = StepRunner(agent, num_blocks=16, block_size=8).generate_greedy(prompts, 4)
    old = agent.model.model.layers[0].self_attn
    q, k, v = old.q_proj.weight.clone(), old.k_proj.weight.clone(), old.v_proj.weight.clone()
    names = apply_swaps(agent.model, NORMS + (MLP, ATTN))
    assert 'model.layers.1.self_attn' in names and module_impls(agent.model)['model.norm'] == 'native'
    qkv = agent.model.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(qkv, torch.cat([q, k, v]))
    after, logits_after = StepRunner(agent, num_blocks=16, block_size=8).generate_greedy(prompts, 4)
    assert after == before
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(logits_after, logits_before))


def test_a_swap_its_weights_cannot_fill_is_refused(llama):
    agent = ModelAgent.from_pretrained(llama, dtype='float32',
                                       custom_module_map={'LlamaForCausalLM': TransformersForCausalLM})
    with pytest.raises(WeightLoadError, match=r'gate_up_proj\.weight \[shard 0\]'):
        apply_swaps(agent.model, [Swap('model.layers.*.mlp', LlamaMLP, stacked_params_mapping=())])
    with pytest.raises(ValueError, match='matches no module.*model.embed_tokens'):
        apply_swaps(agent.model, [Swap('model.blocks.*.mlp', LlamaMLP)])


def test_pytest_parity_takes_a_hybrid_from_a_module_map(tiny_fallback, tmp_path):
    """`pytest parity --model <unported> --module-map <hybrid>` as a user runs it; the report marks the taps."""
    path = tiny_fallback('olmo2')
    module_map = tmp_path / 'olmo2_map.py'
    module_map.write_text('from lmdp.fallback.hybrid import Swap, hybrid\n'
                          'from lmdp.fallback.swaps import rms_norm\n'
                          "MODULE_MAP = {'Olmo2ForCausalLM': hybrid(Swap('model.layers.*.post_attention_layernorm', "
                          "rms_norm), Swap('model.norm', rms_norm))}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run([sys.executable, '-m', 'pytest', 'parity', '-q', '-p', 'no:cacheprovider', '--model', path,
                             '--module-map', str(module_map), '--prompts', '2', '--decode-steps', '2', '--device',
                             'cpu', '--report', str(tmp_path / 'report')],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert 'first divergence: none' in result.stdout
    report = json.loads((tmp_path / 'report' / 'report.json').read_text())
    assert report['passed'] and report['port_class'].endswith('HybridForCausalLM')
    impls = report['module_impls']
    assert impls['final_norm'] == 'native' and impls['layers.1.mlp'] == 'fallback'
