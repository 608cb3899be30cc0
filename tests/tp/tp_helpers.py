"""Helpers of the tensor-parallel tests (a module of its own name: `conftest` is taken by every test folder)."""
import os

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


def random_prompts(n, low, high, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [[1] + torch.randint(7, vocab, (length - 1,), generator=g).tolist() for length in lengths]


def make_pipe(path, **config):
    from lmdp import PytorchEngineConfig, pipeline
    config = dict(dict(device_type='cpu', dtype='float32', block_size=16), **config)
    return pipeline(path, backend_config=PytorchEngineConfig(**config))
