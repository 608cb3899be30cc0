"""Shared fixtures: tiny random-weight checkpoints written by transformers itself."""
import pytest
import torch


@pytest.fixture(scope='session')
def tiny_llama(tmp_path_factory):
    from lmdp.tiny import make_tiny
    return str(make_tiny('llama', tmp_path_factory.mktemp('tiny_llama')))


@pytest.fixture(scope='session')
def hf_llama(tiny_llama):
    """The transformers reference of the tiny llama, float32, eager attention."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation='eager').eval()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
