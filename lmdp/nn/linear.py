"""Linear layers that know how they split under tensor parallelism and how checkpoint tensors land in them.

Names follow lmdeploy: a *colwise* linear splits its output features across ranks (q/k/v, gate/up); a *rowwise*
linear splits its input features and sums the partial results (o_proj, down_proj). `is_tp=False` keeps a layer
whole on every rank. A builder given a `quant_config` (a checkpoint's `quantization_config`: FP8 block-scaled or
AWQ) gives its layer a quant method (`lmdp.nn.quant_linear`) that holds the quantised parameters in place of
`weight`, loads them, and multiplies; the layer tells it which rows and columns this rank keeps
(`quant_parts`, `quant_in_cols`), so scales shard with their weights.
"""
from collections.abc import Sequence

import torch
from torch import nn

from .. import kernels
from ..distributed import all_reduce, get_tp_world_rank, kv_heads_per_rank
from ..errors import ConfigError, WeightLoadError
from ..weight_loader.loaders import check_shape, default_weight_loader, set_weight_loader, split_for_rank
from ..weight_loader.tracker import describe_param, record_load
from .quant_linear import linear_quant_method


def check_quant_config(quant_config):
    """Refuse quantisation schemes lmdp can't load, before any weight is read (ConfigError naming the setting)."""
    linear_quant_method(quant_config)


def _quantized(layer, quant_method, dtype=None, device=None):
    """The layer with its quant method's parameters, made once the layer knows its tensor-parallel split."""
    if quant_method is not None:
        quant_method.create_weights(layer, dtype, device)
    return layer


def _tp(is_tp: bool):
    world, rank = get_tp_world_rank()
    return (world, rank) if is_tp else (1, 0)


def _divide(total: int, world: int, what: str) -> int:
    if total % world:
        raise ConfigError(f'{what} ({total}) does not split evenly over {world} tensor-parallel ranks')
    return total // world


