"""The weight-coverage view: a verdict, parameters never loaded, checkpoint tensors unused, the stacked shards."""
from ._html import callout, cell, esc, page, table
from ._ipywidgets import View, require
from .weight_coverage import WeightCoverage, coverage_of_checkpoint, weight_coverage


def _missing_tr(m) -> str:
    hint = f'<code>{esc(m.checkpoint_hint)}</code>' if m.checkpoint_hint else '-'
    return (f'<tr class="lmdp-missing-row lmdp-fail">{cell("<code>" + esc(m.param) + "</code>", text=True)}'
            f'{cell(esc(m.shard or "-"))}{cell(hint, text=True)}</tr>')


def _unused_tr(name: str) -> str:
    return f'<tr class="lmdp-unused-row lmdp-fail">{cell("<code>" + esc(name) + "</code>", text=True)}</tr>'


def _stacked_tr(s) -> str:
    filled = ', '.join(f'<code>{esc(c)}</code>' for c in s.filled_by) or 'nothing'
    expected = f'<code>{esc(s.expected)}</code>' if s.expected else '-'
    return (f'<tr class="lmdp-stacked-row {"lmdp-ok" if s.ok else "lmdp-fail"}">'
            f'{cell("<code>" + esc(s.param) + "</code>", text=True)}{cell(esc(s.shard))}{cell(filled, text=True)}'
            f'{cell(expected, text=True)}</tr>')


def render_html(c: WeightCoverage) -> str:
    parts = [callout(f'<b>{esc(c.model_class)}</b>: {esc(c.verdict())}', 'good' if c.ok else 'bad')]
    if c.missing:
        parts += ['<div><b>Parameters never loaded</b></div>',
                  table(['parameter', 'shard', 'checkpoint tensor expected'], map(_missing_tr, c.missing),
                        'lmdp-coverage-missing')]
    if c.unused:
        parts += ['<div><b>Checkpoint tensors that matched no parameter</b></div>',
                  table(['checkpoint tensor'], map(_unused_tr, c.unused), 'lmdp-coverage-unused')]
    if c.stacked:
        parts += ['<div><b>Stacked parameters</b>: which checkpoint tensor filled each shard</div>',
                  table(['parameter', 'shard', 'filled by', 'expected (packed_modules_mapping)'],
                        map(_stacked_tr, c.stacked), 'lmdp-coverage-stacked')]
    if c.stacked_params_mapping:
        rows = (f'<tr>{cell(esc(p), text=True)}{cell(esc(w), text=True)}{cell(esc(repr(s)))}</tr>'
                for p, w, s in c.stacked_params_mapping)
        parts += ['<div>stacked_params_mapping (parameter, checkpoint name, shard id):</div>',
                  table(['parameter', 'checkpoint', 'shard'], rows, 'lmdp-coverage-mapping')]
    if c.ignored:
        parts.append(f'<div>ignored on purpose (ignored_checkpoint_keys): {esc(", ".join(c.ignored))}</div>')
    return page(*parts)


class CoverageView(View):
    """Displays as the widget; `.data` is the WeightCoverage it shows."""

    def __init__(self, data: WeightCoverage):
        w = require()
        self.data = data
        self.widget = w.VBox([w.HTML(render_html(data))])


def coverage_view(target, model_path=None, custom_module_map=None) -> CoverageView:
    """Weight coverage of a port: `coverage_view(model, path)`, `coverage_view(path, custom_module_map=...)`, or
    a WeightCoverage (e.g. `coverage_from_report(report)`)."""
    if isinstance(target, WeightCoverage):
        data = target
    elif isinstance(target, (str, bytes)) or hasattr(target, '__fspath__'):
        data = coverage_of_checkpoint(str(target), custom_module_map)
    else:
        data = weight_coverage(target, model_path)
    return CoverageView(data)
