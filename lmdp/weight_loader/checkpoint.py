"""Streaming a checkpoint's tensors, shard by shard, without holding the whole model in memory."""
import glob
import json
import os
from typing import Iterator, List, Optional, Tuple

import torch

from ..errors import WeightLoadError


def checkpoint_files(model_path: str) -> List[str]:
    """The weight files of a checkpoint folder: the shards an index names, or every *.safetensors file."""
    index = os.path.join(model_path, 'model.safetensors.index.json')
    if os.path.isfile(index):
        with open(index, encoding='utf-8') as f:
            weight_map = json.load(f).get('weight_map', {})
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(model_path, f))]
        if absent:
            raise WeightLoadError(f'model.safetensors.index.json in {model_path!r} names shard(s) that are not '
                                  f"there: {', '.join(absent)}; the download is incomplete")
        return [os.path.join(model_path, f) for f in files]
    files = sorted(glob.glob(os.path.join(model_path, '*.safetensors')))
    if files:
        return files
    bins = sorted(glob.glob(os.path.join(model_path, 'pytorch_model*.bin')))
    if bins:
        return bins
    raise WeightLoadError(f'{model_path!r} holds no weights (*.safetensors, model.safetensors.index.json or '
                          'pytorch_model*.bin)')


def iter_checkpoint(model_path: str, files: Optional[List[str]] = None,
                    device: str = 'cpu') -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor, one shard at a time."""
    for path in files if files is not None else checkpoint_files(model_path):
        if path.endswith('.bin'):
            state = torch.load(path, map_location=device, weights_only=True)
            yield from state.items()
            del state
            continue
        from safetensors import safe_open
        try:
            with safe_open(path, framework='pt', device=str(device)) as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (OSError, ValueError, RuntimeError) as e:
            if isinstance(e, WeightLoadError):
                raise
            raise WeightLoadError(f'could not read {path!r}: {e}; the file may be truncated or not safetensors') from e
