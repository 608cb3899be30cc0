"""Helpers shared by the Triton kernels of lmdp (device queries, small jit functions)."""
import functools

import torch
import triton
import triton.language as tl


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a fixed small number off the GPU, e.g. the Triton interpreter)."""
    if device.type != 'cuda':
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row block, column block) of program `pid` over a num_m x num_n grid of output tiles: GROUP_M row blocks
    share each column block in turn, so neighbouring programs reuse one weight tile from L2 (a GEMM's, or one
    expert's in the grouped MoE GEMM)."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def tanh(x):
    # tanh from the long-standing sigmoid (libdevice paths moved between Triton versions)
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


def dot_precision(q: torch.Tensor) -> str:
    """`tl.dot`'s input_precision: full float32 ('ieee') for float32 attention, so a float32 run matches the
    float32 reference to ~1e-6 instead of TF32's ~1e-3; 'tf32' (the default, which bf16/fp16 inputs ignore)
    otherwise."""
    return 'ieee' if q.dtype == torch.float32 else 'tf32'
