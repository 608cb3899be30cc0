"""The per-layer error view of a ParityReport: phase and metric selectors over a callout, a log plot and a table."""

from ._html import callout, cell, esc, fmt, page, table
from ._ipywidgets import View, require
from .layer_errors import METRICS, VIEW_LABELS, LayerErrorTable, layer_error_table
from .log_plot import render_svg

HEADERS = ['#', 'tap', 'value', 'floor', 'bound', 'status', 'largest difference at (seq, token, channel)']


def _tr(i: int, r, impl_column: bool = False) -> str:
    cls = 'lmdp-tap-row ' + ('lmdp-first' if r.first_divergence else 'lmdp-ok' if r.passed else 'lmdp-fail')
    where = '' if r.where is None else esc(r.where)
    note = f' {esc(r.note)}' if r.note else ''
    impl = cell(esc(r.impl or '-'), text=True, cls=f'lmdp-impl-{r.impl or "none"}') if impl_column else ''
    return (f'<tr class="{cls}" data-tap="{esc(r.tap)}" data-impl="{esc(r.impl or "")}">{cell(i)}'
            f'{cell(esc(r.tap), text=True)}{impl}{cell(fmt(r.value))}'
            f'{cell(fmt(r.floor))}{cell(fmt(r.bound))}{cell(esc(r.status), cls="lmdp-status")}'
            f'{cell(where + note, text=True)}</tr>')


def render_html(t: LayerErrorTable) -> str:
    """The view's body for one (phase, metric): callout, plot, table."""
    bound_note = '' if t.metric.bound else (' This metric has no tolerance of its own; the colours are the '
                                            "tap's verdict on relative L2 error.")
    # a port on the transformers fallback: which module behind each tap is native lmdp, which transformers' code
    impl_column = any(r.impl for r in t.rows)
    headers = HEADERS[:2] + ['module'] + HEADERS[2:] if impl_column else HEADERS
    rows = table(headers, (_tr(i, r, impl_column) for i, r in enumerate(t.rows)), 'lmdp-layer-errors',
                 f'data-phase="{esc(t.phase)}" data-view="{esc(t.view)}" data-rows="{len(t.rows)}"')
    verdicts = '' if t.view == 'local' else (' Verdicts come from the layer-local view; this view shows how errors '
                                             'carry through the model.')
    return page(callout(esc(t.callout()), 'bad' if t.first_divergence or not t.passed else 'good'),
                f'<div>{esc(t.phase_label)}; {esc(VIEW_LABELS.get(t.view, t.view))}; {esc(t.metric.label)}. '
                f'Rule: {esc(t.rule)}.{esc(bound_note)}{esc(verdicts)}</div>', render_svg(t), rows)


def render_header(report) -> str:
    checks = ' '.join(f'<span title="{esc(c.detail)}" style="margin-right:8px">{esc(c.id)}: '
                      f'<b>{esc(c.status)}</b></span>' for c in report.checks)
    verdict = 'PASS' if report.passed else 'FAIL'
    return page(f'<div><b>{verdict}</b> {esc(report.architecture)} &rarr; <code>{esc(report.port_class)}</code>, '
                f'{esc(report.dtype)} on {esc(report.device)}; {esc(report.divergence_line())}</div>',
                f'<div>whole-model checks: {checks}</div>')


class ParityView(View):
    """`parity_view(report)`: displays as the widget; `.table` is what it shows now."""

    def __init__(self, report, phase: str | None = None, metric: str = 'rel_l2', view: str = 'local'):
        w = require()
        self.report = report
        self.table = layer_error_table(report, phase, metric, view)
        self.phase = w.Dropdown(options=[(label, p) for p, label in self.table.phase_labels.items()],
                                value=self.table.phase, description='phase',
                                layout=w.Layout(width='460px'), style={'description_width': 'initial'})
        self.metric = w.Dropdown(options=[(m.label, k) for k, m in METRICS.items()], value=metric,
                                 description='metric', layout=w.Layout(width='300px'),
                                 style={'description_width': 'initial'})
        self.view = w.Dropdown(options=[(VIEW_LABELS.get(v, v).split(' (')[0], v) for v in self.table.views],
                               value=view, description='view', layout=w.Layout(width='260px'),
                               style={'description_width': 'initial'})
        self.body = w.HTML(render_html(self.table))
        for selector in (self.phase, self.metric, self.view):
            selector.observe(self._update, names='value')
        self.widget = w.VBox([w.HTML(render_header(report)), w.HBox([self.phase, self.view, self.metric]),
                              self.body])

    def _update(self, _change=None):
        self.table = layer_error_table(self.report, self.phase.value, self.metric.value, self.view.value)
        self.body.value = render_html(self.table)

    def select(self, phase: str | None = None, metric: str | None = None,
               view: str | None = None) -> 'ParityView':
        """Change the selectors from code (what a click does)."""
        if phase is not None:
            self.phase.value = phase
        if metric is not None:
            self.metric.value = metric
        if view is not None:
            self.view.value = view
        return self


def parity_view(report, phase: str | None = None, metric: str = 'rel_l2', view: str = 'local') -> ParityView:
    """The per-layer error view of a parity.ParityReport (needs ipywidgets): phase, view (layer-local or
    accumulated) and metric selectors."""
    return ParityView(report, phase, metric, view)
