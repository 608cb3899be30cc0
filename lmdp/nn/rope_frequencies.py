"""Rotary inverse frequencies per rope type, float32 ``[R // 2]``, and the settings of the scaled types.

The torch ops run in the same order as transformers' ``ROPE_INIT_FUNCTIONS``, so float32 tables match HF bit for
bit (tests/test_rotary_embedding.py checks this); keep it that way when editing the math.
"""
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class YarnParameters:
    """YaRN settings (HF ``rope_parameters`` keys of the same names)."""
    attention_factor: float | None = None  # None: derived from factor / mscale as HF does
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    original_max_position_embeddings: int | None = None  # None: max_position_embeddings


@dataclass
class LongRoPEScalingParameters:
    """LongRoPE settings: per-frequency factors for short and long contexts."""
    short_factor: Sequence[float]
    long_factor: Sequence[float]
    original_max_position_embeddings: int | None = None  # None: max_position_embeddings
    attention_factor: float | None = None  # None: derived from factor as HF does


@dataclass
class Llama3Parameters:
    """Llama 3.1 frequency smoothing settings."""
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def _rope_exponents(dim: int) -> Tensor:
    # int64 arange then float, as HF does, so later pow() sees identical inputs.
    return torch.arange(0, dim, 2, dtype=torch.int64).float() / dim


def _default_inv_freq(dim: int, base: float) -> Tensor:
    return 1.0 / (base**_rope_exponents(dim))


def _llama3_inv_freq(dim: int, base: float, factor: float, params: Llama3Parameters) -> Tensor:
    inv_freq = _default_inv_freq(dim, base)
    old_context_len = params.original_max_position_embeddings
    low_freq_wavelen = old_context_len / params.low_freq_factor
    high_freq_wavelen = old_context_len / params.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are interpolated by `factor`, short ones kept, the middle band blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - params.low_freq_factor) / (params.high_freq_factor -
                                                                      params.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention_factor(factor: float, params: YarnParameters) -> float:
    if params.attention_factor is not None:
        return float(params.attention_factor)
    if params.mscale and params.mscale_all_dim:
        return float(_yarn_get_mscale(factor, params.mscale) / _yarn_get_mscale(factor, params.mscale_all_dim))
    return _yarn_get_mscale(factor)


def _yarn_inv_freq(dim: int, base: float, factor: float, original_max_pos: int, params: YarnParameters) -> Tensor:

    def correction_dim(num_rotations):
        # the dim index whose wavelength fits `num_rotations` times in the original context
        return (dim * math.log(original_max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(params.beta_fast), correction_dim(params.beta_slow)
    if params.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp

    pos_freqs = base**_rope_exponents(dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    return (inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight)


def _longrope_inv_freq(dim: int, base: float, ext_factors: Sequence[float]) -> Tensor:
    ext = torch.tensor(list(ext_factors), dtype=torch.float32)
    return 1.0 / (ext * base**_rope_exponents(dim))
