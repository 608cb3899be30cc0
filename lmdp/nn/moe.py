"""Mixture-of-experts layers under lmdeploy's names: `SoftmaxTopK` (the router's choice), `FusedMoE` built by
`build_fused_moe` (all experts' MLPs in two stacked parameters, run by one fused op), and `SharedExpertGate`
(Qwen2-MoE's sigmoid gate on its always-on shared expert).

A sparse MoE block reads as the math::

    router_logits = self.gate(x)                                    # build_rowwise_linear(hidden, E, is_tp=False)
    topk_weights, topk_ids = self.softmax_topk(router_logits)       # SoftmaxTopK(top_k)
    out = self.experts(x, topk_weights, topk_ids)                   # build_fused_moe(hidden, ffn, E, top_k, ...)

Checkpoints store each expert's `gate_proj`, `up_proj` and `down_proj` apart; they load into the stacked
parameters through `load_weight(param, tensor, expert_id=e, shard_id='gate' | 'up' | 'down')`, and coverage is
tracked per (expert, shard). transformers 5's own layout (all experts in one 3-D tensor: `gate_up_proj`
`[E, 2I, H]`, `down_proj` `[E, H, I]`) loads with `expert_id=None` and shard 'gate_up' or 'down'.
"""
import operator
from collections.abc import Sequence

import torch
from torch import nn

from .. import kernels
from ..distributed import all_reduce as _all_reduce, get_tp_world_rank
from ..errors import ConfigError, WeightLoadError
from ..kernels.quant import FP8_DTYPE, FP8_GROUP
from ..quant_config import parse_quant_config
from ..weight_loader.loaders import check_shape, set_weight_loader, split_for_rank
from ..weight_loader.tracker import record_load
from .linear import ColwiseParallelLinear, check_quant_config
from .quant_linear import keep_dtype

# transformers' `hidden_act` names -> the gated activations the fused op computes
_ACTS = {'silu': 'silu', 'swish': 'silu', 'gelu': 'gelu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh',
         'gelu_tanh': 'gelu_tanh'}


def moe_act(hidden_act: str) -> str:
    """The fused op's name for a config's `hidden_act`."""
    if hidden_act not in _ACTS:
        raise ValueError(f'mixture of experts: no fused gated activation for hidden_act={hidden_act!r}; '
                         f'supported: {sorted(_ACTS)}')
    return _ACTS[hidden_act]


class SoftmaxTopK(nn.Module):
    """`forward(router_logits [..., E])` -> `(topk_weights float32 [T, k], topk_ids int64 [T, k])`: the k most
    probable experts of each token under a float32 softmax, largest first, not renormalised (`FusedMoE`'s
    `renormalize` does that)."""

    def __init__(self, top_k: int, dim: int = -1, n_groups: int = -1):
        super().__init__()
        if dim not in (-1, 1):
            raise ValueError(f'SoftmaxTopK: dim must be the experts dimension (-1), got {dim}')
        if n_groups not in (-1, 0, 1):
            raise NotImplementedError(f'SoftmaxTopK: group-limited routing (n_groups={n_groups}, DeepSeek-V2/V3) '
                                      'is not supported yet')
        self.top_k = top_k

    def forward(self, router_logits: torch.Tensor):
        return kernels.softmax_topk(router_logits.reshape(-1, router_logits.size(-1)), self.top_k)

    def extra_repr(self):
        return f'top_k={self.top_k}'


