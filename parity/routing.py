"""Routing parity for mixture-of-experts ports: which experts each router chose, against transformers' choice.

Per MoE layer: the fraction of tokens routed to the same top-k set (`agreement`), and every token routed
differently (a *flip*), judged by the reference's own margin. A flip is **near a tie** when the reference preferred
its expert over the port's by no more than the logit noise of the run's dtype (the noise floor, transformers in the
test dtype against transformers float32, where there is one; else a float32 epsilon): rounding alone can flip it,
and that token's MLP output will differ without any bug. A flip with a clear margin is **hard**: the router saw
another input or holds other weights. So when a layer's MLP tap fails,

- hard flips point at the router (its weights, its input: an error upstream);
- no flips, or near-tie flips only, point at the experts themselves (the fused-MoE kernel, the expert weights).

Router logits are read from each side's router module (`mlp.gate` on both sides for Qwen-MoE; `mlp.gate` in
transformers 5's Mixtral and `block_sparse_moe.gate` in the port), as the extra tap kind 'router'
(`router_taps(num_layers)`, resolved by `parity.taps`). Three ways in:

- `compare_routing(reference, port, top_k, floor=None)`: per-layer router logits from each side;
- `routing_from_captures(ref32, port, ref_dt, hf_config, phase)`: from `CaptureSet`s whose taps include
  `router_taps(...)`;
- `routing_parity(model_path, dtype, device, prompts, decode_steps)`: runs both models itself.

`parity.compare` captures the routers in every run of a mixture of experts and judges them as one 'routing'
check per phase (parity/routing_checks.py), so its console table, JSON and HTML carry the routers beside the taps.
"""
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .noise_floor import MULTIPLE
from .taps import Tap

Rows = torch.Tensor | Sequence[torch.Tensor]     # [tokens, experts], or one such tensor per sequence

# float32 runs have no noise floor: logits closer than this (relative to the row's largest) count as a tie
FLOAT32_TIE = 1e-5
# a flip is near a tie when the reference's margin is within this many times the run's logit noise at that token:
# the harness's own allowance for a correct port's rounding against the floor (parity.noise_floor.MULTIPLE)
NOISE_MARGIN = MULTIPLE[torch.bfloat16]


def router_taps(num_layers: int) -> list[Tap]:
    """One 'router' tap per layer (`layers.N.router`); a dense layer's tap resolves to nothing and is skipped."""
    return [Tap(f'layers.{i}.router', 'router', i) for i in range(num_layers)]


def present_router_taps(model: torch.nn.Module, hf_config, overrides=None) -> list[Tap]:
    """The router taps the reference `model` has (its sparse layers'); none for a dense model."""
    from .taps import Site, TapResolver
    if not is_moe(hf_config):
        return []
    cfg = getattr(hf_config, 'text_config', None) or hf_config
    taps = router_taps(int(cfg.num_hidden_layers))
    sites = TapResolver(model, 'reference', hf_config, overrides).resolve(taps)
    return [t for t in taps if isinstance(sites[t.name], Site)]


def _top_k(hf_config) -> int | None:
    cfg = getattr(hf_config, 'text_config', None) or hf_config
    return getattr(cfg, 'num_experts_per_tok', None) or getattr(cfg, 'moe_topk', None)


def is_moe(hf_config) -> bool:
    """Whether the config routes tokens to experts."""
    return bool(_top_k(hf_config))


def top_k_of(hf_config) -> int:
    k = _top_k(hf_config)
    if not k:
        raise ValueError('routing parity: the config has no num_experts_per_tok; is this a mixture of experts?')
    return int(k)


@dataclass
class Flip:
    row: int                 # the token's row in the phase (sequences concatenated)
    dropped: list[int]       # experts the reference chose and the port did not
    added: list[int]         # experts the port chose instead
    margin: float            # how far the reference preferred its choices: min logit dropped - max logit added
    noise: float             # the logit noise allowed at this token
    near_tie: bool


@dataclass
class LayerRouting:
    layer: int
    tokens: int
    agreement: float                     # tokens with the reference's top-k set / tokens
    floor_agreement: float | None     # the same for transformers in the test dtype (None for float32)
    logits_rel_l2: float                 # the router logits' relative L2 error
    flips: list[Flip] = field(default_factory=list)

    @property
    def hard_flips(self) -> list[Flip]:
        return [f for f in self.flips if not f.near_tie]

    @property
    def passed(self) -> bool:
        return not self.hard_flips


