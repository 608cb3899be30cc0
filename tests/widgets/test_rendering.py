"""The HTML and SVG the views show, read back as text: one table row per tap, colours by verdict, the callout."""
import math
import xml.etree.ElementTree as ET

from lmdp.widgets import coverage_from_report
from lmdp.widgets.layer_error_view import render_html as parity_html
from lmdp.widgets.layer_errors import layer_error_table
from lmdp.widgets.log_plot import render_svg
from lmdp.widgets.weight_coverage_view import render_html as coverage_html
from parity import tap_list

SVG = '{http://www.w3.org/2000/svg}'


def test_table_has_one_row_per_tap_and_marks_the_first_divergence(report_factory):
    report = report_factory(num_layers=3, errors={('prefill', 'layers.1.input_norm'): 0.3,
                                                  ('prefill', 'layers.2.attn'): 0.5})
    page = parity_html(layer_error_table(report, 'prefill'))
    assert page.count('class="lmdp-tap-row') == len(tap_list(3))
    assert f'data-rows="{len(tap_list(3))}"' in page
    assert page.count('lmdp-tap-row lmdp-first') == 1
    assert 'lmdp-tap-row lmdp-first" data-tap="layers.1.input_norm"' in page
    assert page.count('lmdp-tap-row lmdp-fail') == 1        # layers.2.attn; the first one is marked as first
    assert 'first divergence in prefill: layer 1, input_norm' in page


def test_plot_has_a_point_per_compared_tap_coloured_by_verdict(report_factory):
    report = report_factory(errors={('prefill', 'embed'): 0.0, ('prefill', 'layers.0.attn'): 0.2,
                                    ('prefill', 'logits'): math.inf}, missing={('prefill', 'layers.1.mlp')})
    table = layer_error_table(report, 'prefill')
    root = ET.fromstring(render_svg(table))
    points = {c.get('data-tap'): c for c in root.iter(f'{SVG}circle')}
    assert set(points) == {r.tap for r in table.rows if r.value is not None}
    assert points['layers.0.attn'].get('data-status') == 'FAIL' and points['layers.0.attn'].get('fill') == '#c62828'
    assert points['layers.0.mlp'].get('fill') == '#2e7d32'
    assert points['embed'].get('fill') == 'white'              # an exact match sits hollow on the bottom edge
    ys = [float(c.get('cy')) for c in points.values()]
    assert float(points['logits'].get('cy')) == min(ys)        # inf is pinned to the top
    assert float(points['embed'].get('cy')) == max(ys)
    texts = ''.join(t.text or '' for t in root.iter(f'{SVG}text'))
    assert 'first divergence: layers.0.attn' in texts
    # the error rises with the tap; a log axis puts 0.2 above 1e-3
    assert float(points['layers.0.attn'].get('cy')) < float(points['layers.0.mlp'].get('cy'))


def test_coverage_from_a_report_lists_missing_shards_and_unused_tensors(report_factory):
    data = coverage_from_report(report_factory())
    assert not data.ok
    assert [(m.param, m.shard) for m in data.missing] == [('model.layers.0.self_attn.qkv_proj.weight', "'k'")]
    page = coverage_html(data)
    assert page.count('lmdp-missing-row') == 1 and page.count('lmdp-unused-row') == 1
    assert 'model.layers.0.self_attn.k_proj.weight' in page
