"""The ipywidgets side: selectors re-render the body; and nothing imports ipywidgets until a view is built."""
import subprocess
import sys
import textwrap

import pytest


def test_selectors_rerender_the_view(report_factory):
    pytest.importorskip('ipywidgets', reason="the views need ipywidgets (pip install -e '.[notebooks]')")
    from lmdp.widgets import parity_view
    report = report_factory(errors={('decode', 'layers.1.mlp'): 0.5})
    view = parity_view(report)
    assert view.phase.value == 'prefill' and 'no divergence in prefill' in view.body.value
    view.select(phase='decode')
    assert view.table.phase == 'decode' and view.table.first_divergence.tap == 'layers.1.mlp'
    assert 'lmdp-first" data-tap="layers.1.mlp"' in view.body.value
    view.select(metric='ratio')
    assert view.table.metric.key == 'ratio' and 'error / tolerance' in view.body.value
    assert [label for label, _ in view.phase.options][1] == 'decode (all 3 steps pooled)'
    assert 'application/vnd.jupyter.widget-view+json' in view._repr_mimebundle_()


def test_the_engine_harness_and_data_models_run_without_ipywidgets():
    code = textwrap.dedent('''
        import sys
        sys.modules['ipywidgets'] = None          # any import of it now raises ImportError
        import lmdp, lmdp.widgets, parity
        from lmdp.widgets import layer_error_table, scan_host_syncs, graph_eligibility, weight_coverage
        from lmdp.widgets.layer_error_view import render_html
        from parity import ParityReport
        report = ParityReport('/m', 'A', 'p', 'float32', 'cpu', [3], 0, 'rule')
        try:
            lmdp.widgets.parity_view(report)
        except ImportError as e:
            print('refused:', e)
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: lmdp's notebook views need ipywidgets: pip install -e '.[notebooks]'" in out.stdout
