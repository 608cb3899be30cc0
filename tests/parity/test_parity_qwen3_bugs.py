"""Mistakes inside attention, on a Qwen3-style port (per-head q/k norms before rotary): each is named at its own tap."""
import pytest

from lmdp.models.qwen3 import Qwen3ForCausalLM
from parity import compare, run_references
from parity.planted_bugs import QWEN3_PLANTED_BUGS
from parity.sensitivity import planted_eps, planted_scale


@pytest.fixture(scope='module')
def tiny_qwen3(tmp_path_factory):
    from lmdp.tiny import make_tiny
    return str(make_tiny('qwen3', tmp_path_factory.mktemp('qwen3')))


@pytest.fixture(scope='module')
def qwen3_refs(tiny_qwen3):
    cache = {}

    def get(dtype):
        if dtype not in cache:
            cache[dtype] = run_references(tiny_qwen3, dtype=dtype, device='cpu')
        return cache[dtype]
    return get


def test_the_correct_port_passes_with_q_k_norm_taps(tiny_qwen3, qwen3_refs):
    report = compare(tiny_qwen3, references=qwen3_refs('float32'))
    assert report.passed, report.summary()
    kinds = {t.kind for t in report.main_taps}
    assert {'q_norm', 'k_norm', 'q_rot', 'k_rot', 'attn_core'} <= kinds


@pytest.mark.parametrize('bug', QWEN3_PLANTED_BUGS, ids=[b.name for b in QWEN3_PLANTED_BUGS])
def test_each_attention_mistake_is_named_at_its_tap(tiny_qwen3, qwen3_refs, bug):
    report = compare(tiny_qwen3, references=qwen3_refs('float32'), custom_module_map=bug.module_map())
    first = report.first_divergence
    assert first is not None and (first.phase, first.tap) == (bug.phase, bug.tap), report.divergence_line()


def test_the_three_attention_mistakes_are_told_apart():
    taps = {b.tap for b in QWEN3_PLANTED_BUGS if 'eps' not in b.name}
    assert taps == {'layers.0.k_norm', 'layers.0.q_norm', 'layers.0.q_rot'}


@pytest.mark.parametrize('bug', [b for b in QWEN3_PLANTED_BUGS if 'eps' not in b.name],
                         ids=[b.name for b in QWEN3_PLANTED_BUGS if 'eps' not in b.name])
def test_named_in_bfloat16_too(tiny_qwen3, qwen3_refs, bug):
    report = compare(tiny_qwen3, references=qwen3_refs('bfloat16'), custom_module_map=bug.module_map())
    assert (report.first_divergence.phase, report.first_divergence.tap) == (bug.phase, bug.tap)


@pytest.mark.parametrize('norm', ['q_norm', 'k_norm'])
def test_eps_in_one_per_head_norm_of_one_layer_is_named_there(tiny_qwen3, qwen3_refs, norm):
    bug = planted_eps(Qwen3ForCausalLM, norm, 1, 1e-5)
    report = compare(tiny_qwen3, references=qwen3_refs('float32'), custom_module_map={'Qwen3ForCausalLM': bug})
    first = report.first_divergence
    assert (first.kind, first.layer) == (norm, 1), report.divergence_line()


@pytest.mark.parametrize('norm', ['q_norm', 'k_norm'])
def test_a_one_in_ten_thousand_scale_in_a_per_head_norm_is_named(tiny_qwen3, qwen3_refs, norm):
    bug = planted_scale(Qwen3ForCausalLM, norm, 2, 1e-4)
    report = compare(tiny_qwen3, references=qwen3_refs('float32'), custom_module_map={'Qwen3ForCausalLM': bug})
    first = report.first_divergence
    assert (first.kind, first.layer) == (norm, 2), report.divergence_line()