class LinearBase(nn.Module):
    """`y = x W^T + b` with W `[out_local, in_local]`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=None, device=None, quant_method=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant_method = quant_method       # None: `weight` is the plain matrix; else the method's parameters
        if quant_method is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                       requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias, act: str | None = None) -> torch.Tensor:
        """x W^T + bias (of `act(gate) * up` for a fused `[gate | up]` x when `act` is given)."""
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, bias, act)
        # decode-sized inputs on CUDA take lmdp's GEMV kernel, everything else F.linear (kernels.dispatch)
        if act is None:
            return kernels.linear(x, self.weight, bias)
        return kernels.act_and_mul_linear(x, self.weight, bias, act)

    def quant_parts(self):
        """(shard id, rows of its checkpoint tensor, the rows of it this rank keeps) per projection, in output
        order: where a quant method cuts quantised tensors (block scales, packed columns) for this rank."""
        return [(None, self.out_features, torch.arange(self.out_features))]

    def quant_in_cols(self):
        """(the input columns this rank keeps, the checkpoint's in_features)."""
        return torch.arange(self.in_features), self.in_features

    def extra_repr(self):
        return f'in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}'


class ColwiseParallelLinear(LinearBase):

    def __init__(self, in_features, out_features, bias, dtype=None, device=None, is_tp=False, quant_method=None):
        self.tp_world, self.tp_rank = _tp(is_tp)
        super().__init__(in_features, _divide(out_features, self.tp_world, 'out_features'), bias, dtype, device,
                         quant_method)
        for p in self.parameters():
            set_weight_loader(p, self.weight_loader)

    def weight_loader(self, param, loaded_weight):
        default_weight_loader(param, split_for_rank(loaded_weight, 0, self.tp_world, self.tp_rank, 'colwise linear'))

    def quant_parts(self):
        total = self.out_features * self.tp_world
        return [(None, total, split_for_rank(torch.arange(total), 0, self.tp_world, self.tp_rank, 'colwise linear'))]


class RowwiseParallelLinear(LinearBase):

    def __init__(self, in_features, out_features, bias, dtype=None, device=None, is_tp=False, all_reduce=True,
                 quant_method=None):
        self.tp_world, self.tp_rank = _tp(is_tp)
        super().__init__(_divide(in_features, self.tp_world, 'in_features'), out_features, bias, dtype, device,
                         quant_method)
        self.all_reduce = all_reduce and self.tp_world > 1
        for p in self.parameters():
            set_weight_loader(p, self.weight_loader)

    def weight_loader(self, param, loaded_weight):
        if param is getattr(self, 'weight', None):
            loaded_weight = split_for_rank(loaded_weight, 1, self.tp_world, self.tp_rank, 'rowwise linear')
        default_weight_loader(param, loaded_weight)

    def quant_in_cols(self):
        total = self.in_features * self.tp_world
        return split_for_rank(torch.arange(total), 0, self.tp_world, self.tp_rank, 'rowwise linear'), total

    def forward(self, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
        """`act` ('silu', 'gelu', 'gelu_tanh'): x is a fused `[gate | up]` projection and this layer's input is
        `act(gate) * up`, computed by the kernel as it reads x (the MLP's activation without a launch of its own)."""
        # under tensor parallelism the bias is added once, after the partial products are summed
        bias = None if self.all_reduce else self.bias
        y = self.matmul(x, bias, act)
        if not self.all_reduce:
            return y
        return all_reduce(y) + (self.bias if self.bias is not None else 0)


class MergedColwiseLinear(LinearBase):
    """Several colwise projections of the same input stacked in one matrix (gate/up → gate_up_proj).

    Its loader takes `shard_id`: the index of the projection, or its name from `out_names`; without one the
    checkpoint tensor is taken to hold every projection already stacked in this layer's order (a fused
    checkpoint, such as Phi-3's `gate_up_proj`) and is cut by the layer's own sizes.
    """

    def __init__(self, in_features, all_out_features: Sequence[int], bias, dtype=None, device=None, is_tp=True,
                 out_names: Sequence[str] | None = None, quant_method=None):
        self.tp_world, self.tp_rank = _tp(is_tp)
        self.local_out = [_divide(o, self.tp_world, 'out_features') for o in all_out_features]
        super().__init__(in_features, sum(self.local_out), bias, dtype, device, quant_method)
        self.out_names = list(out_names) if out_names is not None else list(range(len(all_out_features)))
        # rows of each projection in a checkpoint tensor that holds them all, stacked (e.g. Phi-3's gate_up_proj)
        self.checkpoint_out = list(all_out_features)
        for p in self.parameters():
            set_weight_loader(p, self.weight_loader, shards=self.out_names)

    def shard_index(self, shard_id) -> int:
        if shard_id in self.out_names:
            return self.out_names.index(shard_id)
        if isinstance(shard_id, int) and 0 <= shard_id < len(self.local_out):
            return shard_id
        raise WeightLoadError(f'unknown shard {shard_id!r} for a merged linear with shards {self.out_names}')

    def local_shard(self, param, loaded_weight: torch.Tensor, idx: int) -> torch.Tensor:
        """This rank's rows of projection `idx`."""
        return split_for_rank(loaded_weight, 0, self.tp_world, self.tp_rank, 'merged linear')

    def weight_loader(self, param, loaded_weight, shard_id=None):
        if shard_id is None:
            return self.load_fused(param, loaded_weight)
        idx = self.shard_index(shard_id)
        offset, size = sum(self.local_out[:idx]), self.local_out[idx]
        loaded_weight = self.local_shard(param, loaded_weight, idx)
        target = param.narrow(0, offset, size)
        check_shape(param, target.shape, loaded_weight, self.out_names[idx])
        with torch.no_grad():
            target.copy_(loaded_weight.to(param.dtype))
        record_load(param, self.out_names[idx])

    def load_fused(self, param, loaded_weight: torch.Tensor):
        """Load a checkpoint tensor holding every projection stacked along dim 0, each at its full (unsplit) size:
        it is cut into the projections, and each goes through the per-shard loader (so each rank keeps its slice)."""
        sizes = self.checkpoint_out
        if loaded_weight.dim() < 1 or loaded_weight.size(0) != sum(sizes):
            parts = ' + '.join(f'{n!r} {s}' for n, s in zip(self.out_names, sizes))
            raise WeightLoadError(f'{describe_param(param)} stacks {len(sizes)} projections; a fused checkpoint '
                                  f'tensor must hold them all along dim 0 ({parts} = {sum(sizes)} rows), but it has '
                                  f'shape {tuple(loaded_weight.shape)}. Pass shard_id= to load one projection.')
        for name, part in zip(self.out_names, loaded_weight.split(sizes, dim=0)):
            self.weight_loader(param, part, shard_id=name)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stacked outputs, one view per projection."""
        return list(x.split(self.local_out, dim=-1))

    def quant_parts(self):
        return [(name, rows, self.local_shard(None, torch.arange(rows), i))
                for i, (name, rows) in enumerate(zip(self.out_names, self.checkpoint_out))]


class QKVParallelLinear(MergedColwiseLinear):
    """q, k and v projections in one matrix; shards 'q', 'k', 'v', or a fused checkpoint qkv (no shard_id).

    Under tensor parallelism the query heads split across ranks; key/value heads split too, or are replicated
    when there are fewer of them than ranks.
    """

    def __init__(self, in_features, num_q_heads, num_kv_heads, head_size, head_size_v=None, bias=False,
                 dtype=None, device=None, is_tp=True, num_replicate_kv_heads=1, quant_method=None):
        world, rank = _tp(is_tp)
        head_size_v = head_size if head_size_v is None else head_size_v
        self.num_q_heads = _divide(num_q_heads, world, 'num_attention_heads')
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads * num_replicate_kv_heads, world)
        self.head_size, self.head_size_v = head_size, head_size_v
        self.total_heads = (num_q_heads, num_kv_heads, num_kv_heads)
        self.num_replicate_kv_heads = num_replicate_kv_heads
        # built unsplit: this class picks each rank's heads itself in local_shard
        super().__init__(in_features, [self.num_q_heads * head_size, self.num_kv_heads * head_size,
                                       self.num_kv_heads * head_size_v], bias, dtype, device, is_tp=False,
                         out_names=['q', 'k', 'v'], quant_method=quant_method)
        self.tp_world, self.tp_rank = world, rank
        # a fused checkpoint qkv holds every head once (before any replication): q, then k, then v
        self.checkpoint_out = [num_q_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size_v]

    def local_shard(self, param, loaded_weight, idx):
        head = self.head_size_v if idx == 2 else self.head_size
        rows = self.total_heads[idx] * head
        if loaded_weight.size(0) != rows:
            check_shape(param, (rows, *loaded_weight.shape[1:]), loaded_weight, self.out_names[idx])
        heads = loaded_weight.unflatten(0, (-1, head))
        if idx > 0 and self.num_replicate_kv_heads > 1:
            heads = heads.repeat_interleave(self.num_replicate_kv_heads, 0)
        local = self.num_q_heads if idx == 0 else self.num_kv_heads
        # fewer kv heads than ranks: neighbouring ranks share one kv head
        shared = heads.size(0) < self.tp_world
        start = self.tp_rank * heads.size(0) // self.tp_world if shared else self.tp_rank * local
        return heads.narrow(0, start, local).flatten(0, 1)

    def split_qkv(self, x: torch.Tensor):
        """q `[T, Hq, D]`, k `[T, Hk, D]`, v `[T, Hk, Dv]` as views of the fused output `[T, ...]`."""
        q, k, v = self.split(x)
        return (q.unflatten(-1, (self.num_q_heads, self.head_size)),
                k.unflatten(-1, (self.num_kv_heads, self.head_size)),
                v.unflatten(-1, (self.num_kv_heads, self.head_size_v)))


def _check_lmdeploy_options(what: str, is_tp: bool, tp_align_size: int = 1):
    """lmdeploy's builders take options for features lmdp has no use for (data parallelism, per-layer TP groups,
    quantisation prefixes); they are accepted so its ports build unchanged. One would change the result here."""
    if tp_align_size != 1 and is_tp and get_tp_world_rank()[0] > 1:
        raise NotImplementedError(f'{what}: tp_align_size={tp_align_size} (aligned uneven tensor-parallel splits) is '
                                  'not supported; use a tensor-parallel size that divides the layer evenly')


# The builders take lmdeploy's keyword arguments by name and nothing else: a misspelt or foreign keyword is a
# TypeError naming it, not a silently ignored option. `prefix`, `layer_type`, `dp_gather`, `dp_disable_tp` and
# `check_dist` select lmdeploy features (per-layer quantisation, attention/MLP TP groups, data parallelism) that
# lmdp does not have; they change nothing here.

def build_colwise_linear(in_features: int, out_features: int, bias: bool, dtype=None, device=None,
                         is_tp: bool = False, tp_align_size: int = 1, quant_config=None, dp_disable_tp: bool = False,
                         dp_gather: bool = False, check_dist: bool = True, layer_type: str = 'attn',
                         prefix: str = '') -> ColwiseParallelLinear:
    """A linear layer whose output features split across tensor-parallel ranks."""
    quant = linear_quant_method(quant_config, prefix)
    _check_lmdeploy_options('build_colwise_linear', is_tp, tp_align_size)
    return _quantized(ColwiseParallelLinear(in_features, out_features, bias, dtype, device, is_tp, quant), quant,
                      dtype, device)


def build_rowwise_linear(in_features: int, out_features: int, bias: bool, dtype=None, device=None,
                         is_tp: bool = False, tp_align_size: int = 1, quant_config=None, all_reduce: bool = True,
                         dp_disable_tp: bool = False, check_dist: bool = True, layer_type: str = 'attn',
                         prefix: str = '') -> RowwiseParallelLinear:
    """A linear layer whose input features split across ranks; the partial results are summed (`all_reduce`)."""
    quant = linear_quant_method(quant_config, prefix)
    _check_lmdeploy_options('build_rowwise_linear', is_tp, tp_align_size)
    return _quantized(RowwiseParallelLinear(in_features, out_features, bias, dtype, device, is_tp, all_reduce, quant),
                      quant, dtype, device)


def build_merged_colwise_linear(in_features: int, all_out_features: Sequence[int], bias: bool, dtype=None,
                                device=None, quant_config=None, is_tp: bool = True,
                                out_names: Sequence[int | str] | None = None, dp_gather: bool = False,
                                check_dist: bool = True, layer_type: str = 'attn',
                                prefix: str = '') -> MergedColwiseLinear:
    """Several colwise projections of one input in one matrix (loaded per `shard_id`, or fused)."""
    quant = linear_quant_method(quant_config, prefix)
    return _quantized(MergedColwiseLinear(in_features, all_out_features, bias, dtype, device, is_tp, out_names, quant),
                      quant, dtype, device)


def build_qkv_proj(in_features: int, num_q_heads: int, num_kv_heads: int, head_size: int,
                   head_size_v: int | None = None, bias: bool = False, quant_config=None, dtype=None, device=None,
                   is_tp: bool = True, num_replicate_kv_heads: int = 1, prefix: str = '') -> QKVParallelLinear:
    """q, k and v in one matrix, split by heads across ranks (loaded per shard 'q'/'k'/'v', or fused)."""
    quant = linear_quant_method(quant_config, prefix)
    return _quantized(QKVParallelLinear(in_features, num_q_heads, num_kv_heads, head_size, head_size_v, bias, dtype,
                                        device, is_tp, num_replicate_kv_heads, quant), quant, dtype, device)


# Role builders, as lmdeploy's ports call them: the attention output projection, and the MLP's gate/up and down
# projections. With one tensor-parallel group they are the row/colwise builders above.

def build_o_proj(in_features: int, out_features: int, bias: bool, dtype=None, device=None, is_tp: bool = False,
                 tp_align_size: int = 1, quant_config=None, all_reduce: bool = True,
                 prefix: str = '') -> RowwiseParallelLinear:
    """Attention's output projection (rowwise: heads in, hidden out)."""
    return build_rowwise_linear(in_features, out_features, bias, dtype=dtype, device=device, is_tp=is_tp,
                                tp_align_size=tp_align_size, quant_config=quant_config, all_reduce=all_reduce,
                                prefix=prefix)


def build_gateup_linear(in_features: int, all_out_features: Sequence[int], bias: bool, dtype=None, device=None,
                        quant_config=None, is_tp: bool = True, out_names: Sequence[int | str] | None = None,
                        dp_gather: bool = True, prefix: str = '') -> MergedColwiseLinear:
    """The MLP's gate and up projections in one matrix: shard 0 gate, shard 1 up."""
    return build_merged_colwise_linear(in_features, all_out_features, bias, dtype=dtype, device=device,
                                       quant_config=quant_config, is_tp=is_tp, out_names=out_names, prefix=prefix)


def build_down_linear(in_features: int, out_features: int, bias: bool, dtype=None, device=None, is_tp: bool = False,
                      tp_align_size: int = 1, quant_config=None, all_reduce: bool = True,
                      prefix: str = '') -> RowwiseParallelLinear:
    """The MLP's down projection (rowwise: intermediate in, hidden out)."""
    return build_rowwise_linear(in_features, out_features, bias, dtype=dtype, device=device, is_tp=is_tp,
                                tp_align_size=tp_align_size, quant_config=quant_config, all_reduce=all_reduce,
                                prefix=prefix)
