"""How well the harness's rule separates correct ports from broken ones, measured.

- `false_failures`: every family's correct port against its reference, per shape and seed: does it pass, and how
  close does it come to its tolerances (worst error / tolerance, worst scale error / its tolerance)?
- `planted`: each planted bug of a family (parity.planted_bugs): is it named at the phase and tap it breaks?
- `smallest_caught`: per module kind (parity.sensitivity.MODULE_KINDS), the smallest scale error (1 + delta) the
  harness catches *and names at that module*, searched on a log grid.

`scripts/parity_sensitivity.py` runs these and prints the tables of parity/README.md.
"""
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from .run import compare, run_references
from .sensitivity import MODULE_KINDS, expected_tap, planted_scale

GRID = [10.0**(k / 4) for k in range(-28, -3)]      # 1e-7 ... 0.056, four steps a decade


@dataclass
class PortRun:
    family: str
    shape: str
    seed: int
    passed: bool
    worst_error_ratio: float       # max over taps of error / tolerance
    worst_error_tap: str
    worst_gain_ratio: float        # max over taps of |gain - floor gain| / gain tolerance
    worst_gain_tap: str
    divergence: str
    seconds: float


@dataclass
class Detection:
    family: str
    shape: str
    what: str                      # a planted bug's name, or 'scale:<module kind>@<delta>'
    expected: str                  # 'phase tap'
    named: bool                    # failed, and named where expected
    found: str                     # the divergence line
    delta: float | None = None


@dataclass
class Calibration:
    device: str
    dtype: str
    runs: list[PortRun] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    smallest: dict[str, dict[str, float | None]] = field(default_factory=dict)   # shape -> kind -> delta

    def to_dict(self) -> dict:
        return asdict(self)


def worst(report):
    """(error ratio, tap, gain ratio, tap) over the verdict taps of a report."""
    taps = [t for t in report.main_taps if t.port is not None]
    e = max(taps, key=lambda t: t.port.rel_l2 / t.tolerance)
    g = max(taps, key=lambda t: abs(t.port.gain - t.floor.gain) / t.gain_tolerance)
    return (e.port.rel_l2 / e.tolerance, f'{e.phase} {e.tap}',
            abs(g.port.gain - g.floor.gain) / g.gain_tolerance, f'{g.phase} {g.tap}')


def port_class(model_path: str):
    from transformers import AutoConfig

    from lmdp.models.registry import get_model_class
    cfg = AutoConfig.from_pretrained(model_path)
    return cfg.architectures[0], get_model_class(cfg)


def detect_scale(model_path: str, refs, kind: str, delta: float, layer: int) -> Detection:
    arch, base = port_class(model_path)
    spec = MODULE_KINDS[kind]
    tap = expected_tap(kind, {t.kind for t in refs.taps})
    report = compare(model_path, references=refs, custom_module_map={arch: planted_scale(base, kind, layer, delta)})
    first = report.first_divergence
    named = (first is not None and first.kind == tap and (not spec.per_layer or first.layer == layer))
    where = f'layer {layer}, {tap}' if spec.per_layer else tap
    return Detection('', '', f'scale:{kind}@{delta:g}', where, named, report.divergence_line(), delta)


def smallest_caught(model_path: str, refs, kind: str, layer: int, grid=GRID) -> float | None:
    """The smallest delta on `grid` whose scale error is caught and named (bisection: detection grows with
    delta); None if even the largest is not."""
    lo, hi = -1, len(grid) - 1
    if not detect_scale(model_path, refs, kind, grid[hi], layer).named:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if detect_scale(model_path, refs, kind, grid[mid], layer).named:
            hi = mid
        else:
            lo = mid
    return grid[hi]


