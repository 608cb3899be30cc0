"""Reference ops of quantised linear layers (the ground truth of the Triton kernels, and the CPU path).

**FP8, 128x128 block scales.** A weight `W [N, K]` is stored as `float8_e4m3fn` codes `Wq` and float32 scales `S`:
`W[n, k] = Wq[n, k] * S[n // 128, k // 128]`, or `S[n, k // 128]` when the layer keeps one scale row per output row
(`scale_per_row`: layers whose projections don't start on 128-row boundaries). The input is quantised at run time
per token and group of 128 features, `x = xq * sx` with `sx = amax(|x_group|) / 448`, so the product is W8A8.

**AWQ, 4 bits.** lmdp keeps AWQ weights in its own layout, made at load time from the checkpoint's: `qweight
[N, K / 8]` int32 with input feature `8 j + i` in bits `4 i .. 4 i + 3` of word j (each output row's codes
contiguous, which is what a decode GEMV streams), `scales [N, K / G]` and `zeros [N, K / G]` (uint8):
`W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]`. Activations stay in the model dtype (W4A16).

The checkpoint's own AWQ layout (AutoAWQ's GEMM version) packs *output* features: `qweight [K, N / 8]` with column
`8 j + AWQ_ORDER[i]` in nibble i of word j; `awq_unpack` / `awq_pack` convert it.
"""

import torch
import torch.nn.functional as F

from .linear import gated_act

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_GROUP = 128                 # activation group and weight block, along K (and along N for weights)
FP8_EPS = 1e-10                 # the smallest group amax a scale is made from (an all-zero group stays zero)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_PACK = 8                    # 4-bit codes per int32


# --- FP8 ---

