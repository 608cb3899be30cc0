"""The CUDA-graph eligibility view: a verdict, one row per batch-size bucket, and each finding with its fix."""
from ._html import callout, cell, esc, fmt, page, table
from ._ipywidgets import View, require
from .graph_eligibility import GraphEligibility, graph_eligibility

BUCKET_HEADERS = ['batch size', 'support_cuda_graph', 'capture', 'replay vs eager (max |diff|)', 'reason', 'fix']
FINDING_HEADERS = ['where', 'code', 'what breaks', 'fix']


def _yes(value) -> str:
    return '-' if value is None else 'yes' if value else 'no'


def _bucket_tr(b) -> str:
    bad = b.supported is False or b.supported is None or b.captured is False
    cls = 'lmdp-bucket-row ' + ('lmdp-fail' if bad else 'lmdp-ok' if b.captured else 'lmdp-skip')
    replay = '-' if b.replay_max_abs is None else (
        f'{fmt(b.replay_max_abs)}' + (' (bitwise equal)' if b.replay_bitwise else ''))
    return (f'<tr class="{cls}">{cell(b.batch_size)}{cell(_yes(b.supported))}{cell(esc(b.status), cls="lmdp-status")}'
            f'{cell(replay)}{cell(esc(b.reason or ""), text=True)}{cell(esc(b.fix or ""), text=True)}</tr>')


def _finding_tr(f) -> str:
    where = cell(f'{esc(f.function)}<br>{esc(f.where)}', text=True)
    what = cell(f'{esc(f.pattern)}: {esc(f.reason)}', text=True)
    return (f'<tr class="lmdp-finding-row lmdp-fail">{where}{cell(f"<code>{esc(f.code)}</code>", text=True)}{what}'
            f'{cell(esc(f.fix), text=True)}</tr>')


def render_html(g: GraphEligibility) -> str:
    kind = 'good' if g.eligible and g.cuda else 'bad' if not g.eligible else 'info'
    parts = [callout(f'<b>{esc(g.model_class)}</b> on {esc(g.device)}: {esc(g.verdict())}', kind),
             f'<div>support_cuda_graph = <code>{esc(g.support_flag)}</code></div>']
    if g.buckets:
        parts.append(table(BUCKET_HEADERS, map(_bucket_tr, g.buckets), 'lmdp-graph-buckets'))
    if g.findings:
        parts.append(table(FINDING_HEADERS, map(_finding_tr, g.findings), 'lmdp-graph-findings'))
    else:
        parts.append('<div>source scan: no host synchronisation or data-dependent shape in the port\'s step code '
                     '(.item(), .cpu(), .tolist(), print, a Python branch on a tensor, nonzero, masked_select, '
                     'boolean-mask indexing)</div>')
    parts += [f'<div class="lmdp-note">{esc(n)}</div>' for n in g.notes]
    return page(*parts)


class CudaGraphView(View):
    """Displays as the widget; `.data` is the GraphEligibility it shows."""

    def __init__(self, data: GraphEligibility):
        w = require()
        self.data = data
        self.widget = w.VBox([w.HTML(render_html(data))])


def cuda_graph_view(target, **kwargs) -> CudaGraphView:
    """The CUDA-graph eligibility view; arguments as `graph_eligibility` (a GraphEligibility is shown as is)."""
    data = target if isinstance(target, GraphEligibility) else graph_eligibility(target, **kwargs)
    return CudaGraphView(data)
