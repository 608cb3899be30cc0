"""lmdp's paged attention as a transformers attention function.

A transformers model built with `attn_implementation=ATTN_IMPLEMENTATION` hands every attention call to
`paged_attention_forward`: it gets q/k/v after the model's own projections, norms and rotary (`[1, H, T, D]`), writes
k/v into the layer's paged cache and attends over it with lmdp's kernels, so packed `[1, T]` steps, chunked prefill
and prefix caching work on code that was written for one padded batch. What a layer asks of attention -- its
scale, sliding window, softcap, GQA grouping -- arrives as the call's arguments and is passed through.

The step (the KV caches and `AttentionMetadata`) reaches the function through a context variable that
`TransformersForCausalLM.forward` sets: not every model's code passes extra keyword arguments down to its
attention, so a step can't travel that way.
"""
import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

ATTN_IMPLEMENTATION = 'lmdp_paged'

#: keyword arguments that change what attention computes and that lmdp's kernels do not compute; a call that
#: carries one (not None) is refused rather than answered wrongly
UNSUPPORTED_KWARGS = {
    's_aux': 'attention sinks',
    'sinks': 'attention sinks',
    'position_bias': 'an additive position bias (T5-style)',
    'indices': 'sparse attention over selected keys',
    'block_indices': 'block-sparse attention',
}


@dataclass
class PagedStep:
    """What one forward's attention calls read: the per-layer caches and the step's metadata, and which layers
    have been served (so a model whose code skips the attention interface is caught, not silently wrong)."""
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    attn_metadata: object
    served: set[int] = field(default_factory=set)
    # a shape probe (no cache, no metadata): layer -> ((kv heads, k dim), (kv heads, v dim)) of what it produced
    probe: dict[int, tuple] | None = None


_STEP: contextvars.ContextVar[PagedStep | None] = contextvars.ContextVar('lmdp_paged_step', default=None)


@contextlib.contextmanager
def paged_step(step: PagedStep):
    token = _STEP.set(step)
    try:
        yield step
    finally:
        _STEP.reset(token)


def current_step() -> PagedStep:
    step = _STEP.get()
    if step is None:
        raise RuntimeError('lmdp paged attention was called outside an lmdp step; a model built with '
                           f'attn_implementation={ATTN_IMPLEMENTATION!r} runs only inside TransformersForCausalLM')
    return step


def _layer_window(module, sliding_window):
    """The window this call asks for: the call's own argument when the model passes one, else the layer type
    the config gives this layer (some models apply their window only through the mask they would build)."""
    if sliding_window is not None:
        return sliding_window
    config = getattr(module, 'config', None)
    layer_types = getattr(config, 'layer_types', None)
    idx = getattr(module, 'layer_idx', None)
    if layer_types and idx is not None and idx < len(layer_types) and layer_types[idx] == 'sliding_attention':
        return getattr(config, 'sliding_window', None)
    return None


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, sliding_window: int | None = None,
                            softcap: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function contract: q `[1, Hq, T, D]`, k/v `[1, Hk, T, D(v)]` → (`[1, T, Hq, Dv]`,
    None). `attention_mask` is ignored: causality, the window and the sequence boundaries of the packed step
    come from the paged metadata."""
    from .. import kernels

    step = current_step()
    layer = getattr(module, 'layer_idx', None)
    if layer is None:
        raise RuntimeError(f'{type(module).__name__} has no layer_idx, so lmdp cannot tell which layer\'s KV cache '
                           'it reads; this model cannot run on the transformers fallback')
    for name, what in UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f'{type(module).__name__} asks attention for {what} ({name}=...), which lmdp\'s '
                                      'paged kernels do not compute; this model cannot run on the transformers '
                                      'fallback')
    if is_causal is False or getattr(module, 'is_causal', True) is False:
        raise NotImplementedError(f'{type(module).__name__} is bidirectional (is_causal=False); the paged cache '
                                  'serves causal decoders only')
    if query.size(0) != 1:
        raise RuntimeError(f'lmdp steps are packed into one row, but attention got a batch of {query.size(0)}')
    # [1, H, T, D] -> [T, H, D]: strided views, which the kernels read as they are
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    if step.probe is not None:
        step.probe[layer] = (tuple(k.shape[1:]), tuple(v.shape[1:]))
        step.served.add(layer)
        return q.new_zeros(1, q.size(0), q.size(1), v.size(-1)), None
    k_cache, v_cache = step.kv_caches[layer]
    if k.shape[1:] != k_cache.shape[2:] or v.shape[1:] != v_cache.shape[2:]:
        raise RuntimeError(f'layer {layer} produced keys {tuple(k.shape[1:])} and values {tuple(v.shape[1:])} (heads, '
                           f'head_dim) but its KV cache holds {tuple(k_cache.shape[2:])} and '
                           f'{tuple(v_cache.shape[2:])}; the config\'s head counts do not describe this model\'s '
                           'attention, so the fallback cannot size its cache')
    meta = step.attn_metadata
    kernels.fill_kv_cache(k, v, k_cache, v_cache, meta.q_start_loc, meta.q_seqlens, meta.kv_seqlens,
                          meta.block_offsets)
    window = _layer_window(module, sliding_window)
    # decode steps size their KV split by batch alone, as lmdp.nn.Attention does, so a CUDA graph replays the
    # very kernels an eager step of that batch size runs
    out = kernels.paged_attention_fwd(q, k_cache, v_cache, meta.block_offsets, meta.q_start_loc, meta.q_seqlens,
                                      meta.kv_seqlens, scale=scaling, sliding_window=window if window else None,
                                      logit_softcapping=softcap or None, causal=True, is_decoding=meta.is_decoding,
                                      max_q_seqlen=meta.max_q_seqlen,
                                      max_kv_seqlen=None if meta.is_decoding else meta.max_kv_seqlen,
                                      sum_kv_seqlen=None if meta.is_decoding else (meta.sum_kv_seqlen or None),
                                      num_decodes=meta.num_decodes)
    step.served.add(layer)
    return out[None], None


def register_paged_attention():
    """Register the function under ATTN_IMPLEMENTATION (idempotent)."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
