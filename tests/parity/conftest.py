"""Fixtures for the harness's own tests: transformers reference runs of the tiny llama, shared per dtype."""
import pytest

from parity import run_references


@pytest.fixture(scope='session')
def references(tiny_llama):
    """`references(dtype='float32', **kw)`: one cached transformers run of the tiny llama per set of arguments."""
    cache = {}

    def get(dtype='float32', **kwargs):
        key = (dtype, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = run_references(tiny_llama, dtype=dtype, device='cpu', **kwargs)
        return cache[key]

    return get
