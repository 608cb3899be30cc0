"""ParityReport: what a parity run found, per phase and tap, plus the whole-model checks.

This is the data model notebooks and widgets read: `report.taps` (forward order, prefill first), each a
`TapResult` with the port's metrics against transformers float32, the noise floor's, the tolerance and the
verdict; `report.checks`; `report.first_divergence`. It round-trips through JSON (`to_dict` / `from_dict`).
"""
import json
import math
import os
from dataclasses import asdict, dataclass, field

from .metrics import Metrics


@dataclass
class TapResult:
    phase: str                         # 'prefill' | 'decode' (steps pooled) | 'decode.k' (step k alone)
    tap: str                           # 'layers.3.attn'
    kind: str                          # 'attn'
    layer: int | None               # 3, or None for embed / final_norm / logits
    port: Metrics | None            # the port against transformers float32
    floor: Metrics | None           # transformers in the test dtype against float32 (None in float32 runs)
    tolerance: float                   # the largest port.rel_l2 that passes
    passed: bool
    error: str | None = None        # why the tap could not be compared (then port is None)
    view: str = 'local'                # 'local': every layer fed the truth's input; 'accumulated': end to end
    gain_tolerance: float | None = None   # the largest |port.gain - floor.gain| that passes
    failed_rule: str | None = None  # 'error' | 'gain' | None

    @property
    def ratio(self) -> float:
        """port error / tolerance: above 1 fails."""
        if self.port is None:
            return math.inf
        return self.port.rel_l2 / self.tolerance

    def describe(self) -> str:
        where = f'{self.phase} {self.tap} ({self.view})'
        if self.error:
            return f'{where}: not compared: {self.error}'
        m = self.port
        floor = f', floor {self.floor.rel_l2:.2e}' if self.floor is not None else ''
        verdict = 'OVER' if self.failed_rule == 'error' else 'within'
        text = (f'{where}: relative L2 error {m.rel_l2:.2e} {verdict} tolerance {self.tolerance:.2e}{floor}; '
                f'max |a-b| {m.max_abs:.3e} at (sequence, token, channel) {m.where}; worst token cosine '
                f'{m.cosine:.6f}')
        if self.gain_tolerance is not None and self.floor is not None:
            scale = m.gain - self.floor.gain
            text += (f'; scale error {scale:+.2e} ({"OVER" if self.failed_rule == "gain" else "within"} '
                     f'{self.gain_tolerance:.1e}: the port is {1 + scale:.5f}x transformers here)')
        return text

    def to_dict(self) -> dict:
        d = asdict(self)
        d['port'] = self.port.to_dict() if self.port else None
        d['floor'] = self.floor.to_dict() if self.floor else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> 'TapResult':
        d = dict(d)
        d['port'] = Metrics.from_dict(d['port']) if d.get('port') else None
        d['floor'] = Metrics.from_dict(d['floor']) if d.get('floor') else None
        return cls(**d)


@dataclass
class CheckResult:
    """A whole-model check: 'logprob_kl', 'top5', 'greedy', 'weight_coverage', 'cuda_graph', 'cuda_graph_padded'."""
    name: str
    phase: str | None
    status: str                        # 'passed' | 'failed' | 'skipped'
    detail: str                        # one or more sentences a person can act on
    value: float | None = None
    bound: float | None = None
    data: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f'{self.name}-{self.phase}' if self.phase else self.name

    @property
    def passed(self) -> bool:
        return self.status != 'failed'


