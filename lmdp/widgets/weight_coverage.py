"""The weight-coverage view's data: parameters never loaded, checkpoint tensors unused, and for every stacked
parameter (q/k/v -> qkv_proj, gate/up -> gate_up_proj) which checkpoint tensor filled which shard.

It runs the port's own `load_weights` under lmdp's load tracker (lmdp.weight_loader.tracker), the same way
`load_model_weights(strict=False)` does, and also notes each (checkpoint tensor -> parameter, shard) load.
"""
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class MissingParam:
    param: str                          # 'model.layers.0.self_attn.qkv_proj.weight'
    shard: str | None = None         # "'k'" for one shard of a stacked parameter
    checkpoint_hint: str | None = None   # the checkpoint tensor packed_modules_mapping says should fill it


@dataclass
class StackedShard:
    param: str
    shard: str
    filled_by: list[str] = field(default_factory=list)    # checkpoint tensors that loaded this shard
    expected: str | None = None      # the tensor packed_modules_mapping names for it, if it names one

    @property
    def ok(self) -> bool:
        return self.filled_by == [self.expected] if self.expected else len(self.filled_by) == 1


@dataclass
class WeightCoverage:
    model_class: str
    num_params: int
    checkpoint_tensors: int
    missing: list[MissingParam]
    unused: list[str]
    ignored: list[str] = field(default_factory=list)      # matched ignored_checkpoint_keys, on purpose
    stacked: list[StackedShard] = field(default_factory=list)
    stacked_params_mapping: list[tuple] = field(default_factory=list)
    packed_modules_mapping: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unused and all(s.ok for s in self.stacked)

    def verdict(self) -> str:
        if self.ok:
            return (f'every parameter ({self.num_params}) was loaded and every checkpoint tensor '
                    f'({self.checkpoint_tensors}) was used' + (f'; {len(self.ignored)} ignored on purpose'
                                                               if self.ignored else ''))
        parts = []
        if self.missing:
            parts.append(f'{len(self.missing)} parameter(s) or shard(s) never loaded (their values are garbage)')
        if self.unused:
            parts.append(f'{len(self.unused)} checkpoint tensor(s) matched no parameter')
        twice = [s for s in self.stacked if len(s.filled_by) > 1]
        if twice:
            parts.append(f'{len(twice)} shard(s) loaded more than once')
        crossed = [s for s in self.stacked if len(s.filled_by) == 1 and not s.ok]
        if crossed:
            parts.append(f'{len(crossed)} shard(s) filled by another tensor than packed_modules_mapping names '
                         f'(e.g. {crossed[0].param} shard {crossed[0].shard} from {crossed[0].filled_by[0]})')
        return '; '.join(parts) + ('. Fix load_weights or its stacked_params_mapping; list tensors that are unused '
                                   'on purpose in ignored_checkpoint_keys')


def _missing(model, entries: Iterable[str]) -> list[MissingParam]:
    from ..weight_loader.model_weight_loader import expected_checkpoint_name
    out = []
    for entry in entries:
        name, _, shard = entry.partition(' [shard ')
        out.append(MissingParam(name, shard.rstrip(']') or None,
                                expected_checkpoint_name(model, entry) if model is not None else None))
    return out


def weight_coverage(model, model_path: str | None = None,
                    weights: Iterable[tuple[str, object]] | None = None) -> WeightCoverage:
    """Load `model_path`'s tensors (or `weights`) through `model.load_weights` and account for every one."""
    import re

    from ..weight_loader import iter_checkpoint
    from ..weight_loader.model_weight_loader import expected_checkpoint_name
    from ..weight_loader.tracker import tracking
    if weights is None:
        weights = iter_checkpoint(model_path)
    ignore = list(getattr(model, 'ignored_checkpoint_keys', ()))
    fills = set()
    with tracking(model, ignore) as tracker:
        record = tracker.record

        def noting(param, shard_id=None):      # the tracker counts loads; we also want who loaded what
            record(param, shard_id)
            name = tracker.param_names.get(id(param))
            if name is not None:
                fills.add((tracker.current, name, repr(shard_id)))

        tracker.record = noting
        model.load_weights(tracker.watch(weights))
    used = {ckpt for ckpt, _, _ in fills}
    patterns = [re.compile(p) for p in ignore]
    ignored = [n for n in tracker.seen if n not in used and any(p.search(n) for p in patterns)]
    stacked = []
    for name, param in tracker.params.items():
        for shard in getattr(param, 'lmdp_shards', ()):
            by = sorted(c for c, p, s in fills if p == name and s == repr(shard))
            expected = expected_checkpoint_name(model, f'{name} [shard {shard!r}]')
            stacked.append(StackedShard(name, repr(shard), by, expected))
    cls = type(model)
    return WeightCoverage(f'{cls.__module__}.{cls.__qualname__}', len(tracker.params), len(tracker.seen),
                          _missing(model, tracker.missing()), list(tracker.unused), ignored, stacked,
                          list(getattr(model, 'stacked_params_mapping', []) or []),
                          dict(getattr(model, 'packed_modules_mapping', {}) or {}))


def coverage_of_checkpoint(model_path: str, custom_module_map=None, dtype='float32') -> WeightCoverage:
    """Build the registered (or custom-mapped) port for `model_path` on the CPU and account for its weights."""
    from ..config import ModelConfig
    from ..engine.model_agent import build_model
    model_config = ModelConfig.from_pretrained(model_path, dtype=dtype)
    model, _ = build_model(model_config, model_path, 'cpu', custom_module_map, load_weights=False)
    return weight_coverage(model, model_path)


def coverage_from_report(report) -> WeightCoverage:
    """What a ParityReport's weight_coverage check recorded (missing and unused only; no shard detail)."""
    check = report.check('weight_coverage')
    data = check.data if check is not None else {}
    return WeightCoverage(report.port_class, 0, 0, _missing(None, data.get('missing', [])),
                          list(data.get('unused', [])))
