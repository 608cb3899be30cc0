"""A self-contained HTML page for a ParityReport: the per-layer error plot (inline SVG), the tap table, the checks.

No scripts and no external resources, so the file can be mailed, attached to a CI run or opened offline.
"""
import html
import math

_COLORS = {'prefill': '#1f6fb4', 'decode': '#e07b00'}
_W, _H, _PAD_L, _PAD_R, _PAD_T, _PAD_B = 960, 340, 64, 16, 16, 80


def _log(v: float) -> float | None:
    return math.log10(v) if v and v > 0 and math.isfinite(v) else None


def _plot(report) -> str:
    names = list(dict.fromkeys(t.tap for t in report.taps))
    if not names:
        return ''
    values = [v for t in report.taps if t.port is not None
              for v in (t.port.rel_l2, t.tolerance, t.floor.rel_l2 if t.floor else None) if _log(v) is not None]
    lo = math.floor(min([_log(v) for v in values] + [-8.0]))
    hi = math.ceil(max([_log(v) for v in values] + [0.0]))
    x = lambda i: _PAD_L + (i + 0.5) * (_W - _PAD_L - _PAD_R) / len(names)  # noqa: E731
    y = lambda v: _PAD_T + (hi - max(min(_log(v) if _log(v) is not None else lo, hi), lo)) / (hi - lo) * (  # noqa: E731
        _H - _PAD_T - _PAD_B)
    out: list[str] = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
                      'font-family="sans-serif" font-size="11">']
    for decade in range(lo, hi + 1):
        yy = y(10.0**decade)
        out.append(f'<line x1="{_PAD_L}" x2="{_W - _PAD_R}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#ddd"/>'
                   f'<text x="{_PAD_L - 6}" y="{yy + 4:.1f}" text-anchor="end">1e{decade}</text>')
    for i, name in enumerate(names):
        if name.endswith('.input_norm') or '.' not in name:
            label = f"layer {name.split('.')[1]}" if name.startswith('layers.') else name
            out.append(f'<text transform="translate({x(i):.1f},{_H - _PAD_B + 12}) rotate(60)">'
                       f'{html.escape(label)}</text>')
    for phase, color in _COLORS.items():
        results = [report.tap(phase, n) for n in names]
        if not any(results):
            continue
        for key, dash, width in (('tolerance', '5,4', 1), ('port', '', 2)):
            pts = [(x(i), y(r.tolerance if key == 'tolerance' else r.port.rel_l2))
                   for i, r in enumerate(results) if r is not None and r.port is not None]
            if pts:
                out.append(f'<polyline fill="none" stroke="{color}" stroke-width="{width}" stroke-dasharray="{dash}" '
                           f'points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}"/>')
        for i, r in enumerate(results):
            if r is not None and r.port is not None and not r.passed:
                out.append(f'<circle cx="{x(i):.1f}" cy="{y(r.port.rel_l2):.1f}" r="4" fill="#c00">'
                           f'<title>{html.escape(r.describe())}</title></circle>')
    first = report.first_divergence
    if first is not None:
        xx = x(names.index(first.tap))
        out.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{_PAD_T}" y2="{_H - _PAD_B}" stroke="#c00" '
                   'stroke-dasharray="2,2"/>')
    legend = [('prefill: port error', _COLORS['prefill'], ''), ('prefill: tolerance', _COLORS['prefill'], '5,4'),
              ('decode: port error', _COLORS['decode'], ''), ('decode: tolerance', _COLORS['decode'], '5,4')]
    for k, (text, color, dash) in enumerate(legend):
        lx = _PAD_L + 10 + k * 170
        out.append(f'<line x1="{lx}" x2="{lx + 24}" y1="{_H - 8}" y2="{_H - 8}" stroke="{color}" stroke-width="2" '
                   f'stroke-dasharray="{dash}"/><text x="{lx + 28}" y="{_H - 4}">{text}</text>')
    out.append(f'<text x="14" y="{_PAD_T + 120}" transform="rotate(-90 14 {_PAD_T + 120})">relative L2 error vs '
               'the truth (layer-local view)</text></svg>')
    return '\n'.join(out)


def _fmt(v, spec='.2e') -> str:
    return '-' if v is None else format(v, spec)


def _tap_rows(report) -> str:
    rows = []
    for t in report.main_taps:
        cls = 'fail' if not t.passed else ''
        acc = report.tap(t.phase, t.tap, 'accumulated')
        acc_err = _fmt(acc.port.rel_l2) if acc is not None and acc.port is not None else '-'
        if t.port is None:
            rows.append(f'<tr class="fail"><td>{t.phase}</td><td>{html.escape(t.tap)}</td>'
                        f'<td colspan="7">not compared: {html.escape(t.error or "")}</td><td>{acc_err}</td>'
                        '<td>FAIL</td></tr>')
            continue
        scale = t.port.gain - t.floor.gain if t.floor is not None else None
        rows.append(f'<tr class="{cls}"><td>{t.phase}</td><td>{html.escape(t.tap)}</td>'
                    f'<td>{_fmt(t.port.rel_l2)}</td><td>{_fmt(t.floor.rel_l2 if t.floor else None)}</td>'
                    f'<td>{_fmt(t.tolerance)}</td><td>{_fmt(scale, "+.2e")}</td>'
                    f'<td>{_fmt(t.port.max_abs, ".3e")}</td><td>{tuple(t.port.where)}</td>'
                    f'<td>{_fmt(t.port.cosine, ".6f")}</td><td>{acc_err}</td>'
                    f'<td>{"ok" if t.passed else "FAIL"}</td></tr>')
    return '\n'.join(rows)


def render_html(report) -> str:
    verdict = 'PASS' if report.passed else 'FAIL'
    checks = '\n'.join(f'<li class="{c.status}"><b>{c.status}</b> {html.escape(c.id)}: {html.escape(c.detail)}</li>'
                       for c in report.checks)
    timings = ', '.join(f'{k} {v:.1f} s' for k, v in report.timings.items())
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>lmdp parity: {html.escape(report.model_path)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
td:nth-child(2), td:first-child {{ text-align: left; }}
tr.fail td {{ background: #fde2e2; }}
li.failed {{ color: #a00; }} li.skipped {{ color: #777; }}
.verdict {{ font-size: 1.3em; font-weight: bold; }}
</style></head><body>
<h1>lmdp parity</h1>
<p>{html.escape(report.model_path)} &mdash; {html.escape(report.architecture)} &rarr;
{html.escape(report.port_class)}; {report.dtype} on {html.escape(report.device)};
{len(report.prompt_lengths)} prompts of {', '.join(map(str, report.prompt_lengths))} tokens packed in one prefill,
{report.decode_steps} decode steps.</p>
<p class="verdict">{verdict} &mdash; {html.escape(report.divergence_line())}</p>
<p>Rule: {html.escape(report.rule)}.</p>
{_plot(report)}
<h2>Whole-model checks</h2><ul>{checks}</ul>
<h2>Taps</h2>
<p>Errors are the layer-local view's (each layer fed the reference's own input), which the verdicts come from;
the accumulated column is the port run end to end.</p>
<table><tr><th>phase</th><th>tap</th><th>local rel L2 err</th><th>floor</th><th>tolerance</th><th>scale error</th>
<th>max |a-b|</th><th>at (seq, token, channel)</th><th>worst cosine</th><th>accumulated err</th><th></th></tr>
{_tap_rows(report)}
</table>
<p>Time: {html.escape(timings)}</p>
</body></html>
"""