@dataclass
class ParityReport:
    model_path: str
    architecture: str
    port_class: str
    dtype: str
    device: str
    prompt_lengths: list[int]
    decode_steps: int
    rule: str
    taps: list[TapResult] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    reference_tokens: list[list[int]] = field(default_factory=list)   # transformers float32 greedy tokens
    port_tokens: list[list[int]] = field(default_factory=list)        # the port's argmax on the same prefixes
    timings: dict[str, float] = field(default_factory=dict)
    # a port on the transformers fallback (lmdp.fallback): per tap, whether the module behind it is 'native' (an
    # lmdp module swapped in), 'mixed' or 'fallback' (transformers' code); None for a port native throughout
    module_impls: dict[str, str | None] | None = None
    # a quantised checkpoint whose unquantised original is known: transformers on the original against the
    # dequantised reference, per tap (parity/quantized.py): the quantisation error, apart from the port's
    quantization: dict | None = None

    @property
    def main_taps(self) -> list[TapResult]:
        """The taps that carry the verdict: the local view of 'prefill' and 'decode' (not the per-step 'decode.k'
        views, not the accumulated view)."""
        return [t for t in self.taps if '.' not in t.phase and t.view == 'local']

    def phase_results(self, phase: str, view: str = 'local') -> list[TapResult]:
        return [t for t in self.taps if t.phase == phase and t.view == view]

    def tap(self, phase: str, name: str, view: str = 'local') -> TapResult | None:
        return next((t for t in self.taps if t.phase == phase and t.tap == name and t.view == view), None)

    @property
    def views(self) -> list[str]:
        return list(dict.fromkeys(t.view for t in self.taps))

    def per_layer(self, phase: str, kind: str, what: str = 'port', view: str = 'local') -> list[float | None]:
        """One tap kind's relative L2 error layer by layer ('port', 'floor' or 'tolerance'), for plots."""

        def value(t: TapResult | None) -> float | None:
            if t is None:
                return None
            if what == 'tolerance':
                return t.tolerance
            metrics = getattr(t, what)
            return None if metrics is None else metrics.rel_l2

        found = {t.layer: t for t in self.phase_results(phase, view) if t.kind == kind and t.layer is not None}
        return [value(found.get(i)) for i in range(max(found) + 1 if found else 0)]

    def check(self, name: str, phase: str | None = None) -> CheckResult | None:
        return next((c for c in self.checks if c.name == name and c.phase == phase), None)

    def first_divergence_in(self, phase: str, view: str = 'local') -> TapResult | None:
        """The first tap of `phase`, in forward order, that fails: over its tolerance, or a module the reference
        has and the port does not run."""
        return next((t for t in self.phase_results(phase, view) if not t.passed), None)

    @property
    def first_divergence(self) -> TapResult | None:
        """The first diverging tap: prefill's first, else decode's."""
        for phase in ('prefill', 'decode'):
            found = self.first_divergence_in(phase)
            if found is not None:
                return found
        return None

    @property
    def passed(self) -> bool:
        # the verdict is the pooled phases' ('decode.k' views each step of 'decode' alone)
        return all(t.passed for t in self.main_taps) and all(c.passed for c in self.checks)

    def divergence_line(self) -> str:
        """'first divergence: layer N, <tap> (...)', or 'first divergence: none'."""
        t = self.first_divergence
        if t is None:
            return 'first divergence: none'
        where = f'layer {t.layer}, {t.kind}' if t.layer is not None else t.tap
        if t.error:
            return f'first divergence: {where} ({t.phase}: {t.error})'
        if t.failed_rule == 'gain':
            scale = t.port.gain - t.floor.gain
            return (f'first divergence: {where} ({t.phase}: scale error {scale:+.2e} > {t.gain_tolerance:.1e}, '
                    f'the port is {1 + scale:.5f}x transformers)')
        return (f'first divergence: {where} ({t.phase}: relative L2 error {t.port.rel_l2:.2e} > tolerance '
                f'{t.tolerance:.2e})')

    def summary(self) -> str:
        from .console import format_report
        return format_report(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d['taps'] = [t.to_dict() for t in self.taps]
        d['first_divergence'] = None if self.first_divergence is None else {
            'phase': self.first_divergence.phase, 'tap': self.first_divergence.tap,
            'layer': self.first_divergence.layer, 'kind': self.first_divergence.kind}
        d['passed'] = self.passed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> 'ParityReport':
        d = {k: v for k, v in d.items() if k not in ('first_divergence', 'passed')}
        d['taps'] = [TapResult.from_dict(t) for t in d.get('taps', [])]
        d['checks'] = [CheckResult(**c) for c in d.get('checks', [])]
        return cls(**d)

    def to_json(self) -> str:
        # inf/nan are legal in a report (a NaN-producing port), so write them as JSON strings
        return json.dumps(_finite(self.to_dict()), indent=1)

    @classmethod
    def load(cls, path: str) -> 'ParityReport':
        with open(path, encoding='utf-8') as f:
            return cls.from_dict(_unfinite(json.load(f)))

    def save(self, directory: str) -> dict[str, str]:
        """Write report.json and report.html (self-contained) into `directory`; returns their paths."""
        from .html_report import render_html
        os.makedirs(directory, exist_ok=True)
        paths = {'json': os.path.join(directory, 'report.json'), 'html': os.path.join(directory, 'report.html')}
        with open(paths['json'], 'w', encoding='utf-8') as f:
            f.write(self.to_json())
        with open(paths['html'], 'w', encoding='utf-8') as f:
            f.write(render_html(self))
        return paths


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)          # 'inf', '-inf', 'nan'
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _unfinite(x):
    if isinstance(x, str) and x in ('inf', '-inf', 'nan'):
        return float(x)
    if isinstance(x, dict):
        return {k: _unfinite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unfinite(v) for v in x]
    return x
