"""Shared fixtures: tiny random-weight checkpoints written by transformers itself; hypothesis profiles."""
import os

import pytest
import torch

try:
    from hypothesis import Phase, settings
except ImportError:          # the GPU machine has no hypothesis; the property tests skip themselves there
    settings = None

if settings is not None:
    # Property tests: no per-example deadline (the CPU is shared, so timings are noise). scripts/mutation.sh picks
    # the 'mutation' profile: the same examples every run, so its table can be reproduced, and no shrinking, since
    # a mutant needs a failure, not the smallest one.
    settings.register_profile('ci', deadline=None)
    settings.register_profile('mutation', deadline=None, derandomize=True, database=None,
                              phases=[Phase.explicit, Phase.generate])
    settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))


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
