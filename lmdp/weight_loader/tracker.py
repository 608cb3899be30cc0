"""Which parameters a weight load filled and which checkpoint tensors it used.

`load_model_weights` installs a `LoadTracker` for the duration of `model.load_weights(...)`. Weight loaders call
`record_load(param, shard_id)`; the tracker notes the checkpoint tensor being loaded at that moment. A tensor
that caused no load matched nothing. Parameters built from several checkpoint tensors (q/k/v → qkv_proj) list
their shard ids in `param.lmdp_shards` and count as loaded only once every shard arrived.
"""
import contextlib
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Optional

import torch

_ACTIVE: Optional['LoadTracker'] = None


def record_load(param: torch.Tensor, shard_id=None):
    """Tell the active tracker (if any) that `param` (or one shard of it) was just written."""
    if _ACTIVE is not None:
        _ACTIVE.record(param, shard_id)


def describe_param(param: torch.Tensor) -> str:
    """'parameter NAME' while a tracker knows the name, else a shape description."""
    name = _ACTIVE.param_names.get(id(param)) if _ACTIVE is not None else None
    ckpt = f" (checkpoint tensor '{_ACTIVE.current}')" if _ACTIVE is not None and _ACTIVE.current else ''
    if name:
        return f"parameter '{name}'{ckpt}"
    return f'a parameter of shape {tuple(param.shape)}{ckpt}'


class LoadTracker:

    def __init__(self, model: torch.nn.Module, ignore_patterns: Iterable[str] = ()):
        self.params: dict[str, torch.Tensor] = dict(model.named_parameters())
        self.param_names = {id(p): n for n, p in self.params.items()}
        self.loaded: dict[str, set] = defaultdict(set)
        self.ignore = [re.compile(p) for p in ignore_patterns]
        self.current: str | None = None
        self._loads_for_current = 0
        self.seen: list[str] = []
        self.unused: list[str] = []

    def record(self, param, shard_id=None):
        name = self.param_names.get(id(param))
        if name is not None:
            self.loaded[name].add(shard_id)
        self._loads_for_current += 1

    def _close_current(self):
        if self.current is not None and self._loads_for_current == 0:
            if not any(p.search(self.current) for p in self.ignore):
                self.unused.append(self.current)
        self.current, self._loads_for_current = None, 0

    def watch(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass (name, tensor) pairs through, noting which caused no load."""
        for name, tensor in weights:
            self._close_current()
            self.current = name
            self.seen.append(name)
            yield name, tensor
        self._close_current()

    def missing(self) -> list[str]:
        """Parameters (or 'param [shard s]') never loaded."""
        out = []
        for name, param in self.params.items():
            needed = getattr(param, 'lmdp_shards', (None, ))
            got = self.loaded.get(name, set())
            if needed == (None, ):
                if not got:
                    out.append(name)
                continue
            out.extend(f'{name} [shard {s!r}]' for s in needed if s not in got)
        return out


@contextlib.contextmanager
def tracking(model: torch.nn.Module, ignore_patterns: Iterable[str] = ()):
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, LoadTracker(model, ignore_patterns)
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous
