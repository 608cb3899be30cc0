"""The one place that picks the prefill attention kernel for CUDA tensors, and why.

Candidates, fastest first where they apply (`lmdp.kernels.torch_prefill` for the first two):
    cudnn   torch's cuDNN attention, one call per sequence (history joined by log-sum-exp). Fast kernel, but cuDNN
            builds an execution plan for every new (q_len, kv_len) shape, tens of ms each, so it only runs where
            asked for (LMDP_PREFILL_ATTENTION=cudnn): a server's prompts rarely repeat a shape.
    flash   torch's flash-attention varlen kernel, one call per step, no per-shape cost (when asked for).
    triton  lmdp's paged prefill kernel: the default (auto), and everything the others cannot serve.
What torch's kernels cannot do keeps the Triton kernel, for these reasons:
    - float32 (torch's fused kernels take bf16/fp16 only)
    - tanh logit softcapping (Gemma 2): neither torch kernel exposes it
    - head_dim not a multiple of 8 or above 256; flash also needs Dv == D
    - a sliding window on cuDNN (torch passes none); flash takes it
    - a device or torch build where the start-up check fails (below)
The start-up check runs each torch path once per (device, dtype, head dims, GQA, window) on a small ragged batch
with history and compares it with the pure-torch reference: it catches a torch build without the kernel, an
argument it does not take, or a mask aligned the wrong way, before any request is served. Only a failed check
falls back; a call that passed the check and then fails raises.
"""
import functools
import logging
import math

import torch

from .. import envs
from . import torch_prefill

logger = logging.getLogger('lmdp')

TORCH_KINDS = ('cudnn', 'flash')
# cuDNN runs one sequence per call: more sequences than this in a step go to one varlen call instead
CUDNN_MAX_SEQS = 8


def static_reason(kind: str, dtype: torch.dtype, head_dim: int, head_dim_v: int, sliding_window: int | None,
                  logit_softcapping: float | None) -> str | None:
    """Why torch's `kind` kernel cannot serve a layer of this shape (None: it can, subject to the start-up check)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return f'{dtype} (torch fused attention takes bfloat16/float16 only)'
    if logit_softcapping:
        return 'tanh logit softcapping (no torch fused kernel exposes it)'
    if head_dim % 8 or head_dim_v % 8 or max(head_dim, head_dim_v) > 256:
        return f'head_dim {head_dim}/{head_dim_v} (needs multiples of 8, at most 256)'
    if kind == 'flash' and head_dim != head_dim_v:
        return f'value head_dim {head_dim_v} != key head_dim {head_dim} (flash needs them equal)'
    if kind == 'cudnn' and sliding_window:
        return 'sliding window (torch passes none to cuDNN)'
    return None


def _probe_case(device, dtype, head_dim, head_dim_v, grouped: bool, seed=0):
    """A small ragged batch: one plain prompt and one chunk after history, cache blocks shuffled."""
    g = torch.Generator(device='cpu').manual_seed(seed)
    page, num_kv_heads = 16, 2
    num_heads = 4 if grouped else 2
    q_lens, kv_lens = [80, 72], [80, 72 + 90]
    need = [-(-n // page) for n in kv_lens]
    perm = torch.randperm(sum(need), generator=g).to(torch.int32)
    block_offsets = torch.zeros(2, max(need), dtype=torch.int32)
    block_offsets[0, :need[0]], block_offsets[1, :need[1]] = perm[:need[0]], perm[need[0]:]
    k_cache = torch.randn(sum(need), page, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(sum(need), page, num_kv_heads, head_dim_v, generator=g)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g)
    q_seqlens = torch.tensor(q_lens, dtype=torch.int32)
    kv_seqlens = torch.tensor(kv_lens, dtype=torch.int32)
    q_start_loc = torch.tensor([0, q_lens[0]], dtype=torch.int32)
    tensors = [t.to(device) for t in (q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens)]
    for i in (0, 1, 2):
        tensors[i] = tensors[i].to(dtype)
    return tensors, max(q_lens), max(kv_lens), sum(kv_lens)


# short enough to cut into the probe's sequences, so that a window off by one shows
PROBE_WINDOW = 37


@functools.cache
def probe(kind: str, device: torch.device, dtype: torch.dtype, head_dim: int, head_dim_v: int, grouped: bool,
          windowed: bool) -> str | None:
    """Run torch's `kind` path once on a small case and compare it with the reference: None if it passes, else
    why not (the exception or the error found)."""
    from .paged_attention import paged_attention_fwd as reference
    (q, kc, vc, bo, qsl, qs, kvs), max_q, max_kv, sum_kv = _probe_case(device, dtype, head_dim, head_dim_v,
                                                                         grouped)
    scale = 1.0 / math.sqrt(head_dim)
    sliding_window = PROBE_WINDOW if windowed else None
    try:
        got = run(kind, q, kc, vc, bo, qsl, qs, kvs, None, max_q, max_kv, sum_kv, scale, sliding_window, True)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - the start-up check: whatever fails here rules the path out, with why
        return f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    want = reference(q.float(), kc.float(), vc.float(), bo, qsl, qs, kvs, scale=scale, sliding_window=sliding_window)
    err = (got.float() - want).abs().max().item()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
    if not err <= tol:
        return f'max error {err:.3g} against the reference (> {tol}): wrong mask alignment or scale'
    return None


def run(kind, q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens, out, max_q_seqlen,
        max_kv_seqlen, sum_kv_seqlen, scale, sliding_window, causal, seqlens=None):
    """Call torch's `kind` path (`seqlens`: host (start, q_len, kv_len) per sequence, read here when absent)."""
    if kind == 'flash':
        return torch_prefill.flash_varlen_prefill(q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens,
                                                  kv_seqlens, out, max_q_seqlen, max_kv_seqlen, sum_kv_seqlen,
                                                  scale, sliding_window, causal)
    if seqlens is None:
        seqlens = host_seqlens(q_start_loc, q_seqlens, kv_seqlens)
    return torch_prefill.cudnn_prefill(q, k_cache, v_cache, block_offsets, seqlens, out, scale, causal,
                                       merge=_merge_impl(q))


