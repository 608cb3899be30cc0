"""The per-layer error view's data model: rows, phases, metrics and the first divergence of a ParityReport."""
import math

import pytest

from lmdp.widgets.layer_errors import layer_error_table
from parity import ParityReport, tap_list


def test_one_row_per_tap_in_forward_order(report_factory):
    table = layer_error_table(report_factory(num_layers=3), 'prefill')
    assert [r.tap for r in table.rows] == [t.name for t in tap_list(3)]
    assert table.passed and table.first_divergence is None
    assert table.callout() == f'no divergence in prefill: all {len(tap_list(3))} taps within tolerance'


def test_first_divergence_is_the_first_failing_tap_in_forward_order_not_the_largest(report_factory):
    report = report_factory(errors={('prefill', 'layers.0.mlp'): 2e-2, ('prefill', 'logits'): 5.0})
    table = layer_error_table(report, 'prefill')
    assert table.first_divergence.tap == 'layers.0.mlp'
    assert [r.tap for r in table.rows if r.first_divergence] == ['layers.0.mlp']
    assert [r.status for r in table.rows if not r.passed] == ['FAIL', 'FAIL']
    text = table.callout()
    assert 'layer 0, mlp' in text and '2 x its tolerance' in text and 'gate/up order' in text
    # the other phase is judged on its own
    assert layer_error_table(report, 'decode').first_divergence is None


def test_phases_are_those_the_report_holds(report_factory):
    table = layer_error_table(report_factory())
    assert table.phase == 'prefill' and table.phases == ['prefill', 'decode']
    assert table.phase_labels['decode'] == 'decode (all 3 steps pooled)'
    assert '2 prompts of 5, 17 tokens' in table.phase_labels['prefill']
    assert layer_error_table(report_factory(phases=('prefill', )), 'prefill').phases == ['prefill']
    with pytest.raises(ValueError, match="phase 'decode' is not in the report"):
        layer_error_table(report_factory(phases=('prefill', )), 'decode')
    with pytest.raises(ValueError, match='metric'):
        layer_error_table(report_factory(), 'prefill', 'no_such_metric')


def test_metrics_read_the_value_floor_and_bound_in_their_own_unit(report_factory):
    report = report_factory(errors={('decode', 'layers.1.attn'): 4e-2})
    rel = layer_error_table(report, 'decode', 'rel_l2').row('layers.1.attn')
    assert (rel.value, rel.floor, rel.bound) == (4e-2, 2.5e-3, 1e-2)
    ratio = layer_error_table(report, 'decode', 'ratio').row('layers.1.attn')
    assert ratio.value == pytest.approx(4.0) and ratio.floor == pytest.approx(0.25) and ratio.bound == 1.0
    max_abs = layer_error_table(report, 'decode', 'max_abs').row('layers.1.attn')
    assert max_abs.value == pytest.approx(0.4) and max_abs.bound is None and not max_abs.passed
    cos = layer_error_table(report, 'decode', 'cosine_distance').row('layers.1.attn')
    assert cos.value == pytest.approx(1.6e-3) and cos.floor == pytest.approx(1e-5)


def test_a_tap_that_could_not_be_compared_is_shown_and_is_the_divergence(report_factory):
    report = report_factory(missing={('prefill', 'layers.1.mlp')})
    table = layer_error_table(report, 'prefill')
    row = table.row('layers.1.mlp')
    assert row.value is None and row.status == 'not compared' and row.note == 'no module for it'
    assert table.first_divergence is row and not table.passed
    assert table.callout().startswith('first divergence in prefill: layer 1, mlp (tap layers.1.mlp) could not be '
                                      'compared: no module for it')


def test_float32_reports_have_no_floor(report_factory):
    table = layer_error_table(report_factory(floors=False), 'prefill')
    assert all(r.floor is None for r in table.rows)


def test_a_saved_report_gives_the_same_table(report_factory, tmp_path):
    report = report_factory(errors={('prefill', 'layers.1.residual'): math.inf})
    loaded = ParityReport.load(report.save(str(tmp_path))['json'])
    a, b = layer_error_table(report, 'prefill'), layer_error_table(loaded, 'prefill')
    assert [(r.tap, r.value, r.passed) for r in a.rows] == [(r.tap, r.value, r.passed) for r in b.rows]
    assert b.first_divergence.tap == 'layers.1.residual' and 'not finite' in b.callout()