@dataclass
class RoutingReport:
    phase: str
    top_k: int
    layers: list[LayerRouting]
    missing: dict[str, str] = field(default_factory=dict)     # tap -> why it has no capture (e.g. a dense layer)
    unrouted: list[int] = field(default_factory=list)         # layers the reference routes and the port does not

    @property
    def passed(self) -> bool:
        return not self.unrouted and all(layer.passed for layer in self.layers)

    def agreement(self) -> dict[int, float]:
        """Agreement rate per layer."""
        return {layer.layer: layer.agreement for layer in self.layers}

    def first_hard_flip(self) -> tuple[int, Flip] | None:
        for layer in self.layers:
            if layer.hard_flips:
                return layer.layer, layer.hard_flips[0]
        return None

    def summary(self) -> str:
        verdict = ('every flip is within the noise of a tie' if self.passed else
                   'HARD FLIPS: a router disagrees' if self.first_hard_flip() else 'a layer of the port has no router')
        lines = [f'routing ({self.phase}, top-{self.top_k}): ' + verdict,
                 f"{'layer':>5} {'tokens':>6} {'agree':>7} {'floor':>7} {'near-tie':>8} {'hard':>5} {'logits rel':>10}"]
        for r in self.layers:
            floor = '-' if r.floor_agreement is None else f'{r.floor_agreement:.1%}'
            near = len(r.flips) - len(r.hard_flips)
            lines.append(f'{r.layer:>5} {r.tokens:>6} {r.agreement:>7.1%} {floor:>7} {near:>8} {len(r.hard_flips):>5} '
                         f'{r.logits_rel_l2:>10.2e}')
        if self.unrouted:
            lines.append(f'layers {self.unrouted}: transformers routes them, the port has no router logits there')
        hard = self.first_hard_flip()
        if hard:
            layer, f = hard
            lines.append(f'first hard flip: layer {layer}, row {f.row}: the port chose {f.added} over {f.dropped}, '
                         f'which the reference preferred by {f.margin:.3g} (noise {f.noise:.2g}): the router '
                         'weights or its input differ')
        return '\n'.join(lines)

    def to_dict(self) -> dict:
        return dict(asdict(self), passed=self.passed)


def _cat(rows: Rows) -> torch.Tensor:
    if torch.is_tensor(rows):
        return rows.reshape(-1, rows.size(-1)).float()
    return torch.cat([r.reshape(-1, r.size(-1)).float() for r in rows])