def _merge_impl(q):
    from .dispatch import implementation
    return implementation('merge_attention_states', q)


def host_seqlens(q_start_loc, q_seqlens, kv_seqlens) -> list[tuple[int, int, int]]:
    """(start, q_len, kv_len) per sequence on the host: one device sync."""
    return [tuple(r) for r in torch.stack((q_start_loc.long(), q_seqlens.long(), kv_seqlens.long()), 1).tolist()]


def cudnn_fits(seqlens) -> bool:
    """cuDNN takes no key run of length 1: every part it sees (history, new tokens) must be empty or >= 2 long."""
    return all(q_len >= 2 and (kv_len - q_len == 0 or kv_len - q_len >= 2) for _, q_len, kv_len in seqlens)


def preference() -> tuple[str, ...]:
    """The kernels to try, in order, from LMDP_PREFILL_ATTENTION."""
    chosen = envs.LMDP_PREFILL_ATTENTION
    if chosen in ('auto', 'triton'):
        # auto is Triton: on the H200 torch's flash kernel (FlashAttention-2, built for sm80) measured no faster
        # (4k: 220 vs 267 TFLOP/s; 8B time to first token at 16k/32k 0.617/1.675 s vs 0.608/1.631 s,
        # notes/performance.md); cuDNN is 1.6-1.8x faster warm but builds a plan per new shape
        return ('triton',)
    if chosen == 'cudnn':
        return ('cudnn', 'flash', 'triton')
    return ('flash', 'triton')


def choose(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, sliding_window: int | None,
           logit_softcapping: float | None, batch: int, skip: tuple[str, ...] = ()) -> tuple[str, str]:
    """(kernel, why the faster ones were passed over) for a prefill call of this layer shape: the first preferred
    kernel, not in `skip`, that can serve it."""
    reasons = []
    grouped = q.size(1) != k_cache.size(2)
    for kind in preference():
        if kind in skip:
            continue
        if kind == 'triton':
            return 'triton', '; '.join(reasons) or 'asked for (LMDP_PREFILL_ATTENTION=triton)'
        why = static_reason(kind, q.dtype, q.size(-1), v_cache.size(-1), sliding_window, logit_softcapping)
        if why is None and kind == 'cudnn' and batch > CUDNN_MAX_SEQS:
            why = f'{batch} sequences (> {CUDNN_MAX_SEQS}: one varlen call is cheaper)'
        if why is None:
            why = probe(kind, q.device, q.dtype, q.size(-1), v_cache.size(-1), grouped, bool(sliding_window))
            if why is not None:
                _warn_once(kind, why)
        if why is None:
            return kind, '; '.join(reasons)
        reasons.append(f'{kind}: {why}')
    raise AssertionError('unreachable: triton ends every preference')


@functools.cache
def _warn_once(kind: str, why: str):
    logger.warning('prefill attention: torch %s kernel failed its start-up check (%s); using the next kernel',
                   kind, why)


def prefill_attention(q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens, out, max_q_seqlen,
                      max_kv_seqlen=None, sum_kv_seqlen=None, scale=None, sliding_window=None,
                      logit_softcapping=None, causal=True):
    """Prefill attention for CUDA tensors through the chosen kernel; same contract as the Triton prefill kernel
    (`out` may be None: the result is then allocated, or is the kernel's own output)."""
    from .triton.prefill_attention import prefill_attention_fwd
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else float(scale)
    kind, _ = choose(q, k_cache, v_cache, sliding_window, logit_softcapping, q_seqlens.numel())
    seqlens = None
    if kind == 'cudnn':
        seqlens = host_seqlens(q_start_loc, q_seqlens, kv_seqlens)
        if not cudnn_fits(seqlens):
            kind, _ = choose(q, k_cache, v_cache, sliding_window, logit_softcapping, q_seqlens.numel(),
                             skip=('cudnn',))
    if kind == 'triton':
        if out is None:
            out = q.new_empty(q.size(0), q.size(1), v_cache.size(-1))
        return prefill_attention_fwd(q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens, out,
                                     max_q_seqlen, scale=scale, sliding_window=sliding_window,
                                     logit_softcapping=logit_softcapping, causal=causal)
    if max_kv_seqlen is None:
        max_kv_seqlen = int(kv_seqlens.max().item())   # host sync: pass the hint to avoid it
    if sum_kv_seqlen is None:
        sum_kv_seqlen = int(kv_seqlens.sum().item())   # host sync: pass the hint to avoid it
    return run(kind, q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens, out, max_q_seqlen,
               max_kv_seqlen, sum_kv_seqlen, scale, sliding_window, causal, seqlens)
