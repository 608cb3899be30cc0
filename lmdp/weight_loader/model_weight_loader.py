"""Loading a checkpoint into a model through its `load_weights`, with a full account of what matched."""
import logging
from typing import Iterable, Optional, Tuple

import torch

from ..errors import WeightLoadError
from .loaders import default_weight_loader
from .checkpoint import iter_checkpoint
from .tracker import describe_param, record_load, tracking

logger = logging.getLogger('lmdp')


def load_weight(param: torch.nn.Parameter, loaded_weight: torch.Tensor, **kwargs):
    """Load one tensor through the parameter's own `weight_loader` (the default copies it whole).

    A stacked parameter (qkv_proj, gate_up_proj) takes `shard_id=`, or without it a checkpoint tensor that holds
    every shard already fused. Any error a loader raises comes back naming the parameter and the checkpoint tensor.
    """
    loader = getattr(param, 'weight_loader', default_weight_loader)
    try:
        loader(param, loaded_weight, **kwargs)
    except WeightLoadError:
        raise
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        shard = f" (shard {kwargs['shard_id']!r})" if kwargs.get('shard_id') is not None else ''
        raise WeightLoadError(f'loading {describe_param(param)}{shard} from a tensor of shape '
                              f'{tuple(loaded_weight.shape)} failed in {getattr(loader, "__qualname__", loader)}: '
                              f'{type(e).__name__}: {e}') from e
    # a user's own loader may not report itself; count it as loaded anyway
    record_load(param, kwargs.get('shard_id'))


def expected_checkpoint_name(model, entry: str) -> Optional[str]:
    """For 'x.qkv_proj.weight [shard 'k']', the checkpoint name the model's packed_modules_mapping implies."""
    if ' [shard ' not in entry:
        return None
    name, shard = entry.split(' [shard ', 1)
    packed = getattr(model, 'packed_modules_mapping', {}) or {}
    params = dict(model.named_parameters())
    shards = getattr(params.get(name), 'lmdp_shards', ())
    for fused, parts in packed.items():
        if f'.{fused}.' in f'.{name}' and len(parts) == len(shards):
            shard_value = shard.rstrip(']')
            for i, s in enumerate(shards):
                if repr(s) == shard_value:
                    return name.replace(fused, parts[i])
    return None


def load_model_weights(model: torch.nn.Module, model_path: str = None,
                       weights: Optional[Iterable[Tuple[str, torch.Tensor]]] = None, strict: bool = True):
    """Stream a checkpoint into `model.load_weights`, then check coverage.

    Raises WeightLoadError naming every parameter never loaded (when strict); logs a warning naming every
    checkpoint tensor that matched no parameter. Returns the tracker (loaded, unused, seen).
    """
    if weights is None:
        weights = iter_checkpoint(model_path)
    ignore = list(getattr(model, 'ignored_checkpoint_keys', ()))
    with tracking(model, ignore) as tracker:
        model.load_weights(tracker.watch(weights))
    if not tracker.seen:
        raise WeightLoadError(f'the checkpoint {model_path or ""} yielded no tensors')
    if tracker.unused:
        logger.warning('%d checkpoint tensor(s) matched no parameter and were ignored: %s', len(tracker.unused),
                       ', '.join(tracker.unused))
    missing = tracker.missing()
    if missing and strict:
        lines = []
        for entry in missing:
            hint = expected_checkpoint_name(model, entry)
            lines.append(f'  {entry}' + (f" (checkpoint tensor '{hint}')" if hint else ''))
        raise WeightLoadError(f'{len(missing)} parameter(s) were never loaded from the checkpoint '
                              f"{model_path or ''}:\n" + '\n'.join(lines) +
                              '\nThe checkpoint lacks these tensors, or load_weights maps their names wrongly.')
    return tracker
