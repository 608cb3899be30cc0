"""The per-layer error view's data: for one phase and one metric of a ParityReport, one row per tap in forward
order, each with its value, the noise floor, the bound it is judged by, the verdict, and the first divergence.

A ParityReport (parity/report.py) holds the phases it ran: 'prefill', 'decode' (every decode step pooled) and,
with more than one decode step, each step alone ('decode.0', ...).
"""
import math
from collections.abc import Callable
from dataclasses import dataclass, field

# What to look at first when a tap of this kind is the first to diverge.
SUSPECTS: dict[str, str] = {
    'embed': 'the embedding lookup or its scale (Gemma multiplies by sqrt(hidden_size))',
    'input_norm': "the layer's input norm: its eps and its weight convention (Gemma's (1 + w)), or what feeds it",
    'q': 'the q projection: which checkpoint tensor fills which part of qkv_proj',
    'k': 'the k projection: which checkpoint tensor fills which part of qkv_proj',
    'v': 'the v projection: which checkpoint tensor fills which part of qkv_proj',
    'attn': 'attention: q/k/v stacking, rotary (halves, theta, scaling), the score scale, GQA grouping, sliding '
            'window, softcap, o_proj',
    'mlp': 'the MLP and the norm before it: gate/up order, the activation (exact or tanh GELU, SiLU)',
    'residual': 'the residual stream: a branch dropped, added twice, or normed where it should not be',
    'final_norm': 'the final norm',
    'logits': 'lm_head: tying to the embeddings, a final softcap, the vocabulary size',
}


@dataclass(frozen=True)
class Metric:
    """A way to read a tap's error. `bound` is None where the report has no tolerance in that unit."""
    key: str
    label: str
    read: Callable[[object], float]                  # Metrics -> value
    bound: Callable[[object], float] | None       # TapResult -> bound


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric('rel_l2', 'relative L2 error', lambda m: m.rel_l2, lambda t: t.tolerance),
    Metric('ratio', 'error / tolerance', lambda m: m.rel_l2, lambda t: 1.0),   # divided by the tolerance below
    Metric('max_abs', 'max |port - reference|', lambda m: m.max_abs, None),
    Metric('gain', 'scale error (gain over the truth)', lambda m: m.gain, None),
    Metric('cosine_distance', '1 - worst token cosine', lambda m: 1.0 - m.cosine, None),
)}


@dataclass
class LayerErrorRow:
    tap: str
    kind: str
    layer: int | None
    value: float | None        # None: the tap could not be compared (see note)
    floor: float | None        # transformers in the test dtype, same metric; None in float32 runs
    bound: float | None        # the tolerance in this metric's unit, if it has one
    passed: bool                  # the tap's verdict (always judged on relative L2 error)
    where: tuple | None = None     # (sequence, token, channel) of the largest |port - reference|
    note: str = ''
    first_divergence: bool = False
    impl: str | None = None    # on the transformers fallback: 'native', 'mixed' or 'fallback' (None: a port)

    @property
    def status(self) -> str:
        if self.value is None:
            return 'not compared'
        return 'ok' if self.passed else 'FAIL'