def fp8_quantize_groups(x: torch.Tensor, group: int = FP8_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """`(xq float8_e4m3fn [..., K], sx float32 [..., ceil(K / group)])` with `x ~= xq * sx` per group of the last
    dimension: sx = max(amax, eps) / 448, xq = x / sx rounded to nearest. float64 input keeps float64 scales."""
    k = x.size(-1)
    work = x if x.dtype == torch.float64 else x.float()
    groups = -(-k // group)
    padded = F.pad(work, (0, groups * group - k)) if groups * group != k else work
    blocks = padded.unflatten(-1, (groups, group))
    scale = blocks.abs().amax(-1).clamp(min=FP8_EPS) / FP8_MAX
    q = (blocks / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).flatten(-2)[..., :k]
    return q, scale


def fp8_fake_quant(x: torch.Tensor, group: int = FP8_GROUP) -> torch.Tensor:
    """x after the round trip through its FP8 per-group codes (what an FP8 linear layer multiplies), in x's dtype."""
    q, scale = fp8_quantize_groups(x, group)
    k = x.size(-1)
    deq = q.to(scale.dtype) * scale.repeat_interleave(group, -1)[..., :k]
    return deq.to(x.dtype)


def fp8_expand_scale(scale: torch.Tensor, n: int, k: int, scale_per_row: bool = False,
                     block: tuple[int, int] = (FP8_GROUP, FP8_GROUP)) -> torch.Tensor:
    """Block scales `[..., ceil(n / bn) or n, ceil(k / bk)]` spread over every weight element `[..., n, k]`."""
    if not scale_per_row:
        scale = scale.repeat_interleave(block[0], -2)[..., :n, :]
    return scale.repeat_interleave(block[1], -1)[..., :k]


def fp8_block_dequant(weight: torch.Tensor, scale: torch.Tensor, scale_per_row: bool = False) -> torch.Tensor:
    """The float32 weight `[..., N, K]` that FP8 codes and their block scales stand for."""
    n, k = weight.shape[-2:]
    return weight.float() * fp8_expand_scale(scale.float(), n, k, scale_per_row)


def fp8_quantize_blocks(w: torch.Tensor, block: tuple[int, int] = (FP8_GROUP, FP8_GROUP)):
    """Round-to-nearest FP8 of a weight `[..., N, K]` with one scale per block: `(float8 codes, float32
    weight_scale_inv [..., ceil(N / bn), ceil(K / bk)])`, scale = amax / 448 (1 for an all-zero block)."""
    n, k = w.shape[-2:]
    bn, bk = block
    rn, rk = -(-n // bn), -(-k // bk)
    padded = F.pad(w.float(), (0, rk * bk - k, 0, rn * bn - n))
    blocks = padded.unflatten(-1, (rk, bk)).unflatten(-3, (rn, bn))           # [..., rn, bn, rk, bk]
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.flatten(-2).flatten(-3, -2)[..., :n, :k].contiguous()
    return q, scale.float()


def check_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, scale_per_row: bool, act):
    k = weight.size(-1) * (2 if act is not None else 1)
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise ValueError(f'fp8_block_linear: weight must be float8_e4m3fn [N, K], got {weight.dtype} '
                         f'{tuple(weight.shape)}')
    rows = weight.size(0) if scale_per_row else -(-weight.size(0) // FP8_GROUP)
    if tuple(scale.shape) != (rows, -(-weight.size(1) // FP8_GROUP)):
        raise ValueError(f'fp8_block_linear: scale {tuple(scale.shape)} does not fit weight {tuple(weight.shape)} '
                         f'(expected {(rows, -(-weight.size(1) // FP8_GROUP))})')
    if x.size(-1) != k:
        raise ValueError(f'fp8_block_linear: input has {x.size(-1)} features, the weight takes {k}')


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                     act: str | None = None, scale_per_row: bool = False) -> torch.Tensor:
    """`F.linear(x, W)` for an FP8 block-scaled W with x quantised per token group of 128 (W8A8), computed in
    float32 and rounded once to x's dtype; `act`: x is a fused `[gate | up]` and the layer's input is
    `act(gate) * up` (rounded to x's dtype, then quantised)."""
    check_fp8_linear(x, weight, scale, scale_per_row, act)
    if act is not None:
        x = gated_act(x, act)
    xd = fp8_fake_quant(x.float())
    y = F.linear(xd, fp8_block_dequant(weight, scale, scale_per_row))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# --- AWQ ---

def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's packed int32 `[R, C / 8]` -> 4-bit codes `[R, C]` (uint8) in column order."""
    shifts = torch.tensor([4 * AWQ_ORDER.index(j) for j in range(AWQ_PACK)], dtype=torch.int32, device=packed.device)
    codes = (packed.to(torch.int32)[..., None] >> shifts) & 0xF
    return codes.flatten(-2).to(torch.uint8)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32 bits -> int32 of the same bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes `[R, C]` -> AutoAWQ's packed int32 `[R, C / 8]` (column `8 j + AWQ_ORDER[i]` in nibble i)."""
    c = codes.to(torch.int64).unflatten(-1, (-1, AWQ_PACK))
    words = sum(c[..., AWQ_ORDER[i]] << (4 * i) for i in range(AWQ_PACK))
    return _to_int32(words)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes `[N, K]` -> lmdp's packed int32 `[N, K / 8]`, input feature `8 j + i` in nibble i of word j."""
    c = codes.to(torch.int64).unflatten(-1, (-1, AWQ_PACK))
    words = sum(c[..., i] << (4 * i) for i in range(AWQ_PACK))
    return _to_int32(words)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """lmdp's packed int32 `[N, K / 8]` -> 4-bit codes `[N, K]` (uint8)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return ((packed[..., None] >> shifts) & 0xF).flatten(-2).to(torch.uint8)


def awq_dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float32 weight `[N, K]` of lmdp's AWQ layout (qweight `[N, K / 8]`, scales and zeros `[N, K / G]`)."""
    q = unpack_rows(qweight).float()
    group = q.size(-1) // scales.size(-1)
    z = zeros.float().repeat_interleave(group, -1)
    s = scales.float().repeat_interleave(group, -1)
    return (q - z) * s


def check_awq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, act):
    n, k = qweight.size(0), qweight.size(1) * AWQ_PACK
    if qweight.dtype != torch.int32 or scales.shape != zeros.shape or scales.size(0) != n or k % scales.size(1):
        raise ValueError(f'awq_linear: qweight {qweight.dtype} {tuple(qweight.shape)}, scales {tuple(scales.shape)} '
                         f'and zeros {tuple(zeros.shape)} are no AWQ layer (int32 [N, K/8], [N, K/G] and [N, K/G])')
    if x.size(-1) != k * (2 if act is not None else 1):
        raise ValueError(f'awq_linear: input has {x.size(-1)} features, the weight takes {k}')


def awq_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bias: torch.Tensor | None = None, act: str | None = None) -> torch.Tensor:
    """`F.linear(x, W, b)` for lmdp's AWQ layout, the weight dequantised exactly (float32) and cast to x's dtype."""
    check_awq_linear(x, qweight, scales, zeros, act)
    if act is not None:
        x = gated_act(x, act)
    return F.linear(x, awq_dequant(qweight, scales, zeros).to(x.dtype), bias)


def awq_quantize(w: torch.Tensor, group: int = 128):
    """Round-to-nearest 4-bit with zero points, per output row and group of `group` inputs, of `w [N, K]`:
    `(codes uint8 [N, K], scales float16 [N, K / G], zeros uint8 [N, K / G])`. The scale is (max - min) / 15 of
    the group rounded to float16 first, so that the codes are exact for the scale stored."""
    n, k = w.shape
    g = w.float().unflatten(-1, (k // group, group))
    hi, lo = g.amax(-1), g.amin(-1)
    scale = ((hi - lo).clamp(min=1e-5) / 15).to(torch.float16)
    s = scale.float()
    zero = (-lo / s).round().clamp(0, 15)
    codes = ((g / s[..., None]).round() + zero[..., None]).clamp(0, 15)
    return codes.flatten(-2).to(torch.uint8), scale, zero.to(torch.uint8)


# --- FP8 experts (W8A16) ---

def fp8_expert_dequant(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stacked FP8 expert weights `[E, N, K]` with per-row scales `[E, N, K / 128]` in `dtype` (rounded once)."""
    return fp8_block_dequant(weight, scale, scale_per_row=True).to(dtype)


def fused_moe_fp8(hidden_states: torch.Tensor, gate_up_weights: torch.Tensor, gate_up_scales: torch.Tensor,
                  down_weights: torch.Tensor, down_scales: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, renormalize: bool = False, act: str = 'silu') -> torch.Tensor:
    """`fused_moe` with FP8 expert weights and one float32 scale per output row and 128 inputs (W8A16: the
    activations are not quantised): each expert's weight is dequantised to the activations' dtype, then the
    experts run as unquantised ones do."""
    from .moe import fused_moe
    for w, s, what in ((gate_up_weights, gate_up_scales, 'gate_up'), (down_weights, down_scales, 'down')):
        if w.dtype != FP8_DTYPE or tuple(s.shape) != (*w.shape[:2], -(-w.size(2) // FP8_GROUP)):
            raise ValueError(f'fused_moe_fp8: {what} weights must be float8_e4m3fn [E, N, K] with scales '
                             f'[E, N, K / 128]; got {w.dtype} {tuple(w.shape)} and {tuple(s.shape)}')
    dtype = hidden_states.dtype
    return fused_moe(hidden_states, fp8_expert_dequant(gate_up_weights, gate_up_scales, dtype),
                     fp8_expert_dequant(down_weights, down_scales, dtype), topk_weights, topk_ids, renormalize, act)