def applicable_kinds(model_path: str) -> list[str]:
    """The module kinds this port has (q_norm/k_norm only where the family has per-head norms)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device('meta'):
        names = {n for n, _ in AutoModelForCausalLM.from_config(cfg).named_modules()}
    kinds = [k for k in MODULE_KINDS if k not in ('q_norm', 'k_norm')]
    if 'model.layers.0.self_attn.q_norm' in names:
        kinds[4:4] = ['q_norm', 'k_norm']
    return kinds


def build(family: str, shape: str, seed: int, directory: str, device: str, dtype: str) -> str:
    ckpt_dtype = 'float32' if dtype == 'float32' else dtype
    if shape == 'tiny':
        from lmdp.tiny import make_tiny
        return str(make_tiny(family, directory, seed=seed, dtype=ckpt_dtype))
    from .random_checkpoint import REAL_SHAPES, build_random
    return str(build_random(family, directory, device=device, dtype=ckpt_dtype, seed=seed, **REAL_SHAPES[family]))


def calibrate(families: list[str], shapes: list[str], seeds: list[int], device: str, dtype: str,
              scale_at: float | None = None, sweep_shapes: list[str] = (), planted_bugs: bool = True,
              log=print) -> Calibration:
    from .planted_bugs import planted_bugs_for
    result = Calibration(device, dtype)
    for shape in shapes:
        for family in families:
            for seed in seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    start = time.perf_counter()
                    path = build(family, shape, seed, tmp, device, dtype)
                    refs = run_references(path, dtype=dtype, device=device, seed=seed)
                    report = compare(path, references=refs)
                    e, etap, g, gtap = worst(report)
                    run = PortRun(family, shape, seed, report.passed, e, etap, g, gtap, report.divergence_line(),
                                  time.perf_counter() - start)
                    result.runs.append(run)
                    log(f'{family:8s} {shape:5s} seed {seed}: {"PASS" if run.passed else "FAIL"}; worst error '
                        f'{e:.2f}x tol at {etap}, worst scale {g:.2f}x tol at {gtap}; {run.seconds:.1f} s')
                    if seed != seeds[0]:
                        continue
                    if planted_bugs:
                        for bug in planted_bugs_for(family):
                            rep = compare(path, references=refs, custom_module_map=bug.module_map())
                            first = rep.first_divergence
                            named = first is not None and (first.phase, first.tap) == (bug.phase, bug.tap)
                            result.detections.append(Detection(family, shape, bug.name, f'{bug.phase} {bug.tap}',
                                                               named, rep.divergence_line()))
                            log(f'  planted {bug.name}: {"named" if named else "MISSED"} ({rep.divergence_line()})')
                    kinds = applicable_kinds(path)
                    layer = 1
                    if scale_at is not None:
                        for kind in kinds:
                            d = detect_scale(path, refs, kind, scale_at, layer)
                            d.family, d.shape = family, shape
                            result.detections.append(d)
                            log(f'  x{1 + scale_at:g} {kind}: {"named" if d.named else "MISSED"} ({d.found})')
                    if shape in sweep_shapes:
                        found = result.smallest.setdefault(f'{family}/{shape}', {})
                        for kind in kinds:
                            found[kind] = smallest_caught(path, refs, kind, layer)
                            log(f'  smallest caught, {kind}: {found[kind]}')
    return result


def markdown(cal: Calibration) -> str:
    """The tables of parity/README.md."""
    lines = [f'### {cal.dtype} on {cal.device}', '', '| family | shape | seeds | passed | worst error / tol | '
             'worst scale / tol |', '| --- | --- | --- | --- | --- | --- |']
    groups: dict[tuple, list[PortRun]] = {}
    for r in cal.runs:
        groups.setdefault((r.family, r.shape), []).append(r)
    for (family, shape), runs in groups.items():
        e = max(runs, key=lambda r: r.worst_error_ratio)
        g = max(runs, key=lambda r: r.worst_gain_ratio)
        lines.append(f'| {family} | {shape} | {len(runs)} | {sum(r.passed for r in runs)}/{len(runs)} | '
                     f'{e.worst_error_ratio:.2f} ({e.worst_error_tap}) | {g.worst_gain_ratio:.2f} '
                     f'({g.worst_gain_tap}) |')
    if cal.detections:
        named = sum(d.named for d in cal.detections)
        lines += ['', f'Planted errors named where planted: {named}/{len(cal.detections)}; misses: '
                  + (', '.join(f'{d.family}/{d.shape} {d.what}' for d in cal.detections if not d.named) or 'none')]
    if cal.smallest:
        kinds = list(dict.fromkeys(k for v in cal.smallest.values() for k in v))
        lines += ['', '| smallest scale error caught and named | ' + ' | '.join(kinds) + ' |',
                  '| --- |' + ' --- |' * len(kinds)]
        for key, found in cal.smallest.items():
            cells = [('-' if k not in found else 'never' if found[k] is None else f'{found[k]:.1e}') for k in kinds]
            lines.append(f'| {key} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def false_failure_rate(cal: Calibration) -> float:
    return sum(not r.passed for r in cal.runs) / max(len(cal.runs), 1)


def miss_rate(cal: Calibration) -> float:
    return sum(not d.named for d in cal.detections) / max(len(cal.detections), 1)

