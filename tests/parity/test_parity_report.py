"""ParityReport: console table, JSON round trip, self-contained HTML, weight coverage."""
import math
import xml.etree.ElementTree as ET

from lmdp.models.llama import LlamaForCausalLM
from parity import ParityReport, compare
from parity.planted_bugs import PLANTED_BUGS


def _bug(name):
    return next(b for b in PLANTED_BUGS if b.name == name)


def test_report_round_trips_through_json_and_html(tiny_llama, references, tmp_path):
    bug = _bug('mlp_dropped_layer1')
    report = compare(tiny_llama, references=references('bfloat16'), custom_module_map=bug.module_map())
    paths = report.save(str(tmp_path / 'out'))
    loaded = ParityReport.load(paths['json'])
    assert loaded.first_divergence.tap == 'layers.1.residual'
    assert loaded.to_dict() == report.to_dict()
    assert loaded.tap('decode', 'layers.2.mlp').port.where == report.tap('decode', 'layers.2.mlp').port.where

    page = open(paths['html'], encoding='utf-8').read()
    assert '<script' not in page and 'src=' not in page and 'href=' not in page    # self-contained
    svg = page[page.index('<svg'):page.index('</svg>') + 6]
    root = ET.fromstring(svg)                                                      # well-formed inline plot
    assert root.findall('.//{http://www.w3.org/2000/svg}polyline')
    assert 'first divergence: layer 1, residual (prefill' in page


def test_per_layer_series_for_plots(tiny_llama, references):
    report = compare(tiny_llama, references=references('bfloat16'),
                     custom_module_map=_bug('mlp_dropped_layer1').module_map())
    port, floor = report.per_layer('prefill', 'residual'), report.per_layer('prefill', 'residual', 'floor')
    tol = report.per_layer('prefill', 'residual', 'tolerance')
    assert len(port) == len(floor) == len(tol) == 3
    assert port[0] <= tol[0] and port[1] > tol[1]      # fine in layer 0, broken from layer 1 on
    assert report.per_layer('prefill', 'no_such_kind') == []


def test_console_table_has_a_row_per_tap_and_marks_the_first_divergence(tiny_llama, references):
    report = compare(tiny_llama, references=references('float32'),
                     custom_module_map=_bug('decode_position_off_by_one').module_map())
    text = report.summary()
    rows = [line for line in text.splitlines() if line.startswith(('embed', 'layers.', 'final_norm', 'logits'))]
    assert len(rows) == 12 * 3 + 3
    marked = [r for r in rows if '<- first divergence (decode)' in r]
    assert len(marked) == 1 and marked[0].startswith('layers.0.q_rot ')
    assert text.splitlines()[-2].startswith('first divergence: layer 0, q_rot (decode')
    assert text.splitlines()[-1].startswith('FAIL')


def test_nan_survives_json(tiny_llama, references, tmp_path):
    report = compare(tiny_llama, references=references('float32'))
    report.taps[3].port.rel_l2 = float('nan')
    path = report.save(str(tmp_path))['json']
    assert math.isnan(ParityReport.load(path).taps[3].port.rel_l2)


class _SkipsADownProj(LlamaForCausalLM):
    """The correct port, except that load_weights drops one checkpoint tensor on the floor."""

    def load_weights(self, weights):
        super().load_weights((n, w) for n, w in weights if n != 'model.layers.0.mlp.down_proj.weight')


def test_weight_coverage_names_what_was_not_loaded(tiny_llama, references):
    report = compare(tiny_llama, references=references('float32'),
                     custom_module_map={'LlamaForCausalLM': _SkipsADownProj})
    coverage = report.check('weight_coverage')
    assert coverage.status == 'failed'
    assert coverage.data['missing'] == ['model.layers.0.mlp.down_proj.weight']
    assert coverage.data['unused'] == ['model.layers.0.mlp.down_proj.weight']
    assert not report.passed


def test_each_decode_step_has_its_own_phase():
    """decode.k views each step alone (the notebooks' phase selector); the verdict stays the pooled phases'."""
    import tempfile

    import parity
    from lmdp.tiny import make_tiny
    from lmdp.widgets.layer_errors import layer_error_table, phase_labels
    with tempfile.TemporaryDirectory() as tmp:
        report = parity.compare(str(make_tiny('llama', tmp, num_hidden_layers=2)), prompts=2, decode_steps=3)
    phases = list(dict.fromkeys(t.phase for t in report.taps))
    assert phases == ['prefill', 'decode', 'decode.0', 'decode.1', 'decode.2']
    assert phase_labels(report)['decode.1'] == 'decode step 2 of 3'
    per_step = [report.tap(f'decode.{k}', 'logits').port.rel_l2 for k in range(3)]
    assert max(per_step) >= report.tap('decode', 'logits').port.rel_l2 * 0.99   # pooled sits among the steps
    assert len(layer_error_table(report, 'decode.2').rows) == len(report.phase_results('prefill'))
    assert len(report.main_taps) == 2 * len(report.phase_results('prefill'))
