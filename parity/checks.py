"""Whole-model checks: full-vocabulary logprob KL, top-5 agreement, greedy agreement, weight coverage, CUDA graphs.

Positions whose sequence had a router flip near a tie at or before them (a mixture of experts, `routed`: see
parity/routing_checks.py) are forgiven where they alone break a check; every other position is judged as before.

Decode is teacher-forced on the float32 reference's greedy tokens, so "greedy agreement" compares the port's
argmax with the reference's token at every generated position given the same prefix: the same verdict as
comparing two free-running generations up to their first difference, and it keeps comparing after a forgiven one.
"""

import torch

from .capture_set import CaptureSet
from .graph_replay import GraphReplay, ReplayDiff
from .noise_floor import kl_bound, noise_margin
from .report import CheckResult
from .routing_checks import RoutedPositions, phase_positions

TOP_K = 5


def _logits(capture: CaptureSet | None, phase: str, vocab: int) -> torch.Tensor | None:
    rows = capture.get(phase, 'logits') if capture is not None else None
    return None if rows is None else torch.cat(rows)[:, :vocab].float()


def _kl(ref: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref) || softmax(other)) per row, in nats; float64, as float32 cancellation alone gives ~1e-7."""
    lr, lo = torch.log_softmax(ref.double(), -1), torch.log_softmax(other.double(), -1)
    p = lr.exp()
    return torch.where(p > 0, p * (lr - lo), torch.zeros_like(p)).sum(-1)


def _positions(capture: CaptureSet, phase: str):
    """(sequence, position) of each logits row of `phase` (parity.routing_checks.phase_positions)."""
    lengths = [x.size(0) for x in capture.get('prefill', 'logits')]
    steps = capture.get('decode', 'logits')[0].size(0) if phase == 'decode' else 0
    return phase_positions(lengths, phase, steps)


def _kl_check(phase: str, kl: torch.Tensor, floor: torch.Tensor | None, dtype: torch.dtype,
              flips: list) -> CheckResult:
    """Mean KL against its bound; if that fails, again over the positions no near-tie router flip explains."""
    floor_kl = None if floor is None else floor.mean().item()
    bound = kl_bound(dtype, floor_kl)
    mean_kl = kl.mean().item()
    floor_txt = '' if floor_kl is None else f' (floor {floor_kl:.2e})'
    detail = (f'mean KL(transformers float32 || port) over {kl.numel()} positions {mean_kl:.2e} nats, max '
              f'{kl.max().item():.2e}; bound {bound:.2e}{floor_txt}')
    data = {'max_kl': kl.max().item(), 'floor_kl': floor_kl, 'mean_kl': mean_kl, 'bound_all_positions': bound}
    forgiven = torch.tensor([f is not None for f in flips], dtype=torch.bool)
    if mean_kl <= bound or not forgiven.any():
        return CheckResult('logprob_kl', phase, 'passed' if mean_kl <= bound else 'failed', detail, value=mean_kl,
                           bound=bound, data=data)
    keep = ~forgiven
    rest_floor = None if floor is None else (floor[keep].mean().item() if keep.any() else 0.0)
    rest_bound = kl_bound(dtype, rest_floor)
    rest_kl = kl[keep].mean().item() if keep.any() else 0.0
    ok = rest_kl <= rest_bound
    reason = RoutedPositions.reason_for([f for f in flips if f is not None])
    rest = (f'over the other {int(keep.sum())} mean KL {rest_kl:.2e}, bound {rest_bound:.2e}' if keep.any()
            else 'no other position')
    detail += (f'; {int(forgiven.sum())} position(s) {"forgiven" if ok else "set aside"}: {reason}; {rest}'
               + ('' if ok else ': NOT forgiven, more than the routing flips explain'))
    data.update(routing_forgiven=int(forgiven.sum()), rest_kl=rest_kl, rest_bound=rest_bound)
    return CheckResult('logprob_kl', phase, 'passed' if ok else 'failed', detail,
                       value=rest_kl if ok else mean_kl, bound=rest_bound if ok else bound, data=data)


def logprob_checks(ref32: CaptureSet, port: CaptureSet, ref_dt: CaptureSet | None, dtype: torch.dtype,
                   phase: str, routed: RoutedPositions | None = None) -> list[CheckResult]:
    """KL and top-5 agreement at every position of `phase`."""
    vocab = ref32.get(phase, 'logits')[0].size(-1)
    r, p, d = _logits(ref32, phase, vocab), _logits(port, phase, vocab), _logits(ref_dt, phase, vocab)
    positions = _positions(ref32, phase)
    flips = [routed.flip_before(*at) if routed else None for at in positions]
    kl_check = _kl_check(phase, _kl(r, p), None if d is None else _kl(r, d), dtype, flips)

    k = min(TOP_K, vocab - 1)
    ref_vals, ref_idx = r.topk(k + 1, dim=-1)
    port_idx = p.topk(k, dim=-1).indices
    same = (ref_idx[:, :k].sort(-1).values == port_idx.sort(-1).values).all(-1)
    unforgiven, forgiven, routing = [], 0, []
    for row in torch.nonzero(~same).flatten().tolist():
        # rounding can only swap tokens whose reference logits sit within the noise of the rank-k logit
        differ = set(ref_idx[row, :k].tolist()) ^ set(port_idx[row].tolist())
        gap = max(abs(r[row, t].item() - ref_vals[row, k - 1].item()) for t in differ)
        if gap <= noise_margin(dtype, r[row], None if d is None else d[row]):
            forgiven += 1
        elif flips[row] is not None:
            routing.append(flips[row])
        else:
            unforgiven.append(row)
    agree = same.float().mean().item()
    detail = f'top-{k} sets agree at {same.sum().item()}/{same.numel()} positions'
    if forgiven:
        detail += f'; {forgiven} disagreement(s) forgiven: the tokens that differ have reference logits within ' \
                  f'the noise floor of the rank-{k} logit there'
    if routing:
        detail += f'; {len(routing)} disagreement(s) forgiven: {RoutedPositions.reason_for(routing)}'
    if unforgiven:
        detail += f'; {len(unforgiven)} not forgiven (rows {unforgiven[:8]} of the phase, in prompt order)'
    top_check = CheckResult(f'top{k}', phase, 'failed' if unforgiven else 'passed', detail, value=agree, bound=1.0,
                            data={'forgiven': forgiven, 'unforgiven_rows': unforgiven,
                                  'routing_forgiven': len(routing)})
    return [kl_check, top_check]


def _next_token_rows(capture: CaptureSet, vocab: int) -> list[torch.Tensor]:
    """Per prompt: the rows that predict each generated token (last prefill row, then every decode row)."""
    prefill = capture.get('prefill', 'logits')
    decode = capture.get('decode', 'logits') or [None] * len(prefill)
    return [torch.cat([pre[-1:]] + ([dec] if dec is not None else []))[:, :vocab].float()
            for pre, dec in zip(prefill, decode)]


def greedy_check(ref32: CaptureSet, port: CaptureSet, ref_dt: CaptureSet | None, dtype: torch.dtype,
                 reference_tokens: list[list[int]], routed: RoutedPositions | None = None) -> CheckResult:
    vocab = ref32.get('prefill', 'logits')[0].size(-1)
    lengths = [x.size(0) for x in ref32.get('prefill', 'logits')]
    ref_rows, port_rows = _next_token_rows(ref32, vocab), _next_token_rows(port, vocab)
    dt_rows = _next_token_rows(ref_dt, vocab) if ref_dt is not None else None
    port_tokens, notes, failed = [], [], False
    for i, (r, p) in enumerate(zip(ref_rows, port_rows)):
        ours = p.argmax(-1).tolist()
        port_tokens.append(ours)
        for step, (a, b) in enumerate(zip(ours, reference_tokens[i])):
            if a == b:
                continue
            top2 = r[step].topk(2).values
            margin = (top2[0] - top2[1]).item()
            noise = noise_margin(dtype, r[step], None if dt_rows is None else dt_rows[i][step])
            # generated token `step` is predicted at position len(prompt) - 1 + step
            flip = routed.flip_before(i, lengths[i] - 1 + step) if routed else None
            if margin <= noise:
                notes.append(f'prompt {i} token {step}: port picks {a}, transformers {b}; forgiven: the '
                             f"reference's top-2 margin {margin:.2e} is inside the noise floor {noise:.2e}")
            elif flip is not None:
                notes.append(f'prompt {i} token {step}: port picks {a}, transformers {b}; forgiven: the '
                             f"reference's top-2 margin {margin:.2e} is above the noise floor {noise:.2e}, but "
                             f'{RoutedPositions.reason_for([flip], one=True)}')
            else:
                failed = True
                notes.append(f'prompt {i} token {step}: port picks {a}, transformers {b}; NOT forgiven: the '
                             f"reference's top-2 margin {margin:.2e} is above the noise floor {noise:.2e}")
    n = len(reference_tokens[0]) if reference_tokens else 0
    equal = sum(p == r for p, r in zip(port_tokens, reference_tokens))
    detail = f'greedy tokens equal for {equal}/{len(reference_tokens)} prompts over {n} generated tokens'
    if notes:
        detail += '; ' + '; '.join(notes[:10])
    return CheckResult('greedy', None, 'failed' if failed else 'passed', detail, value=float(equal),
                       bound=float(len(reference_tokens)), data={'port_tokens': port_tokens, 'notes': notes})


def coverage_check(coverage) -> CheckResult:
    """coverage: lmdp's LoadReport (`agent.load_report`): .missing port parameters, .unused checkpoint tensors."""
    if not coverage.missing and not coverage.unused:
        return CheckResult('weight_coverage', None, 'passed',
                           'every port parameter was loaded and every checkpoint tensor was used')
    parts = []
    if coverage.missing:
        parts.append(f'{len(coverage.missing)} port parameter(s) never loaded (their values are garbage): '
                     + ', '.join(coverage.missing[:10]))
    if coverage.unused:
        parts.append(f'{len(coverage.unused)} checkpoint tensor(s) matched no parameter: '
                     + ', '.join(coverage.unused[:10]))
    return CheckResult('weight_coverage', None, 'failed', '; '.join(parts) + '. Fix load_weights (or its '
                       'stacked_params_mapping), or list intentionally unused tensors in ignored_checkpoint_keys',
                       data={'missing': coverage.missing, 'unused': coverage.unused})


