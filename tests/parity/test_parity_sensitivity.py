"""The harness catches small errors and names the module they are in (float32 on the CPU; the bfloat16 GPU
acceptance runs scripts/parity_sensitivity.py on the device)."""
import pytest

from lmdp.models.llama import LlamaForCausalLM
from parity import compare
from parity.sensitivity import MODULE_KINDS, planted_eps, planted_scale

LLAMA_KINDS = [k for k in MODULE_KINDS if k not in ('q_norm', 'k_norm')]


def _named(report, tap_kind, layer):
    first = report.first_divergence
    return first is not None and first.kind == tap_kind and (layer is None or first.layer == layer)


@pytest.mark.parametrize('kind', LLAMA_KINDS)
def test_a_one_in_ten_thousand_scale_error_is_named_in_float32(tiny_llama, references, kind):
    spec = MODULE_KINDS[kind]
    bug = planted_scale(LlamaForCausalLM, kind, 1, 1e-4)
    report = compare(tiny_llama, references=references('float32'), custom_module_map={'LlamaForCausalLM': bug})
    assert _named(report, spec.tap, 1 if spec.per_layer else None), report.divergence_line()
    # and the same scale in the other direction, at the other end of the model
    bug = planted_scale(LlamaForCausalLM, kind, 2, -1e-4)
    report = compare(tiny_llama, references=references('float32'), custom_module_map={'LlamaForCausalLM': bug})
    assert _named(report, spec.tap, 2 if spec.per_layer else None), report.divergence_line()


@pytest.mark.parametrize('norm', ['input_norm', 'mlp_norm', 'final_norm'])
def test_eps_1e5_instead_of_1e6_is_named_at_that_norm(tiny_llama, references, norm):
    bug = planted_eps(LlamaForCausalLM, norm, 1, 1e-5)
    report = compare(tiny_llama, references=references('float32'), custom_module_map={'LlamaForCausalLM': bug})
    assert _named(report, norm, None if norm == 'final_norm' else 1), report.divergence_line()


@pytest.mark.parametrize('kind', ['q_proj', 'o_proj', 'mlp', 'input_norm'])
def test_half_a_percent_is_named_in_bfloat16(tiny_llama, references, kind):
    """The GPU acceptance's bfloat16 case, here on the CPU reference kernels."""
    spec = MODULE_KINDS[kind]
    bug = planted_scale(LlamaForCausalLM, kind, 1, 5e-3)
    report = compare(tiny_llama, references=references('bfloat16'), custom_module_map={'LlamaForCausalLM': bug})
    assert _named(report, spec.tap, 1), report.divergence_line()
    assert report.first_divergence.failed_rule == 'gain'     # under the error tolerance: the scale gives it away


def test_the_local_view_keeps_a_layer_0_bug_out_of_later_layers(tiny_llama, references):
    """A 10% MLP error in layer 0 fails later layers end to end, but each later layer is right on its own input,
    in prefill and in decode (whose cache was written from the substituted input too)."""
    bug = planted_scale(LlamaForCausalLM, 'mlp', 0, 0.1)
    report = compare(tiny_llama, references=references('float32'), custom_module_map={'LlamaForCausalLM': bug})
    assert report.first_divergence.tap == 'layers.0.mlp'
    for phase in ('prefill', 'decode'):
        later = [t for t in report.phase_results(phase) if t.layer is not None and t.layer > 0]
        assert later and all(t.passed for t in later), [t.describe() for t in later if not t.passed][:3]
        carried = [t for t in report.phase_results(phase, 'accumulated') if t.layer is not None and t.layer > 0]
        assert not all(t.passed for t in carried)


def test_a_scale_in_a_fused_reference_projection_is_expected_at_the_next_tap():
    """Phi-3's transformers fuses q/k/v (no q/k/v taps): the planted scale must be named downstream, not missed."""
    from parity.sensitivity import expected_tap
    dense = {'q', 'k', 'v', 'q_norm', 'k_norm', 'q_rot', 'k_rot', 'attn_core'}
    assert [expected_tap(k, dense) for k in ('q_proj', 'k_proj', 'v_proj')] == ['q', 'k', 'v']
    fused = {'q_rot', 'k_rot', 'attn_core', 'attn'}
    assert [expected_tap(k, fused) for k in ('q_proj', 'k_proj', 'v_proj')] == ['q_rot', 'k_rot', 'attn_core']
    assert expected_tap('q_proj', fused | {'q_norm'}) == 'q_norm'
    assert expected_tap('mlp', fused) == 'mlp'


def test_a_planted_rotary_scale_reaches_every_layer_type():
    """Gemma 3's rotary returns a dict of (cos, sin) per layer type; a scale that skipped it planted nothing."""
    import torch

    from parity.sensitivity import _scale_all
    out = {'full_attention': (torch.ones(2), torch.ones(2)), 'sliding_attention': [torch.ones(3), 2 * torch.ones(3)]}
    scaled = _scale_all(out, 1.5)
    assert set(scaled) == set(out)
    assert all(torch.equal(a, 1.5 * b) for k in out for a, b in zip(scaled[k], out[k]))
    assert isinstance(scaled['sliding_attention'], list)
