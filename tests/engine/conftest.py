"""Fixtures for the engine tests: a two-layer tiny llama, its transformers reference, pipelines over it."""
import pytest
import torch


@pytest.fixture(scope='module', autouse=True)
def one_cpu_thread():
    """The tiny models gain nothing from intra-op threads, and when another process shares the two cores,
    OpenMP's spinning threads make each small op up to a hundred times slower (measured: transformers' 32-step
    decode 0.8 s on one thread, 72 s on two). The old setting is restored after each module."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope='session')
def tiny2(tmp_path_factory):
    from lmdp.tiny import make_tiny
    return str(make_tiny('llama', tmp_path_factory.mktemp('tiny2'), num_hidden_layers=2))


@pytest.fixture(scope='session')
def hf2(tiny2):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny2, dtype=torch.float32, attn_implementation='eager').eval()


def _make_pipe(path, **config):
    from lmdp import PytorchEngineConfig, pipeline
    config = dict(dict(device_type='cpu', dtype='float32', block_size=16), **config)
    return pipeline(path, backend_config=PytorchEngineConfig(**config))


@pytest.fixture(scope='session')
def make_pipe():
    """make_pipe(path, **PytorchEngineConfig fields): a CPU float32 pipeline with 16-token blocks."""
    return _make_pipe


@pytest.fixture(scope='session')
def pipe(tiny2):
    """A shared pipeline for tests that only read from it (greedy and seeded runs, so order does not matter)."""
    return _make_pipe(tiny2, max_batch_size=64)


def _random_prompts(n, low, high, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [[1] + torch.randint(7, vocab, (length - 1,), generator=g).tolist() for length in lengths]


@pytest.fixture(scope='session')
def random_prompts():
    """random_prompts(n, low, high, seed): token-id prompts, `<s>` then ordinary tokens (ids 7..), lengths in
    [low, high]."""
    return _random_prompts
