"""bfloat16 parity on CUDA with the Triton backend: the acceptance run of the CUDA backend, as a test. One prompt
makes batch-1 decode steps (the GEMV kernel and the fused activation), three the cuBLAS path."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]


@pytest.mark.parametrize('prompts', [1, 3])
def test_bf16_parity_on_cuda(tiny_llama, prompts):
    import parity
    report = parity.compare(tiny_llama, dtype='bfloat16', device='cuda', prompts=prompts)
    assert report.passed, report.summary()