class LinearWeights(nn.Module):
    """One stacked weight of every expert, `[E, out, in]`: 'gate_up' (gate rows, then up rows) or 'down'.

    Under tensor parallelism each rank keeps its slice of the intermediate size: rows of gate and of up, columns
    of down."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, weight_type: str, dtype=None,
                 device=None, tp=(1, 0), fp8: bool = False):
        super().__init__()
        if weight_type not in ('gate_up', 'down'):
            raise ValueError(f"LinearWeights: weight_type must be 'gate_up' or 'down', got {weight_type!r}")
        self.num_experts, self.weight_type, self.fp8 = num_experts, weight_type, fp8
        self.tp_world, self.tp_rank = tp
        self.shard_names = ('gate', 'up') if weight_type == 'gate_up' else ('down', )
        shards = [(e, s) for e in range(num_experts) for s in self.shard_names]
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features,
                                               dtype=FP8_DTYPE if fp8 else dtype, device=device), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader, shards=shards)
        if fp8:
            # FP8 experts keep one scale per output row and 128 inputs (the checkpoint's 128-row blocks spread over
            # their rows): gate and up stack, and ranks split, at any row without cutting a block's scale
            if tp[0] > 1 and weight_type == 'down' and in_features % FP8_GROUP:
                raise ConfigError(f'FP8 experts: each of {tp[0]} tensor-parallel ranks keeps {in_features} '
                                  f'intermediate features, which cut through the 128-wide scale blocks of down_proj; '
                                  'use a tensor-parallel size that leaves each rank a multiple of 128')
            keep_dtype(self.weight)
            self.weight_scale_inv = keep_dtype(nn.Parameter(
                torch.empty(num_experts, out_features, -(-in_features // FP8_GROUP), dtype=torch.float32,
                            device=device), requires_grad=False))
            set_weight_loader(self.weight_scale_inv, self.weight_loader, shards=shards)

    def _expert(self, param, expert_id) -> int:
        try:
            expert_id = operator.index(expert_id)
        except TypeError:
            pass
        if not isinstance(expert_id, int) or not 0 <= expert_id < self.num_experts:
            raise WeightLoadError(f'{_describe(param)}: expert_id {expert_id!r} is not one of its '
                                  f'{self.num_experts} experts (0..{self.num_experts - 1})')
        return expert_id

    def _local(self, loaded: torch.Tensor, shard: str, expert_dims: int) -> torch.Tensor:
        """This rank's slice of one projection (`expert_dims` leading expert dimensions)."""
        dim = expert_dims + (1 if shard == 'down' else 0)
        return split_for_rank(loaded, dim, self.tp_world, self.tp_rank, f'expert {shard}_proj')

    def _scale_rows(self, param, loaded: torch.Tensor, shard: str, expert_dims: int) -> torch.Tensor:
        """A checkpoint's block scales `[..., ceil(rows / 128), ceil(in / 128)]` spread over their rows (the weight
        rows one projection has in the checkpoint), ready to be split and copied as the weight is."""
        if shard == 'down':
            rows = self.weight.size(1)
        else:
            rows = self.weight.size(1) // 2 * self.tp_world
        if loaded.dim() != expert_dims + 2 or loaded.size(-2) != -(-rows // FP8_GROUP):
            raise WeightLoadError(f'{_describe(param)}: {shard} block scales of shape {tuple(loaded.shape)} do not fit '
                                  f'{rows} weight rows in blocks of {FP8_GROUP}')
        return loaded.float().repeat_interleave(FP8_GROUP, dim=-2).narrow(-2, 0, rows)

    def _copy(self, param, target: torch.Tensor, loaded: torch.Tensor, label):
        if param.dtype == FP8_DTYPE and loaded.dtype != FP8_DTYPE:
            raise WeightLoadError(f'{_describe(param)} holds FP8 experts but the checkpoint tensor for {label!r} is '
                                  f'{loaded.dtype}: the checkpoint did not quantise its experts. List them in '
                                  'quantization_config.modules_to_not_convert, or quantise them')
        check_shape(param, target.shape, loaded, label)
        with torch.no_grad():
            target.copy_(loaded.to(param.dtype))

    def weight_loader(self, param, loaded_weight: torch.Tensor, expert_id: int | None = None,
                      shard_id: str = None):
        shards = self.shard_names + (('gate_up', ) if self.weight_type == 'gate_up' else ())
        if shard_id not in shards:
            raise WeightLoadError(f'{_describe(param)}: unknown shard {shard_id!r}; this stacked expert weight '
                                  f'takes {list(shards)}')
        half = param.size(1) // 2
        scales = param is getattr(self, 'weight_scale_inv', None)
        if expert_id is None:     # every expert at once: a [E, ...] tensor
            if self.fp8:
                raise WeightLoadError(f'{_describe(param)}: FP8 experts load from per-expert checkpoint tensors '
                                      f'(experts.N.<proj>.weight and .weight_scale_inv); this checkpoint stacks every '
                                      f"expert in one {shard_id!r} tensor, which lmdp's FP8 loader does not cut")
            parts = [('gate', 0), ('up', 1)] if shard_id == 'gate_up' else [(shard_id, None)]
            for name, index in parts:
                loaded = loaded_weight if index is None else _half(param, loaded_weight, index)
                target = param if name == 'down' else param.narrow(1, half * ('gate', 'up').index(name), half)
                self._copy(param, target, self._local(loaded, name, 1), name)
                for e in range(self.num_experts):
                    record_load(param, (e, name))
            return
        e = self._expert(param, expert_id)
        if shard_id == 'gate_up':
            raise WeightLoadError(f"{_describe(param)}: shard 'gate_up' holds every expert; load it with "
                                  "expert_id=None, or load one expert's 'gate' and 'up' apart")
        target = param[e] if shard_id == 'down' else param[e].narrow(0, half * ('gate', 'up').index(shard_id), half)
        if scales:
            loaded_weight = self._scale_rows(param, loaded_weight, shard_id, 0)
        self._copy(param, target, self._local(loaded_weight, shard_id, 0), (e, shard_id))
        record_load(param, (e, shard_id))

    def extra_repr(self):
        return f'experts={self.num_experts}, weight_type={self.weight_type!r}, shape={tuple(self.weight.shape)}'


def _half(param, loaded: torch.Tensor, index: int) -> torch.Tensor:
    """Gate (0) or up (1) of an all-experts `[E, 2I, H]` tensor."""
    if loaded.dim() != 3 or loaded.size(1) % 2:
        raise WeightLoadError(f"{_describe(param)}: an all-experts gate_up tensor must be [experts, 2 x "
                              f"intermediate, hidden], got shape {tuple(loaded.shape)}")
    return loaded.chunk(2, dim=1)[index]


def _describe(param) -> str:
    from ..weight_loader.tracker import describe_param
    return describe_param(param)


class FusedMoE(nn.Module):
    """All experts of a layer: `forward(x [..., H], topk_weights [T, k], topk_ids [T, k])` -> `[..., H]`.

    `gate_up.weight` is `[E, 2 * ffn_dim, H]`, `down.weight` `[E, H, ffn_dim]` (per rank under tensor
    parallelism, ffn_dim split; the partial sums are all-reduced unless `all_reduce=False`, for a block that
    adds a shared expert first and reduces once)."""

    def __init__(self, hidden_dim: int, ffn_dim: int, num_experts: int, top_k: int, renormalize: bool = False,
                 dtype=None, device=None, all_reduce: bool = True, is_tp: bool = True, act: str = 'silu',
                 fp8: bool = False):
        super().__init__()
        world, rank = get_tp_world_rank() if is_tp else (1, 0)
        if ffn_dim % world:
            raise ConfigError(f'FusedMoE: ffn_dim ({ffn_dim}) does not split evenly over {world} tensor-parallel '
                              'ranks')
        if act not in _ACTS.values():
            act = moe_act(act)
        self.hidden_dim, self.ffn_dim, self.num_experts, self.top_k = hidden_dim, ffn_dim // world, num_experts, top_k
        self.renormalize, self.act = renormalize, act
        self.all_reduce = all_reduce and world > 1
        self.fp8 = fp8
        self.gate_up = LinearWeights(num_experts, hidden_dim, 2 * self.ffn_dim, 'gate_up', dtype, device, (world, rank),
                                     fp8)
        self.down = LinearWeights(num_experts, self.ffn_dim, hidden_dim, 'down', dtype, device, (world, rank), fp8)

    def forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor):
        x = hidden_states.reshape(-1, hidden_states.size(-1))
        if topk_ids.size(-1) != self.top_k:
            raise ValueError(f'FusedMoE was built for top_k={self.top_k} but got {topk_ids.size(-1)} experts per '
                             'token; build SoftmaxTopK and the experts with the same top_k')
        topk_weights, topk_ids = topk_weights.reshape(-1, self.top_k), topk_ids.reshape(-1, self.top_k)
        if self.fp8:
            out = kernels.fused_moe_fp8(x, self.gate_up.weight, self.gate_up.weight_scale_inv, self.down.weight,
                                        self.down.weight_scale_inv, topk_weights, topk_ids, self.renormalize, self.act)
        else:
            out = kernels.fused_moe(x, self.gate_up.weight, self.down.weight, topk_weights, topk_ids, self.renormalize,
                                    self.act)
        if self.all_reduce:
            out = _all_reduce(out)
        return out.reshape(hidden_states.shape)

    def extra_repr(self):
        return (f'hidden={self.hidden_dim}, ffn={self.ffn_dim}, experts={self.num_experts}, top_k={self.top_k}, '
                f'renormalize={self.renormalize}, act={self.act!r}')


