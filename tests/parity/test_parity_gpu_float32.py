"""float32 on CUDA: the Triton attention kernels compute their dots in full float32, so a float32 parity run on
the GPU holds the same 1e-5 rule as on the CPU (TF32 dots would miss it by two orders of magnitude)."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]


def test_float32_parity_on_cuda(tmp_path):
    import parity
    from lmdp.tiny import make_tiny
    report = parity.compare(str(make_tiny('llama', tmp_path / 'tl')), dtype='float32', device='cuda')
    assert report.passed, report.summary()
    assert max(t.port.rel_l2 for t in report.main_taps if t.port is not None) < 1e-5
