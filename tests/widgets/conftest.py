"""Hand-made parity reports: the widgets' data models are tested on known numbers, with no model run."""
import pytest

from parity import CheckResult, Metrics, ParityReport, TapResult, tap_list


def make_report(num_layers=2, errors=None, floors=True, phases=('prefill', 'decode'), missing=()):
    """A bfloat16-style report: every tap at 1e-3 against a 1e-2 tolerance, except `errors[(phase, tap)]`.

    floors: give each tap a noise floor (2.5e-3). missing: (phase, tap) pairs that could not be compared.
    """
    errors = errors or {}
    taps = []
    for phase in phases:
        for i, tap in enumerate(tap_list(num_layers)):
            base = dict(phase=phase, tap=tap.name, kind=tap.kind, layer=tap.layer, tolerance=1e-2)
            if (phase, tap.name) in missing:
                taps.append(TapResult(**base, port=None, floor=None, passed=False, error='no module for it'))
                continue
            rel = errors.get((phase, tap.name), 1e-3)
            port = Metrics(max_abs=10 * rel, where=(0, i, 3), rel_l2=rel, cosine=1 - rel ** 2)
            floor = Metrics(max_abs=0.025, where=(0, 0, 0), rel_l2=2.5e-3, cosine=1 - 1e-5) if floors else None
            taps.append(TapResult(**base, port=port, floor=floor, passed=rel <= 1e-2))
    report = ParityReport(model_path='/m', architecture='LlamaForCausalLM', port_class='my.Port', dtype='bfloat16',
                          device='cpu', prompt_lengths=[5, 17], decode_steps=3, rule='a rule', taps=taps)
    report.checks = [CheckResult('weight_coverage', None, 'failed', 'two problems',
                                 data={'missing': ["model.layers.0.self_attn.qkv_proj.weight [shard 'k']"],
                                       'unused': ['model.layers.0.self_attn.k_proj.weight']}),
                     CheckResult('cuda_graph', None, 'skipped', 'needs a CUDA device')]
    return report


@pytest.fixture
def report_factory():
    return make_report
