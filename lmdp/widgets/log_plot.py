"""The per-layer view's plot: each tap's error on a log scale, its bound and its noise floor, as inline SVG.

SVG rather than matplotlib: no extra dependency, no image encoding, and the points carry their tap name and
verdict as attributes, so a test can read the plot as well as look at it.
"""
import math

from ._html import FAIL, OK, esc, fmt

W, H, LEFT, RIGHT, TOP, BOTTOM = 900, 300, 64, 16, 22, 70
ZERO_DECADE = -12     # an exact match (error 0) is drawn on the bottom edge, hollow


def _log(v: float | None) -> float | None:
    if v is None or math.isnan(v):
        return None
    if v <= 0:
        return -math.inf
    return math.log10(v) if math.isfinite(v) else math.inf


def _range(table) -> tuple:
    logs = [x for r in table.rows for x in (_log(r.value), _log(r.floor), _log(r.bound))
            if x is not None and math.isfinite(x)]
    lo = math.floor(min(logs)) if logs else -8
    hi = math.ceil(max(logs)) if logs else 0
    if any(_log(r.value) == -math.inf for r in table.rows):
        lo -= 1                     # a decade of room below everything else for the exact matches
    lo = max(min(lo, hi - 2), ZERO_DECADE)
    return lo, max(hi, lo + 1)


def render_svg(table) -> str:
    """The plot of a LayerErrorTable."""
    rows = table.rows
    if not rows:
        return ''
    lo, hi = _range(table)
    step = (W - LEFT - RIGHT) / len(rows)
    x = lambda i: LEFT + (i + 0.5) * step  # noqa: E731

    def y(v: float | None) -> float:
        lv = _log(v)
        lv = lo if lv is None or lv < lo else hi if lv > hi else lv
        return TOP + (hi - lv) / (hi - lo) * (H - TOP - BOTTOM)

    out: list[str] = [f'<svg class="lmdp-layer-plot" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
                      f'font-family="sans-serif" font-size="11" data-phase="{esc(table.phase)}" '
                      f'data-metric="{table.metric.key}">']
    for decade in range(lo, hi + 1):
        yy = y(10.0 ** decade)
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e3e3e3"/>'
                   f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end">1e{decade}</text>')
    for i, r in enumerate(rows):      # a label at each layer's first tap and at the taps outside layers
        if r.layer is None or i == 0 or rows[i - 1].layer != r.layer:
            label = f'layer {r.layer}' if r.layer is not None else r.tap
            out.append(f'<text transform="translate({x(i) - 3:.1f},{H - BOTTOM + 10}) rotate(55)">'
                       f'{esc(label)}</text>')
    bounds = [(x(i), y(r.bound)) for i, r in enumerate(rows) if r.bound is not None]
    if bounds:
        pts = ' '.join(f'{a - step / 2:.1f},{b:.1f} {a + step / 2:.1f},{b:.1f}' for a, b in bounds)
        out.append(f'<polyline class="lmdp-bound" fill="none" stroke="#555" stroke-dasharray="5,4" points="{pts}"/>')
    for i, r in enumerate(rows):
        if r.floor is not None:
            out.append(f'<rect x="{x(i) - 3:.1f}" y="{y(r.floor) - 3:.1f}" width="6" height="6" fill="#9e9e9e" '
                       f'transform="rotate(45 {x(i):.1f} {y(r.floor):.1f})"><title>floor {fmt(r.floor)}</title></rect>')
    line = [(x(i), y(r.value)) for i, r in enumerate(rows) if r.value is not None]
    if line:
        out.append('<polyline fill="none" stroke="#1f6fb4" stroke-width="1.5" points="'
                   + ' '.join(f'{a:.1f},{b:.1f}' for a, b in line) + '"/>')
    for i, r in enumerate(rows):
        if r.value is None:
            out.append(f'<text x="{x(i):.1f}" y="{TOP - 6}" text-anchor="middle" fill="{FAIL}">?</text>')
            continue
        color = OK if r.passed else FAIL
        hollow = _log(r.value) == -math.inf    # an exact match
        fill = 'white' if hollow else color
        out.append(f'<circle class="lmdp-point" data-tap="{esc(r.tap)}" data-status="{r.status}" cx="{x(i):.1f}" '
                   f'cy="{y(r.value):.1f}" r="4" fill="{fill}" stroke="{color}" stroke-width="1.5">'
                   f'<title>{esc(r.tap)}: {fmt(r.value)} ({r.status})</title></circle>')
    first = table.first_divergence
    if first is not None:
        xx = x(rows.index(first))
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{TOP}" y2="{H - BOTTOM}" stroke="{FAIL}" '
                   f'stroke-dasharray="2,2"/><text x="{min(xx + 4, W - 200):.1f}" y="{TOP - 8}" fill="{FAIL}">'
                   f'first divergence: {esc(first.tap)}</text>')
    legend = [('port vs transformers float32 (hollow: exactly equal)', '#1f6fb4', ''), ('tolerance', '#555', '5,4')]
    for k, (text, color, dash) in enumerate(legend):
        lx = LEFT + k * 330
        out.append(f'<line x1="{lx}" x2="{lx + 22}" y1="{H - 8}" y2="{H - 8}" stroke="{color}" stroke-width="2" '
                   f'stroke-dasharray="{dash}"/><text x="{lx + 26}" y="{H - 4}">{text}</text>')
    out.append(f'<rect x="{LEFT + 562}" y="{H - 12}" width="7" height="7" fill="#9e9e9e" '
               f'transform="rotate(45 {LEFT + 565} {H - 8})"/><text x="{LEFT + 574}" y="{H - 4}">noise floor '
               '(transformers in the test dtype)</text>')
    out.append(f'<text x="14" y="{TOP + 110}" transform="rotate(-90 14 {TOP + 110})">'
               f'{esc(table.metric.label)}</text></svg>')
    return '\n'.join(out)
