"""The whole Llama port on lmdp's Triton kernels, against transformers, on the CPU (the Triton interpreter).

The dispatch point hands CPU tensors to the references, so the parity runs of CI never see a Triton kernel; here
it is made to pick Triton for every op, and the port's fusions (rotary inside the cache write, the gated
activation inside down_proj, the GEMV for 1-2 rows) run end to end under the parity harness's verdict. One and
two prompts make decode steps of 1 and 2 rows, the batches the GEMV serves. On a GPU the same wiring is what runs
for real (tests marked `gpu` elsewhere); these tests are skipped there.
"""
import importlib

import pytest
import torch

import parity
from parity.planted_bugs import PLANTED_BUGS

tk = importlib.import_module('lmdp.kernels.triton')
gemv_mod = importlib.import_module('lmdp.kernels.triton.gemv')
dispatch = importlib.import_module('lmdp.kernels.dispatch')

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason='interpreter run (CPU); a GPU runs the real one')


@pytest.fixture
def triton_everywhere(monkeypatch):
    """Route every dispatched op to its Triton kernel, whatever the device; returns the names of the ops used and
    the row counts the GEMV kernel was launched with."""
    used, gemv_rows = set(), []

    def implementation(name, tensor):
        fn = getattr(tk, name)

        def run(*args, **kwargs):
            used.add(name)
            return fn(*args, **kwargs)
        return run

    real_gemv = gemv_mod.gemv
    monkeypatch.setattr(dispatch, 'implementation', implementation)
    monkeypatch.setattr(gemv_mod, 'gemv', lambda x2, *a, **kw: gemv_rows.append(x2.size(0)) or real_gemv(x2, *a, **kw))
    return used, gemv_rows


@pytest.mark.parametrize('dtype,prompts', [('float32', 3), ('float16', 1), ('float16', 2)])
def test_llama_port_on_triton_kernels_passes_parity(tiny_llama, triton_everywhere, dtype, prompts):
    used, gemv_rows = triton_everywhere
    report = parity.compare(tiny_llama, dtype=dtype, device='cpu', prompts=prompts, decode_steps=3)
    assert report.passed, report.summary()
    assert {'linear', 'act_and_mul_linear', 'rotary_fill_kv_cache', 'paged_attention_fwd', 'rms_norm'} <= used
    # the rotary was deferred into the cache write: the stand-alone rotary kernel never ran
    assert 'apply_rotary_pos_emb' not in used
    if dtype == 'float16':
        assert set(gemv_rows) == {prompts}     # every decode step, every linear layer; prefill took F.linear
    else:
        assert not gemv_rows                   # float32 stays on F.linear (full-precision cuBLAS on a GPU)


def test_replacement_rotary_module_is_still_called_on_triton_kernels(tiny_llama, triton_everywhere):
    """A port that swaps in its own rotary module (here a planted bug) is not silently fused away."""
    used, _ = triton_everywhere
    bug = next(b for b in PLANTED_BUGS if b.name == 'rotary_k_halves_swapped')
    report = parity.compare(tiny_llama, dtype='float32', device='cpu', prompts=2, decode_steps=2,
                            custom_module_map=bug.module_map())
    assert not report.passed
    first = report.first_divergence
    assert (first.phase, first.tap) == (bug.phase, bug.tap)
    assert 'fill_kv_cache' in used and 'rotary_fill_kv_cache' not in used