def _not_compared(name: str, diff: ReplayDiff) -> CheckResult:
    data = diff.to_data()
    if diff.model_refused:
        return CheckResult(name, None, 'skipped', f'the port answers support_cuda_graph = False for a decode step of '
                           f'{diff.bucket}: lmdp runs its decode eagerly, so there is no replay to compare', data=data)
    what = 'capturing' if not diff.captured else 'replaying'
    fix = f' Fix: {diff.fix}' if diff.fix else ''
    return CheckResult(name, None, 'failed', f'{what} the batch-{diff.bucket} decode graph failed: {diff.reason}.{fix}',
                       data=data)


def _argmax_note(diff: ReplayDiff) -> str:
    rows = diff.argmax_rows_differ
    return f'; argmax differs in {len(rows)} row(s) {rows[:8]}' if rows else '; argmax equal in every row'


def cuda_graph_checks(device, replay: GraphReplay | None, tolerance: float) -> list[CheckResult]:
    """'cuda_graph': a decode step replayed in the graph captured for its own batch size must equal the eager step
    bit for bit. 'cuda_graph_padded': the same step in the next larger bucket's graph (padding slots) must be within
    `tolerance` (the decode logits tap's) of it, relative L2; bits may differ, as cuBLAS picks GEMM tiles by M."""
    names = ('cuda_graph', 'cuda_graph_padded')
    if torch.device(device).type != 'cuda':
        reason = f'CUDA-graph replay vs eager needs a CUDA device; this run is on {device}'
        return [CheckResult(n, None, 'skipped', reason) for n in names]
    if replay is None or replay.error:
        why = replay.error if replay is not None else 'the port run made no CUDA-graph comparison'
        return [CheckResult(n, None, 'failed', f'CUDA-graph replay vs eager could not run: {why}') for n in names]
    out = []
    exact = replay.exact
    if not exact.captured or exact.bitwise is None:
        out.append(_not_compared(names[0], exact))
    elif exact.bitwise:
        out.append(CheckResult(
            names[0], None, 'passed', f'a decode step of {exact.batch} sequences replayed in the batch-{exact.bucket} '
            f'graph equals the eager step bit for bit ({exact.batch} x {exact.vocab} logits, max |diff| 0)',
            value=0.0, bound=0.0, data=exact.to_data()))
    else:
        out.append(CheckResult(
            names[0], None, 'failed',
            f'a decode step of {exact.batch} sequences replayed in the batch-{exact.bucket} graph differs from the '
            f'eager step at the same batch size: max |diff| {exact.max_abs:.3e}, relative L2 {exact.rel_l2:.2e}'
            f'{_argmax_note(exact)}. The same kernels at the same shapes give the same bits, so the forward depends '
            'on something the graph froze at capture: a value read on the host, a tensor built from Python numbers '
            'or re-allocated each step outside the step context, or a step-context field the graph runner fills '
            'differently (max_kv_seqlen, the block table width)', value=exact.max_abs, bound=0.0,
            data=exact.to_data()))
    padded = replay.padded
    if not padded.captured or padded.bitwise is None:
        out.append(_not_compared(names[1], padded))
    else:
        ok = padded.rel_l2 <= tolerance
        bits = 'bitwise equal too' if padded.bitwise else 'not bitwise equal, as may be: cuBLAS picks GEMM tiles by M'
        detail = (f'{padded.batch} sequences replayed in the batch-{padded.bucket} graph '
                  f'({padded.bucket - padded.batch} padding slot(s)) against the eager step: max |diff| '
                  f'{padded.max_abs:.3e}, relative L2 {padded.rel_l2:.2e} {"within" if ok else "OVER"} the decode '
                  f'logits tolerance {tolerance:.1e}; {bits}{_argmax_note(padded)}')
        if not ok:
            detail += ('. More than rounding: the padding slots leak into the real rows (a layer that mixes rows '
                       'of a batch, or padding K/V written outside the scratch block)')
        out.append(CheckResult(names[1], None, 'passed' if ok else 'failed', detail, value=padded.rel_l2,
                               bound=tolerance, data=padded.to_data()))
    return out