def build_fused_moe(hidden_dim: int, ffn_dim: int, num_experts: int, top_k: int, renormalize: bool = False,
                    dtype=None, device=None, quant_config=None, all_reduce: bool = True, enable_ep: bool = False,
                    layer_idx: int = 0, act_func=None, bias: bool = False, prefix: str = '', is_tp: bool = True,
                    act: str | None = None) -> FusedMoE:
    """The experts of one MoE layer (lmdeploy's builder). `act` (or lmdeploy's `act_func`, given as a
    `hidden_act` name) picks the gated activation, silu by default; `layer_idx` and `prefix` are accepted for
    lmdeploy's signature and unused. Under an FP8 `quant_config` the experts hold FP8 weights with block scales and
    multiply unquantised activations (W8A16); under AWQ they stay unquantised (lmdp has no 4-bit experts kernel:
    `lmdp quantize --awq` leaves them so, and a checkpoint with 4-bit experts is refused at preflight)."""
    check_quant_config(quant_config)
    scheme = parse_quant_config(quant_config)
    fp8 = scheme is not None and scheme.method == 'fp8' and not scheme.skips(prefix)
    if enable_ep:
        raise NotImplementedError('build_fused_moe: expert parallelism (enable_ep=True) is not supported; experts '
                                  'split their intermediate size over tensor-parallel ranks instead')
    if bias:
        raise NotImplementedError('build_fused_moe: experts with biases are not supported yet')
    if act_func is not None and act is None:
        if not isinstance(act_func, str):
            raise TypeError('build_fused_moe: act_func must be a hidden_act name (e.g. "silu"); lmdp fuses the '
                            'activation into the experts kernel and cannot take a callable')
        act = act_func
    return FusedMoE(hidden_dim, ffn_dim, num_experts, top_k, renormalize, dtype, device, all_reduce, is_tp,
                    moe_act(act or 'silu'), fp8)


