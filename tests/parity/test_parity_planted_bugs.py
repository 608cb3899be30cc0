"""The harness must pass the correct Llama port and name the phase and first tap of each planted bug."""
import math

import pytest

from parity import compare
from parity.planted_bugs import PLANTED_BUGS


def test_correct_port_passes_in_float32(tiny_llama, references):
    report = compare(tiny_llama, references=references('float32'))
    assert report.passed, report.summary()
    assert report.first_divergence is None
    assert report.divergence_line() == 'first divergence: none'
    layers, per_layer = 3, 12      # input_norm, q, k, v, q_rot, k_rot, attn_core, attn, mid, mlp_norm, mlp, residual
    assert len(report.phase_results('prefill')) == len(report.phase_results('decode')) == per_layer * layers + 3
    assert set(report.views) == {'local', 'accumulated'}
    # float32 is judged against float32 transformers' own distance from float64: ~1e-7, not a flat 1e-5
    assert all(t.port.rel_l2 <= 2e-6 and t.floor is not None for t in report.taps)
    assert max(t.tolerance for t in report.main_taps) < 2e-6
    assert {c.id: c.status for c in report.checks} == {
        'logprob_kl-prefill': 'passed', 'top5-prefill': 'passed', 'logprob_kl-decode': 'passed',
        'top5-decode': 'passed', 'greedy': 'passed', 'weight_coverage': 'passed', 'cuda_graph': 'skipped',
        'cuda_graph_padded': 'skipped'}
    assert 'needs a CUDA device; this run is on cpu' in report.check('cuda_graph').detail
    assert report.port_tokens == report.reference_tokens
    assert all(len(t) == 4 + 1 for t in report.reference_tokens)


def test_correct_port_passes_the_noise_floor_rule_in_bfloat16(tiny_llama, references):
    report = compare(tiny_llama, references=references('bfloat16'))
    assert report.passed, report.summary()
    # the rule is doing work: every tap past the embedding has a non-zero floor and an error of that size
    floors = [t.floor.rel_l2 for t in report.main_taps if t.kind != 'embed']
    assert all(1e-4 < f < 0.1 for f in floors)
    assert max(t.port.rel_l2 / t.floor.rel_l2 for t in report.main_taps if t.kind != 'embed') < 2.0
    # the local view removes what earlier layers carried in: its floors sit below the accumulated ones
    last = [t for t in report.taps if t.tap == 'layers.2.residual' and t.phase == 'prefill']
    local, accumulated = sorted(last, key=lambda t: t.view != 'local')
    assert local.floor.rel_l2 < accumulated.floor.rel_l2


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('bug', PLANTED_BUGS, ids=[b.name for b in PLANTED_BUGS])
def test_planted_bug_is_named(tiny_llama, references, bug, dtype):
    report = compare(tiny_llama, references=references(dtype), custom_module_map=bug.module_map())
    first = report.first_divergence
    assert not report.passed
    assert first is not None, report.summary()
    assert (first.phase, first.tap) == (bug.phase, bug.tap), report.summary()
    assert first.ratio > 1.0 and math.isfinite(first.ratio)
    assert report.port_class.endswith(bug.port_class.__name__)
    if bug.phase == 'decode':  # a decode-only bug leaves every prefill tap within tolerance
        assert all(t.passed for t in report.phase_results('prefill'))
    layer, kind = first.tap.split('.')[1:] if first.layer is not None else (None, first.tap)
    assert f'first divergence: layer {layer}, {kind} ({bug.phase}' in report.summary()


def test_kv_swap_shows_at_k_and_v_but_not_q(tiny_llama, references):
    """The port's fused qkv_proj is cut by head counts into q, k and v taps: the swap shows at k itself."""
    bug = next(b for b in PLANTED_BUGS if b.name == 'kv_swapped_in_qkv')
    report = compare(tiny_llama, references=references('float32'), custom_module_map=bug.module_map())
    assert report.first_divergence.tap == 'layers.0.k'
    assert report.tap('prefill', 'layers.0.q').passed
    assert not report.tap('prefill', 'layers.0.v').passed
