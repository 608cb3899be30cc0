"""Fixtures for the tensor-parallel tests: tiny checkpoints, and a guard that no spawned rank outlives its test."""
import os
import signal
import time

import pytest
import torch
from tp_helpers import child_pids


@pytest.fixture(autouse=True)
def no_rank_left_behind():
    """Fails a test that leaves a child process running, and kills it (so a failing test cleans up too)."""
    before = child_pids()
    yield
    deadline = time.monotonic() + 10
    while child_pids() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    left = child_pids() - before
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f'processes left running after the test: {sorted(left)}'


@pytest.fixture(scope='module', autouse=True)
def one_cpu_thread():
    """Tiny models gain nothing from intra-op threads on shared cores (see tests/engine/conftest.py)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope='session')
def tiny_llama2(tmp_path_factory):
    """Two layers, 4 query heads over 2 key/value heads (so tp=4 replicates each KV head on two ranks)."""
    from lmdp.tiny import make_tiny
    return str(make_tiny('llama', tmp_path_factory.mktemp('tp_llama'), num_hidden_layers=2))
