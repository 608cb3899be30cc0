"""Kernel tests: run the Triton kernels under the Triton interpreter when there is no GPU.

Triton decides between compiling and interpreting when a `@triton.jit` decorator runs (it reads
`TRITON_INTERPRET` then: `triton.knobs.runtime.interpret` on Triton 3.4+, `os.environ` before that), i.e. when
`lmdp.kernels.triton` is first imported. So the variable is set here, before the test modules import it, and a
copy of the package imported earlier without it is dropped so that it gets imported again.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'
    try:  # Triton 3.4+ caches knobs that were assigned explicitly; make sure nothing overrides the env var
        import triton
        knobs = getattr(triton, 'knobs', None)
        if knobs is not None:
            knobs.runtime.interpret = True
    except ImportError:
        pass
    for _name in [m for m in sys.modules if m == 'lmdp.kernels.triton' or m.startswith('lmdp.kernels.triton.')]:
        del sys.modules[_name]


def pytest_configure(config):
    config.addinivalue_line('markers', 'gpu: needs a CUDA device (Triton kernels compiled for real, bf16, real sizes)')
