"""The grouped tile order shared by the GEMM kernels (dense FP8/AWQ, grouped MoE): every output tile is computed
by exactly one program, and GROUP_M row blocks take each column block in turn."""
import importlib

import torch
import triton
import triton.language as tl
from hypothesis import given, settings, strategies as st

common = importlib.import_module('lmdp.kernels.triton._common')


@triton.jit
def _tiles(Out, num_m, num_n, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = common.grouped_tile(pid, num_m, num_n, GROUP_M)
    tl.store(Out + pid * 2, pid_m)
    tl.store(Out + pid * 2 + 1, pid_n)


def tiles(num_m, num_n, group_m):
    out = torch.full((num_m * num_n, 2), -1, dtype=torch.int32, device='cuda' if torch.cuda.is_available() else 'cpu')
    _tiles[(num_m * num_n, )](out, num_m, num_n, GROUP_M=group_m)
    return [tuple(r) for r in out.tolist()]


@settings(max_examples=12, deadline=None)
@given(num_m=st.integers(1, 11), num_n=st.integers(1, 6), group_m=st.sampled_from([1, 2, 4, 8]))
def test_every_tile_is_computed_by_exactly_one_program(num_m, num_n, group_m):
    got = tiles(num_m, num_n, group_m)
    assert sorted(got) == [(m, n) for m in range(num_m) for n in range(num_n)]


@settings(max_examples=8, deadline=None)
@given(num_m=st.integers(1, 11), num_n=st.integers(1, 6), group_m=st.sampled_from([2, 4, 8]))
def test_consecutive_programs_walk_a_group_of_row_blocks_down_one_column_block(num_m, num_n, group_m):
    got = tiles(num_m, num_n, group_m)
    for start in range(0, num_m, group_m):                  # each group of row blocks ...
        rows = min(group_m, num_m - start)
        first = start * num_n
        chunk = got[first:first + rows * num_n]
        for n in range(num_n):                              # ... takes the column blocks one after the other
            assert chunk[n * rows:(n + 1) * rows] == [(start + i, n) for i in range(rows)]
