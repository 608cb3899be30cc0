"""The Qwen3-MoE port on lmdp's Triton kernels against transformers, on the CPU (the Triton interpreter): the router
kernel, the grouped-GEMM path in prefill and the GEMV path in batch-1 decode run end to end under the parity
harness's verdict. A GPU runs the same wiring for real; these tests are skipped there."""
import importlib

import pytest
import torch

import parity

tk = importlib.import_module('lmdp.kernels.triton')
tmoe = importlib.import_module('lmdp.kernels.triton.fused_moe')
dispatch = importlib.import_module('lmdp.kernels.dispatch')

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='interpreter run (CPU); a GPU runs the real one')


@pytest.fixture(scope='module')
def tiny_qwen3_moe(tmp_path_factory):
    from lmdp.tiny import make_tiny
    return str(make_tiny('qwen3_moe', tmp_path_factory.mktemp('qwen3_moe'), num_hidden_layers=2))


@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_qwen3_moe_on_triton_kernels_passes_parity(tiny_qwen3_moe, monkeypatch, dtype):
    used, paths = set(), []

    def implementation(name, tensor):
        fn = getattr(tk, name)

        def run(*args, **kwargs):
            used.add(name)
            return fn(*args, **kwargs)
        return run
    monkeypatch.setattr(dispatch, 'implementation', implementation)
    for path in ('gemv', 'grouped'):
        real = getattr(tmoe, f'_fused_moe_{path}')
        monkeypatch.setattr(tmoe, f'_fused_moe_{path}', lambda *a, real=real, path=path: paths.append(path) or real(*a))
    report = parity.compare(tiny_qwen3_moe, dtype=dtype, device='cpu', prompts=1, decode_steps=2)
    assert report.passed, report.summary()
    assert {'softmax_topk', 'fused_moe'} <= used
    # prefill: 5 tokens x top-4 = 20 pairs, past the GEMV's 16 / 4; decode: 4 pairs; once per port run (the
    # harness runs the port for each of its views)
    one_run = ['grouped'] * 2 + ['gemv'] * 4
    assert len(paths) >= len(one_run) and paths == one_run * (len(paths) // len(one_run))
