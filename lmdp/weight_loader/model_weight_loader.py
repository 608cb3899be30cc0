"""Loading a checkpoint into a model through its `load_weights`, with a full account of what matched."""
import ast
import logging
from collections.abc import Iterable

import torch

from ..errors import WeightLoadError
from .checkpoint import iter_checkpoint
from .loaders import default_weight_loader
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
    # a user's own loader may not report itself; count it as loaded anyway (experts by (expert_id, shard_id);
    # an all-experts tensor, expert_id=None, is left to its loader, which alone knows how many experts it held)
    if 'expert_id' not in kwargs:
        record_load(param, kwargs.get('shard_id'))
    elif kwargs['expert_id'] is not None:
        record_load(param, (kwargs['expert_id'], kwargs.get('shard_id')))


def expected_checkpoint_name(model, entry: str) -> str | None:
    """For 'x.qkv_proj.weight [shard 'k']', the checkpoint name the model's packed_modules_mapping implies (for an
    expert shard, 'x.experts.gate_up.weight [shard (3, 'gate')]', the one its expert_params_mapping names)."""
    if ' [shard ' not in entry:
        return None
    name, shard = entry.split(' [shard ', 1)
    for param_part, ckpt_part, expert_id, shard_id in getattr(model, 'expert_params_mapping', None) or ():
        if param_part in name and repr((expert_id, shard_id)) == shard.rstrip(']'):
            return name.replace(param_part, ckpt_part)
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


def describe_missing(model, missing) -> list:
    """One line per missing parameter or shard, each with the checkpoint tensor that should have filled it; the
    same shard of several stacked experts folds into one line per (parameter, shard) that lists the experts."""
    lines = []
    experts = {}    # (param, shard) -> [expert ids], in the order first seen
    for entry in missing:
        name, _, shard = entry.partition(' [shard ')
        expert_shard = _expert_shard(shard.rstrip(']'))
        hint = expected_checkpoint_name(model, entry)
        if expert_shard is None:
            lines.append(entry + (f" (checkpoint tensor '{hint}')" if hint else ''))
            continue
        expert_id, shard_id = expert_shard
        if (name, shard_id) not in experts:
            experts[(name, shard_id)] = []
            lines.append((name, shard_id, entry, hint))
        experts[(name, shard_id)].append(expert_id)
    out = []
    for line in lines:
        if isinstance(line, tuple):
            name, shard_id, entry, hint = line
            ids = experts[(name, shard_id)]
            if len(ids) == 1:
                line = entry + (f" (checkpoint tensor '{hint}')" if hint else '')
            else:
                line = (f'{name} [shard {shard_id!r} of {len(ids)} experts: {_ranges(ids)}]'
                        + (f" (the first: checkpoint tensor '{hint}')" if hint else ''))
        out.append(line)
    return out


def _expert_shard(shard: str):
    """(expert_id, shard_id) from a shard's repr "(3, 'gate')", else None."""
    if not shard.startswith('('):
        return None
    try:
        value = ast.literal_eval(shard)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int):
        return value
    return None


def _ranges(ids) -> str:
    """'0-3, 7' for [0, 1, 2, 3, 7]."""
    ids, parts, start = sorted(ids), [], None
    for i, e in enumerate(ids):
        if start is None:
            start = e
        if i + 1 == len(ids) or ids[i + 1] != e + 1:
            parts.append(str(start) if start == e else f'{start}-{e}')
            start = None
    return ', '.join(parts)


def load_model_weights(model: torch.nn.Module, model_path: str = None,
                       weights: Iterable[tuple[str, torch.Tensor]] | None = None, strict: bool = True):
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
        lines = [f'  {line}' for line in describe_missing(model, missing)]
        raise WeightLoadError(f'{len(missing)} parameter(s) were never loaded from the checkpoint '
                              f"{model_path or ''}:\n" + '\n'.join(lines) +
                              '\nThe checkpoint lacks these tensors, or load_weights maps their names wrongly.')
    return tracker
