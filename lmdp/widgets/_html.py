"""Small HTML pieces the three views share: one stylesheet, number formatting, tables.

The views are plain HTML (no scripts): it renders the same in JupyterLab, in a static notebook export and in a
headless browser, and tests can read it as text.
"""
import html
import math
from collections.abc import Iterable, Sequence

OK, FAIL, SKIP = '#2e7d32', '#c62828', '#757575'

STYLE = """<style>
.lmdp-view { font-family: sans-serif; font-size: 12px; color: #222; }
.lmdp-view table { border-collapse: collapse; margin: 4px 0 8px 0; }
.lmdp-view th, .lmdp-view td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
.lmdp-view th { background: #f3f3f3; text-align: left; }
.lmdp-view td.lmdp-text { text-align: left; }
.lmdp-view tr.lmdp-fail td { background: #fde2e2; }
.lmdp-view tr.lmdp-ok td.lmdp-status { color: #2e7d32; font-weight: bold; }
.lmdp-view tr.lmdp-fail td.lmdp-status { color: #c62828; font-weight: bold; }
.lmdp-view tr.lmdp-first td { background: #f9c0c0; font-weight: bold; }
.lmdp-view tr.lmdp-skip td { color: #757575; }
.lmdp-view .lmdp-callout { padding: 6px 10px; margin: 6px 0; border-left: 5px solid; }
.lmdp-view .lmdp-callout.lmdp-bad { border-color: #c62828; background: #fdecec; }
.lmdp-view .lmdp-callout.lmdp-good { border-color: #2e7d32; background: #eaf5ea; }
.lmdp-view .lmdp-callout.lmdp-info { border-color: #1f6fb4; background: #eaf1f8; }
.lmdp-view code { background: #f3f3f3; padding: 0 2px; }
.lmdp-view td.lmdp-impl-native { color: #2e7d32; }
.lmdp-view td.lmdp-impl-fallback { color: #8a6d00; }
</style>"""


def esc(text) -> str:
    return html.escape('' if text is None else str(text))


def fmt(value: float | None, spec: str = '.2e') -> str:
    """A number for a table cell: '-' for none, 'inf'/'nan' spelled out."""
    if value is None:
        return '-'
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def callout(text: str, kind: str) -> str:
    """A coloured banner; kind is 'bad', 'good' or 'info'."""
    return f'<div class="lmdp-callout lmdp-{kind}">{text}</div>'


def table(headers: Sequence[str], rows: Iterable[str], cls: str, attrs: str = '') -> str:
    head = ''.join(f'<th>{esc(h)}</th>' for h in headers)
    return f'<table class="{cls}" {attrs}><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def cell(value, text: bool = False, cls: str = '') -> str:
    classes = ' '.join(c for c in ('lmdp-text' if text else '', cls) if c)
    return f'<td class="{classes}">{value}</td>' if classes else f'<td>{value}</td>'


def page(*parts: str) -> str:
    """The parts inside one styled container."""
    return f'{STYLE}<div class="lmdp-view">{"".join(parts)}</div>'