@dataclass
class LayerErrorTable:
    """What the per-layer view shows for one (phase, metric)."""
    phase: str
    phase_label: str
    metric: Metric
    rows: list[LayerErrorRow]
    phases: list[str]                         # every phase the report holds, for the selector
    rule: str
    first_divergence: LayerErrorRow | None = None
    phase_labels: dict[str, str] = field(default_factory=dict)
    view: str = 'local'
    views: list[str] = field(default_factory=lambda: ['local'])

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def row(self, tap: str) -> LayerErrorRow | None:
        return next((r for r in self.rows if r.tap == tap), None)

    def callout(self) -> str:
        """One sentence: where this phase first diverges and what to suspect, or that it does not."""
        first = self.first_divergence
        if first is None:
            bad = [r for r in self.rows if r.value is None]
            if bad:
                return f'{len(bad)} tap(s) of {self.phase} could not be compared: {bad[0].note}'
            return f'no divergence in {self.phase}: all {len(self.rows)} taps within tolerance'
        where = f'layer {first.layer}, {first.kind}' if first.layer is not None else first.tap
        if first.value is None:
            return (f'first divergence in {self.phase}: {where} (tap {first.tap}) could not be compared: '
                    f'{first.note}. Suspect {SUSPECTS.get(first.kind, "the module behind this tap")}.')
        over = ''
        if first.value is not None and self.metric.key in ('rel_l2', 'ratio'):
            ratio = first.value if self.metric.key == 'ratio' else first.value / first.bound
            over = f' ({ratio:.3g} x its tolerance)' if math.isfinite(ratio) else ' (not finite)'
        return (f'first divergence in {self.phase}: {where} (tap {first.tap}){over}. '
                f'Suspect {SUSPECTS.get(first.kind, "the module behind this tap")}.')


def phase_labels(report) -> dict[str, str]:
    phases = list(dict.fromkeys(t.phase for t in report.taps))
    lengths = ', '.join(map(str, report.prompt_lengths))
    labels = {}
    for p in phases:
        if p == 'prefill':
            labels[p] = f'prefill ({len(report.prompt_lengths)} prompts of {lengths} tokens, packed)'
        elif p == 'decode':
            labels[p] = f'decode (all {report.decode_steps} steps pooled)'
        elif p.startswith('decode.'):
            labels[p] = f'decode step {int(p.split(".")[1]) + 1} of {report.decode_steps}'
        else:
            labels[p] = p
    return labels


def _row(t, metric: Metric) -> LayerErrorRow:
    base = dict(tap=t.tap, kind=t.kind, layer=t.layer, passed=bool(t.passed))
    if t.port is None:
        return LayerErrorRow(**base, value=None, floor=None, bound=None, note=t.error or 'not compared')
    value = metric.read(t.port)
    floor = metric.read(t.floor) if t.floor is not None else None
    if metric.key == 'ratio':
        value = value / t.tolerance
        floor = floor / t.tolerance if floor is not None else None
    bound = metric.bound(t) if metric.bound else None
    where = tuple(t.port.where) if t.port.max_abs > 0 else None     # an exact match has no worst place
    return LayerErrorRow(**base, value=value, floor=floor, bound=bound, where=where)


VIEW_LABELS = {'local': 'layer-local (each layer fed the reference\'s input: its own error)',
               'accumulated': 'accumulated (the port end to end: errors carried from earlier layers)'}


def layer_error_table(report, phase: str | None = None, metric: str = 'rel_l2',
                      view: str = 'local') -> LayerErrorTable:
    """The per-layer view of `report` (a parity.ParityReport) for `phase` (default: the first), `metric` and `view`
    ('local': every layer run on the reference's own input, what verdicts come from; 'accumulated': end to end)."""
    labels = phase_labels(report)
    phases = list(labels)
    if not phases:
        raise ValueError('the report holds no taps (did the parity run fail before comparing anything?)')
    phase = phase or phases[0]
    if phase not in labels:
        raise ValueError(f'phase {phase!r} is not in the report; it has {phases}')
    if metric not in METRICS:
        raise ValueError(f'metric {metric!r} is not one of {list(METRICS)}')
    views = list(dict.fromkeys(getattr(t, 'view', 'local') for t in report.taps))
    if view not in views:
        raise ValueError(f'view {view!r} is not in the report; it has {views}')
    m = METRICS[metric]
    rows = [_row(t, m) for t in report.taps if t.phase == phase and getattr(t, 'view', 'local') == view]
    impls = getattr(report, 'module_impls', None) or {}
    for r in rows:
        r.impl = impls.get(r.tap)
    first = report.first_divergence_in(phase, view)
    first_row = None
    if first is not None:
        first_row = next(r for r in rows if r.tap == first.tap)
        first_row.first_divergence = True
    return LayerErrorTable(phase, labels[phase], m, rows, phases, report.rule, first_row, labels, view, views)
