"""Checkpoint tensors into a transformers model's parameters, through lmdp's loader.

A checkpoint is stored in its family's original layout; transformers' own loader renames some tensors (Mixtral's
`block_sparse_moe` is `mlp` in the modeling code) and merges others (one tensor per expert into one 3-D
parameter). Those rules are data in transformers (`get_model_conversion_mapping`); `CheckpointNames` reads them
and says where each checkpoint tensor lands, so the tensors stream through lmdp's `load_weight` -- one at a time,
with the coverage report -- instead of through `from_pretrained`. Merges use a `weight_loader` with one shard id
per (expert, part), so a missing expert is named by the coverage check like a missing q/k/v shard of a port.
"""
import logging
import re
from dataclasses import dataclass

import torch

from ..errors import WeightLoadError
from ..weight_loader.loaders import check_shape, set_weight_loader
from ..weight_loader.tracker import describe_param, record_load

logger = logging.getLogger('lmdp')


@dataclass(frozen=True)
class Merge:
    """How converters stack per-expert tensors: `parts` sources concatenated along `dim` (of one expert's
    slice) after the experts are stacked along dim 0."""
    parts: int
    dim: int


def _merge_of(converter) -> Merge | None:
    """The Merge a transformers WeightConverter performs, or None for operations lmdp does not replay."""
    ops = [type(op).__name__ for op in converter.operations]
    n = len(converter.source_patterns)
    if ops == ['MergeModulelist'] and n == 1 and converter.operations[0].dim == 0:
        return Merge(1, 0)
    if ops == ['MergeModulelist', 'Concatenate'] and converter.operations[0].dim == 0:
        # Concatenate's dim counts in the stacked tensor; within one expert's slice it is one less
        return Merge(n, converter.operations[1].dim - 1)
    return None


def _expert_regex(pattern: str) -> re.Pattern:
    # converter patterns write a layer-list index as '*'
    return re.compile(r'(\d+)'.join(pattern.split('*')))


class CheckpointNames:
    """Where each checkpoint tensor of a transformers model lands: (parameter name, shard id or None)."""

    def __init__(self, hf_model: torch.nn.Module, param_names):
        self.params = set(param_names)
        self.prefix = getattr(hf_model, 'base_model_prefix', '') or ''
        self.renamings, self.converters, self.unsupported = [], [], []
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming
            transforms = get_model_conversion_mapping(hf_model)
        except (ImportError, AttributeError, TypeError):
            transforms = []             # a transformers without conversion rules: names are the parameters' own
        for t in transforms or []:
            if isinstance(t, WeightConverter):
                merge = _merge_of(t)
                (self.converters if merge else self.unsupported).append((t, merge))
            elif isinstance(t, WeightRenaming):
                self.renamings.append(t)

    def _in_model(self, name: str) -> str | None:
        """The name as a parameter of the model, with the base-model prefix added or dropped if that is what it
        takes (checkpoints of a bare `XxxModel` lack it)."""
        if name in self.params:
            return name
        if self.prefix:
            if f'{self.prefix}.{name}' in self.params:
                return f'{self.prefix}.{name}'
            if name.startswith(self.prefix + '.') and name[len(self.prefix) + 1:] in self.params:
                return name[len(self.prefix) + 1:]
        return None

    def canonical(self, name: str) -> str:
        """The checkpoint name in the modeling code's naming (renamings applied, base-model prefix as the model
        has it), whether or not a parameter of that name exists now (a swapped module's may not)."""
        for renaming in self.renamings:
            name, _ = renaming.rename_source_key(name)
        if self.prefix and not name.startswith(self.prefix + '.') and \
                any(p.startswith(f'{self.prefix}.{name.split(".", 1)[0]}.') for p in self.params):
            name = f'{self.prefix}.{name}'
        return name

    def resolve(self, name: str) -> tuple[str, object] | None:
        """(parameter, shard id) for a checkpoint tensor; None when it lands nowhere."""
        direct = self._in_model(name)
        if direct is not None:
            return direct, None
        renamed = name
        for renaming in self.renamings:
            renamed, _ = renaming.rename_source_key(renamed)
        for converter, merge in self.converters:
            target, source = converter.rename_source_key(renamed)
            if source is None:
                continue
            found = _expert_regex(source).search(renamed)
            param = self._in_model(target)
            if found is None or param is None:
                return None
            return param, (int(found.group(1)), converter.source_patterns.index(source))
        for converter, _ in self.unsupported:
            _, source = converter.rename_source_key(renamed)
            if source is not None:
                logger.warning('checkpoint tensor %s needs transformers\' conversion %s, which lmdp\'s loader does not '
                               'replay; it is left unused', name, [type(op).__name__ for op in converter.operations])
                return None
        param = self._in_model(renamed)
        return (param, None) if param is not None else None

    def merges(self) -> dict[str, Merge]:
        """Per merged parameter name pattern: how its shards stack (for attaching loaders)."""
        return {converter.target_patterns[0]: merge for converter, merge in self.converters}


def merged_expert_loader(merge: Merge):
    """A weight_loader for a stacked expert parameter `[experts, ...]`: shard (e, j) is part j of expert e."""

    def loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor, shard_id=None):
        if shard_id is None:            # a checkpoint that already stores the stacked tensor
            check_shape(param, param.shape, loaded_weight)
            with torch.no_grad():
                param.copy_(loaded_weight.to(param.dtype))
            for s in getattr(param, 'lmdp_shards', ()):
                record_load(param, s)
            return
        expert, part = shard_id
        if not 0 <= expert < param.size(0):
            raise WeightLoadError(f'{describe_param(param)} holds {param.size(0)} experts; the checkpoint has expert '
                                  f'{expert}')
        dst = param[expert]
        width = dst.size(merge.dim) // merge.parts
        dst = dst.narrow(merge.dim, part * width, width)
        check_shape(param, dst.shape, loaded_weight, shard_id)
        with torch.no_grad():
            dst.copy_(loaded_weight.to(param.dtype))
        record_load(param, shard_id)

    return loader


def attach_merge_loaders(named_params: dict[str, torch.nn.Parameter], names: CheckpointNames) -> list[str]:
    """Give every stacked expert parameter its loader and shard list; returns their names."""
    done = []
    for pattern, merge in names.merges().items():
        suffix = pattern.strip('.')
        for name, param in named_params.items():
            if name.endswith(suffix) and param.dim() >= 2:
                shards = [(e, j) for e in range(param.size(0)) for j in range(merge.parts)]
                set_weight_loader(param, merged_expert_loader(merge), shards)
                done.append(name)
    return done