def _sets(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's top-k experts as a boolean mask (softmax is monotone: the top-k of the logits)."""
    ids = logits.topk(k, dim=-1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, True)


def _noise(ref: torch.Tensor, floor: torch.Tensor | None) -> torch.Tensor:
    """The logit noise per token: transformers' own low-precision error at that token, or a float32 epsilon."""
    eps = FLOAT32_TIE * ref.abs().amax(dim=-1).clamp_min(1.0)
    if floor is None:
        return eps
    return torch.maximum((floor - ref).abs().amax(dim=-1), eps)


def compare_layer(layer: int, reference: Rows, port: Rows, top_k: int, floor: Rows | None = None) -> LayerRouting:
    ref, got = _cat(reference), _cat(port)
    if ref.shape != got.shape:
        raise ValueError(f'routing parity, layer {layer}: router logits {tuple(got.shape)} (port) against '
                         f'{tuple(ref.shape)} (reference); one row per token and one column per expert on each side')
    flo = _cat(floor) if floor is not None else None
    ref_sets, got_sets = _sets(ref, top_k), _sets(got, top_k)
    same = (ref_sets == got_sets).all(dim=-1)
    noise = _noise(ref, flo)
    flips = []
    for row in (~same).nonzero().flatten().tolist():
        dropped = (ref_sets[row] & ~got_sets[row]).nonzero().flatten()
        added = (got_sets[row] & ~ref_sets[row]).nonzero().flatten()
        margin = (ref[row, dropped].min() - ref[row, added].max()).item()
        tol = NOISE_MARGIN * noise[row].item()
        flips.append(Flip(row, dropped.tolist(), added.tolist(), margin, tol, margin <= tol))
    floor_agreement = None
    if flo is not None:
        floor_agreement = (_sets(flo, top_k) == ref_sets).all(dim=-1).float().mean().item()
    rel = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return LayerRouting(layer, ref.size(0), same.float().mean().item() if ref.size(0) else 1.0, floor_agreement,
                        rel, flips)


def compare_routing(reference: Mapping[int, Rows], port: Mapping[int, Rows], top_k: int,
                    floor: Mapping[int, Rows] | None = None, phase: str = 'prefill') -> RoutingReport:
    """Routing of every layer both sides have router logits for: `{layer: rows}` from the reference (float32),
    the port, and optionally transformers in the test dtype (`floor`, which sets the noise a tie may hide in)."""
    layers = sorted(set(reference) & set(port))
    missing = {f'layers.{i}.router': 'the port has no router logits for this layer' for i in set(reference) - set(port)}
    out = [compare_layer(i, reference[i], port[i], top_k, None if floor is None else floor.get(i)) for i in layers]
    return RoutingReport(phase, top_k, out, missing, sorted(set(reference) - set(port)))


def routing_from_captures(ref32, port, ref_dt, hf_config, phase: str = 'prefill') -> RoutingReport:
    """`compare_routing` over the 'layers.N.router' taps of three `parity.capture_set.CaptureSet`s (reference
    float32, port, reference in the test dtype or None)."""
    num_layers = int((getattr(hf_config, 'text_config', None) or hf_config).num_hidden_layers)
    sides = {'reference': {}, 'port': {}, 'floor': {}}
    for tap in router_taps(num_layers):
        for side, capture in (('reference', ref32), ('port', port), ('floor', ref_dt)):
            rows = capture.get(phase, tap.name) if capture is not None else None
            if rows is not None:
                sides[side][tap.layer] = rows
    report = compare_routing(sides['reference'], sides['port'], top_k_of(hf_config),
                             sides['floor'] if ref_dt is not None else None, phase)
    for capture in (ref32, port):
        for tap in router_taps(num_layers):
            if tap.name in capture.missing and tap.layer not in sides['reference']:
                report.missing.setdefault(tap.name, capture.missing[tap.name])
    return report


def routing_parity(model_path: str, dtype='float32', device='auto', prompts=3, decode_steps: int = 4,
                   custom_module_map=None, block_size: int = 16) -> dict[str, RoutingReport]:
    """Run transformers (float32, and the test dtype for the floor) and the port on the same prompts, capturing
    only the routers; `{'prefill': RoutingReport, 'decode': RoutingReport}`. Decode is teacher-forced on
    transformers' float32 greedy tokens, as in `parity.compare`."""
    import gc

    from transformers import AutoConfig

    from .port import load_port, run_port
    from .prompts import make_prompts
    from .reference import load_reference, run_reference
    from .run import _dtype, resolve_device
    device = resolve_device(device)
    hf_config = AutoConfig.from_pretrained(model_path)
    torch_dtype = _dtype(dtype, hf_config)
    cfg = getattr(hf_config, 'text_config', None) or hf_config
    prompt_ids = make_prompts(prompts, cfg.vocab_size, model_path, 0)
    taps = router_taps(int(cfg.num_hidden_layers))
    captures, tokens = [], None
    for run_dtype in [torch.float32] + ([torch_dtype] if torch_dtype != torch.float32 else []):
        model = load_reference(model_path, run_dtype, device)
        capture, used = run_reference(model, hf_config, prompt_ids, decode_steps, taps, tokens=tokens)
        tokens = tokens or used
        captures.append(capture)
        del model
        gc.collect()
    agent, _ = load_port(model_path, torch_dtype, device, custom_module_map)
    port = run_port(agent, hf_config, prompt_ids, tokens, decode_steps, taps, block_size, graph_check=False)
    del agent
    floor = captures[1] if len(captures) > 1 else None
    phases = ('prefill', 'decode') if decode_steps else ('prefill', )
    return {phase: routing_from_captures(captures[0], port, floor, hf_config, phase) for phase in phases}
