"""lmdp kernels under the fallback's transformers code, where they compute what that code computes.

transformers' modeling code spends a dozen small kernels on what lmdp does in one: an RMSNorm (upcast, square,
mean, add, rsqrt, multiply, cast, scale), a rotary embedding (two multiplies, a negation, a concatenation and an
add, for q and for k). In a decode step those launches, not the weights, set the pace. So when the model is built,
each candidate is checked numerically against lmdp's kernel, on random inputs in the model's dtype and device, and
only what agrees is replaced (the way transformers' own hub kernels replace a layer's forward):

- RMSNorm modules: their forward becomes lmdp's fused RMSNorm (Gemma's `(1 + w)` norms fail the check and stay);
- `nn.Linear`: lmdp's linear dispatch (its GEMV kernel for decode-sized inputs on CUDA, cuBLAS otherwise);
- the modeling module's `apply_rotary_pos_emb`: lmdp's rotary kernel, inside lmdp steps only (a transformers model
  run outside one, such as the parity harness's reference, still runs its own function).

Module names, parameters and the modeling code around them stay as they are.
"""
import copy
import functools
import logging
import sys
import types

import torch
from torch import nn

from .. import kernels
from .attention import _STEP

logger = logging.getLogger('lmdp')

#: (modeling module, dtype, device type) -> whether lmdp's rotary kernel matched its apply_rotary_pos_emb there,
#: for q/k as wide as the rotary dim, and for wider q/k (whose channels past the rotary dim pass through)
_ROTARY_OK: dict[tuple[str, torch.dtype, str], tuple[bool, bool]] = {}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to rounding: relative L2 error within two units of the dtype's roundoff."""
    if a.shape != b.shape or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return False
    unit = 1e-6 if a.dtype == torch.float32 else torch.finfo(a.dtype).eps
    err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)
    return bool(err <= 2 * unit)


def _eps_of(module) -> float:
    for name in ('variance_epsilon', 'eps', 'epsilon'):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, 'weight', None)
    return ('RMSNorm' in type(module).__name__ and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and getattr(module, 'bias', None) is None and _eps_of(module) is not None)


@torch.no_grad()
def _rms_norm_agrees(module: nn.Module, dtype, device) -> bool:
    probe = copy.deepcopy(module)
    g = torch.Generator().manual_seed(0)
    n = probe.weight.numel()
    probe.weight.copy_((1 + 0.5 * torch.randn(n, generator=g)).to(probe.weight.dtype))
    x = torch.randn(5, n, generator=g).to(device=device, dtype=dtype)
    try:
        return _close(kernels.rms_norm(x, probe.weight, _eps_of(probe)), probe(x))
    except Exception:   # noqa: BLE001 - a module that can't even run the probe is simply left alone
        return False


def _fused_rms_norm_forward(self, hidden_states):
    return kernels.rms_norm(hidden_states, self.weight, _eps_of(self))


def _linear_forward(self, x):
    return kernels.linear(x, self.weight, self.bias)


def _lmdp_rotary(q, k, cos, sin):
    # [1, H, T, D] and [1, T, R] -> the kernel's packed [T, H, D] and [T, R], and back
    q_out, k_out = kernels.apply_rotary_pos_emb(q[0].transpose(0, 1), k[0].transpose(0, 1), cos[0], sin[0])
    return q_out.transpose(0, 1)[None], k_out.transpose(0, 1)[None]


def _rotary_wrapper(original, module_name: str):

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        ok = _ROTARY_OK.get((module_name, q.dtype, q.device.type), (False, False))
        if (args or kwargs or _STEP.get() is None or q.dim() != 4 or q.size(0) != 1 or cos.dim() != 3
                or not ok[q.size(-1) != cos.size(-1)]):
            return original(q, k, cos, sin, *args, **kwargs)
        return _lmdp_rotary(q, k, cos, sin)

    apply_rotary_pos_emb.lmdp_original = original
    return apply_rotary_pos_emb


@torch.no_grad()
def _rotary_agrees(original, rotary_dim: int, head_dim: int, dtype, device) -> bool:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, head_dim, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(1, 2, 6, head_dim, generator=g).to(device=device, dtype=dtype)
    angles = torch.rand(6, rotary_dim // 2, generator=g) * 20
    emb = torch.cat([angles, angles], dim=-1)[None]
    cos, sin = emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)
    try:
        want_q, want_k = original(q, k, cos, sin)
        got_q, got_k = _lmdp_rotary(q, k, cos, sin)
    except Exception:   # noqa: BLE001 - a signature lmdp does not know: leave it alone
        return False
    return _close(got_q, want_q) and _close(got_k, want_k)


def _rotary_dims(model) -> tuple[int, int]:
    """(rotary dim, head dim) of the model's attention, from its rotary embedding module."""
    base = model.hf_model.base_model
    rotary = getattr(base, 'rotary_emb', None)
    inv_freq = getattr(rotary, 'inv_freq', None) if rotary is not None else None
    if inv_freq is None:
        return 0, 0
    _, k_dim, _ = model.kv_layout
    return 2 * inv_freq.numel(), k_dim


def install(model) -> list[str]:
    """Put lmdp kernels under a TransformersForCausalLM's transformers code where they agree; returns what was
    replaced, in words (also logged)."""
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    norms = linears = 0
    for module in model.modules():
        if not type(module).__module__.startswith('transformers.'):
            continue                    # lmdp's own modules (swapped in) already run lmdp kernels
        if _is_rms_norm(module) and _rms_norm_agrees(module, dtype, device):
            # bound to the module, so that a deepcopy of it is bound to the copy
            module.forward = types.MethodType(_fused_rms_norm_forward, module)
            norms += 1
    for module in model.modules():
        if type(module) is nn.Linear:
            module.forward = types.MethodType(_linear_forward, module)
            linears += 1
    done = []
    if norms:
        done.append(f'{norms} RMSNorm modules -> lmdp fused RMSNorm')
    if linears:
        done.append(f'{linears} nn.Linear -> lmdp linear (GEMV for decode-sized batches on CUDA)')
    done += _install_rotary(model, dtype, device)
    logger.info('%s: lmdp kernels under the transformers code: %s', model.hf_class, '; '.join(done) or 'none')
    return done


def _install_rotary(model, dtype, device) -> list[str]:
    rotary_dim, head_dim = _rotary_dims(model)
    if not rotary_dim:
        return []
    names = {type(m).__module__ for m in model.hf_model.modules() if type(m).__module__.startswith('transformers.')}
    done = []
    for name in sorted(names):
        module = sys.modules.get(name)
        current = getattr(module, 'apply_rotary_pos_emb', None)
        if current is None or not callable(current):
            continue
        original = getattr(current, 'lmdp_original', current)
        key = (name, dtype, device.type)
        if key not in _ROTARY_OK:
            _ROTARY_OK[key] = (_rotary_agrees(original, rotary_dim, rotary_dim, dtype, device),
                               rotary_dim < head_dim and _rotary_agrees(original, rotary_dim, head_dim, dtype, device))
        if any(_ROTARY_OK[key]):
            if current is original:
                module.apply_rotary_pos_emb = _rotary_wrapper(original, name)
            done.append(f'{name.rsplit(".", 1)[-1]}.apply_rotary_pos_emb -> lmdp rotary kernel (in lmdp steps)')
    return done
