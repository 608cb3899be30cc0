"""Helpers shared by the Triton kernels of lmdp (device queries, small jit functions)."""
import functools

import torch
import triton
import triton.language as tl

from ... import envs

_PDL = envs.LMDP_PDL
_INTERPRET = envs.TRITON_INTERPRET


def pdl_launch(device: torch.device) -> dict:
    """Launch options of a kernel that can run as a programmatic dependent (PDL, sm_90+): `{'USE_PDL': True,
    'launch_pdl': True}` when `LMDP_PDL` is on and `device` can, else `{'USE_PDL': False}`. Such a kernel must call
    `pdl_wait()` (under `if USE_PDL:`) before it reads anything an earlier kernel wrote; what it reads before that
    may only be what no kernel of the step writes (weights)."""
    if not _PDL or device.type != 'cuda' or _INTERPRET:
        return {'USE_PDL': False}
    return {'USE_PDL': True, 'launch_pdl': True} if _capability(device)[0] >= 9 else {'USE_PDL': False}


@functools.cache
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device) -> tuple[int, int]:
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def pdl_wait():
    """Wait until the kernel this one depends on has finished and its writes are visible, then let the next
    kernel's programs launch (they wait in turn). Call only under a USE_PDL constexpr (the interpreter has no
    `griddepcontrol`)."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


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
