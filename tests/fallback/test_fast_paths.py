"""lmdp kernels replace transformers' RMSNorm, linear and rotary code only where they compute the same thing,
and only inside lmdp steps: a transformers model run outside one (the parity reference) keeps its own code."""
import sys

import pytest
import torch

from lmdp import kernels
from lmdp.engine import ModelAgent
from lmdp.fallback import TransformersForCausalLM
from lmdp.fallback.fast_paths import _close


def _agent(path, arch):
    return ModelAgent.from_pretrained(path, dtype='float32', custom_module_map={arch: TransformersForCausalLM})


def test_llama_norms_and_rotary_take_lmdp_kernels_gemma_norms_do_not(tiny_fallback):
    llama = _agent(tiny_fallback('llama'), 'LlamaForCausalLM').model
    gemma = _agent(tiny_fallback('gemma2'), 'Gemma2ForCausalLM').model
    assert any('RMSNorm modules' in line for line in llama.fast_paths)
    assert any('modeling_llama.apply_rotary_pos_emb' in line for line in llama.fast_paths)
    assert 'forward' in vars(llama.model.norm)
    # Gemma's norms multiply by (1 + w): the numerical check refuses the swap, the module keeps its own forward
    assert not any('RMSNorm' in line for line in gemma.fast_paths) and 'forward' not in vars(gemma.model.norm)


def test_an_interleaved_rotary_keeps_its_own_function(tiny_fallback):
    cohere = _agent(tiny_fallback('cohere'), 'CohereForCausalLM').model
    assert not any('rotary' in line for line in cohere.fast_paths)
    module = sys.modules['transformers.models.cohere.modeling_cohere']
    assert not hasattr(module.apply_rotary_pos_emb, 'lmdp_original')


def test_outside_an_lmdp_step_transformers_runs_its_own_rotary(tiny_fallback, monkeypatch):
    from transformers import AutoModelForCausalLM
    path = tiny_fallback('llama')
    _agent(path, 'LlamaForCausalLM')
    module = sys.modules['transformers.models.llama.modeling_llama']
    assert hasattr(module.apply_rotary_pos_emb, 'lmdp_original')
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation='eager').eval()

    def refuse(*args, **kwargs):
        raise AssertionError('lmdp rotary ran outside an lmdp step')
    monkeypatch.setattr(kernels, 'apply_rotary_pos_emb', refuse)
    with torch.no_grad():
        ref(torch.tensor([[5, 9, 11]]))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_close_accepts_rounding_and_refuses_a_real_difference(dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 64, generator=g).to(dtype)
    rounded = (a.double() * (1 + 1e-8)).to(dtype)
    assert _close(rounded, a)
    assert not _close(a * 1.05, a) and not _close(a.flip(-1), a)
    assert not _close(torch.full_like(a, float('nan')), a)
