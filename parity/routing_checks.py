"""What the routers' choices mean for a parity verdict: the 'routing' check, and the positions the whole-model
checks forgive because a router flipped near a tie before them.

The 'routing' check reads the layer-local view: each router sees the truth's stream (in the run's dtype), so a flip
there is this router's own doing. A flip near a tie (the reference's margin inside the run's rounding noise,
parity/routing.py) is rounding; a hard flip fails the check (the router's weights or its input norm differ).

Forgiveness reads the accumulated view, the run whose logits the whole-model checks judge. A token the port sends to
other experts than transformers, near a tie, gets another MLP output at that layer without any bug. That reaches
the token's own logits, and through attention in the layers above, every later token of the same sequence: decode
steps too, as they attend to the prompt's cache (they are fed the reference's tokens, so the flip changes what they
compute, never what they read). Other sequences never see it: attention stays within a sequence and routing is per
token. So the whole-model checks (KL, top-k, greedy) forgive a position when its sequence had a near-tie flip, in
any MoE layer, at or before it; every other position is judged as before. Hard flips forgive nothing, and the
'routing' check and the layer-local MLP taps still judge the routers and the experts themselves.

Positions: a prompt of n tokens has positions 0..n-1 in prefill; decode step k sits at n + k.
"""
from collections.abc import Sequence
from dataclasses import dataclass

from .report import CheckResult
from .routing import Flip, RoutingReport


@dataclass(frozen=True)
class NearTieFlip:
    seq: int
    position: int
    layer: int
    phase: str

    def where(self) -> str:
        return f'prompt {self.seq} position {self.position} ({self.phase}), layer {self.layer}'


def phase_positions(prompt_lengths: Sequence[int], phase: str, decode_steps: int) -> list[tuple[int, int]]:
    """(sequence, position) of each row of `phase`, sequences concatenated in prompt order."""
    if phase == 'prefill':
        return [(i, p) for i, n in enumerate(prompt_lengths) for p in range(n)]
    return [(i, n + k) for i, n in enumerate(prompt_lengths) for k in range(decode_steps)]


class RoutedPositions:
    """Per sequence, the earliest near-tie router flip of the port's end-to-end run; `flip_before(seq, position)`
    is the flip that forgives that position, or None."""

    def __init__(self, first: dict[int, NearTieFlip]):
        self.first = first

    @classmethod
    def from_routing(cls, reports: dict[str, RoutingReport], prompt_lengths: Sequence[int],
                     decode_steps: int) -> 'RoutedPositions':
        first: dict[int, NearTieFlip] = {}
        for phase, report in reports.items():
            positions = phase_positions(prompt_lengths, phase, decode_steps)
            for layer in report.layers:
                for flip in layer.flips:
                    if not flip.near_tie:
                        continue
                    seq, pos = positions[flip.row]
                    if seq not in first or (pos, layer.layer) < (first[seq].position, first[seq].layer):
                        first[seq] = NearTieFlip(seq, pos, layer.layer, phase)
        return cls(first)

    def flip_before(self, seq: int, position: int) -> NearTieFlip | None:
        flip = self.first.get(seq)
        return flip if flip is not None and flip.position <= position else None

    def __bool__(self) -> bool:
        return bool(self.first)

    @staticmethod
    def reason_for(flips: Sequence[NearTieFlip], one: bool = False) -> str:
        """Why positions are forgiven, naming the flips behind them (`one`: a single position)."""
        seen = sorted(set(flips), key=lambda f: f.seq)
        which = 'its sequence had a router flip near a tie at or before it, so it ran' if one else \
            'their sequence had a router flip near a tie at or before them, so they ran'
        head = 'first flip' if len(seen) == 1 else 'first flips'
        return (f'{which} other experts than transformers without any bug ({head}: '
                + '; '.join(f.where() for f in seen[:4]) + ')')


def _flip_text(layer: int, flip: Flip, positions: list[tuple[int, int]]) -> str:
    seq, pos = positions[flip.row] if flip.row < len(positions) else (None, flip.row)
    where = f'prompt {seq} position {pos}' if seq is not None else f'row {pos}'
    return (f'layer {layer}, {where}: the port chose experts {flip.added} over {flip.dropped}, which transformers '
            f'preferred by {flip.margin:.3g} (allowed noise {flip.noise:.2g})')


def routing_check(report: RoutingReport, prompt_lengths: Sequence[int], decode_steps: int,
                  accumulated: RoutingReport | None = None) -> CheckResult:
    """'routing' for one phase: passes unless a router flips hard (layer-local view). `accumulated` (the end-to-end
    run's routing) only adds how many tokens took other experts there, which the accumulated view's errors show."""
    positions = phase_positions(prompt_lengths, report.phase, decode_steps)
    if not report.layers:
        return CheckResult('routing', report.phase, 'failed', 'no layer had router logits on both sides: '
                           + ('; '.join(f'{k}: {v}' for k, v in list(report.missing.items())[:3]) or 'no MoE layers')
                           + ". Map the router module with TAP_OVERRIDES (kind 'router') if it has another name")
    agree = ', '.join(f'{r.agreement:.1%}' for r in report.layers)
    floor = [r.floor_agreement for r in report.layers]
    floor_txt = '' if None in floor else ' (transformers in the test dtype: ' + ', '.join(
        f'{a:.1%}' for a in floor) + ')'
    near = sum(len(r.flips) - len(r.hard_flips) for r in report.layers)
    hard = [(r.layer, f) for r in report.layers for f in r.hard_flips]
    detail = (f'top-{report.top_k} expert sets equal to transformers float32 for layers '
              f'{[r.layer for r in report.layers]} at {agree} of {report.layers[0].tokens if report.layers else 0} '
              f'tokens{floor_txt}, each layer fed the truth\'s stream')
    if near:
        detail += f'; {near} flip(s) forgiven: the reference\'s margin is within the noise of a tie'
    data = {'agreement': {str(k): v for k, v in report.agreement().items()},
            'floor_agreement': {str(r.layer): r.floor_agreement for r in report.layers},
            'near_tie': near, 'hard': len(hard)}
    if accumulated is not None:
        moved = sorted({f.row for r in accumulated.layers for f in r.flips})
        if moved:
            data['end_to_end_rows'] = len(moved)
            detail += (f'; end to end, {len(moved)} token(s) took other experts than transformers float32 in some '
                       'layer, so the accumulated view\'s errors jump at those MLP taps')
    if report.unrouted:
        detail += (f'; layers {report.unrouted} route tokens in transformers but have no router logits in the port '
                   "(no router module under the usual names: map the 'router' tap with TAP_OVERRIDES)")
    if hard:
        detail += (f'; {len(hard)} HARD flip(s), first at {_flip_text(*hard[0], positions)}: the router weights or '
                   'the norm in front of it differ')
        data['first_hard'] = {'layer': hard[0][0], 'row': hard[0][1].row}
    return CheckResult('routing', report.phase, 'failed' if hard or report.unrouted else 'passed', detail,
                       value=min((r.agreement for r in report.layers), default=1.0), bound=None, data=data)
