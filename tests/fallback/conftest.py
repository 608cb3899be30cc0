"""Fixtures for the fallback tests: tiny checkpoints of families lmdp has no port for, one CPU thread."""
import pytest
import torch


@pytest.fixture(scope='module', autouse=True)
def one_cpu_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when another process shares the cores."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope='session')
def tiny_fallback(tmp_path_factory):
    """tiny_fallback(model_type, **overrides): a two-layer tiny checkpoint (cached per arguments)."""
    from lmdp.tiny import make_tiny
    cache = {}

    def get(model_type, **overrides):
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = str(make_tiny(model_type, tmp_path_factory.mktemp(model_type), num_hidden_layers=2,
                                       **overrides))
        return cache[key]

    return get