class SharedExpertGate(ColwiseParallelLinear):
    """Qwen2-MoE's gate on its shared expert: `forward(x, shared_out)` -> `sigmoid(x @ w^T) * shared_out`, one
    scalar per token. Its weight `[1, hidden]` is replicated on every rank (a checkpoint's
    `shared_expert_gate.weight`)."""

    def __init__(self, hidden_size: int, dtype=None, device=None):
        super().__init__(hidden_size, 1, bias=False, dtype=dtype, device=device, is_tp=False)

    def forward(self, x: torch.Tensor, shared_out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(super().forward(x)) * shared_out


def build_shared_expert_gate(hidden_size: int, dtype=None, device=None, quant_config=None) -> SharedExpertGate:
    """`SharedExpertGate`; the gate is never quantised (one row)."""
    return SharedExpertGate(hidden_size, dtype, device)


def expert_params_mapping(num_experts: int, param_prefix: str = '.experts',
                          checkpoint_names: Sequence[str] = ('gate_proj', 'up_proj', 'down_proj'),
                          checkpoint_prefix: str | None = None):
    """`(param fragment, checkpoint fragment, expert_id, shard_id)` for every expert's three projections, as
    lmdeploy's ports build it: `('.experts.gate_up', '.experts.3.gate_proj', 3, 'gate')`. Mixtral's checkpoints
    name them `('w1', 'w3', 'w2')` under another block name (`checkpoint_prefix='.block_sparse_moe.experts'`)."""
    gate, up, down = checkpoint_names
    ckpt = param_prefix if checkpoint_prefix is None else checkpoint_prefix
    out = []
    for e in range(num_experts):
        out += [(f'{param_prefix}.gate_up', f'{ckpt}.{e}.{gate}', e, 'gate'),
                (f'{param_prefix}.gate_up', f'{ckpt}.{e}.{up}', e, 'up'),
                (f'{param_prefix}.down', f'{ckpt}.{e}.{down}', e, 'down')]
    return out
