"""Fixtures for the tensor-parallel tests: tiny checkpoints, and a guard that no spawned rank outlives its test."""
import os
import signal
import time

import pytest
import torch


def child_pids(parent: int = None) -> set:
    """Processes whose parent is `parent` (this process by default), from /proc."""
    parent = os.getpid() if parent is None else parent
    found = set()
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                stat = f.read()
        except OSError:
            continue
        # the command name (field 2) may hold spaces; the parent pid is the 2nd field after its closing ')'
        state, ppid = stat.rsplit(')', 1)[1].split()[:2]
        if int(ppid) == parent and state != 'Z':
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


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


def random_prompts(n, low, high, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [[1] + torch.randint(7, vocab, (length - 1,), generator=g).tolist() for length in lengths]


def make_pipe(path, **config):
    from lmdp import PytorchEngineConfig, pipeline
    config = dict(dict(device_type='cpu', dtype='float32', block_size=16), **config)
    return pipeline(path, backend_config=PytorchEngineConfig(**config))
