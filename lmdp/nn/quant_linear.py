"""Quantised linear layers: a quant method object per layer, chosen by the builder from `quant_config`.

A method creates the layer's quantised parameters (in place of `weight`), loads checkpoint tensors into them, and
multiplies (`apply`). It asks the layer two things, so that quantised tensors shard exactly as the layer's
unquantised weight would under tensor parallelism, q/k/v head replication and fused checkpoints included:

- `layer.quant_parts()`: per projection `(shard id, rows of its checkpoint tensor, the rows of it this rank keeps)`
  in the order of the layer's outputs (one projection for a plain linear; q/k/v or gate/up for stacked ones);
- `layer.quant_in_cols()`: `(the input columns this rank keeps, the checkpoint's in_features)`.

From those rows and columns a method cuts block scales (FP8: a rank that keeps rows from the middle of a 128-row
block keeps that block's scales) and packed columns (AWQ: eight output features per int32).
"""
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..errors import ConfigError, WeightLoadError
from ..kernels.quant import AWQ_PACK, FP8_DTYPE, awq_unpack, pack_rows
from ..quant_config import QuantConfig, parse_quant_config
from ..weight_loader.loaders import check_shape, set_weight_loader
from ..weight_loader.tracker import describe_param, record_load


def select(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """`t.index_select(dim, index)`, a narrow view when the index is a contiguous range (1-byte floats included,
    which index_select does not take on every device)."""
    n = index.numel()
    if n and int(index[-1]) - int(index[0]) == n - 1 and (n == 1 or bool((index.diff() == 1).all())):
        return t.narrow(dim, int(index[0]), n)
    index = index.to(t.device)
    if t.is_floating_point() and t.element_size() == 1:
        return t.view(torch.uint8).index_select(dim, index).view(t.dtype)
    return t.index_select(dim, index)


def keep_dtype(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter whose dtype is part of its format: the model's dtype cast leaves it alone."""
    param.keep_dtype = True
    return param


@dataclass
class Rows:
    """Where one checkpoint tensor's rows land: `rows` of the tensor (this rank's, in order) go to the layer's
    local output rows `offset .. offset + len(rows)`; the tensor has `ckpt_rows` rows; `shards` are the load
    tracker's shard ids it fills."""
    rows: torch.Tensor
    offset: int
    ckpt_rows: int
    shards: list


def _blocks_whole(rows: torch.Tensor, ckpt_rows: int, block: int) -> bool:
    """Whether `rows` are whole blocks of `block` rows of a `ckpt_rows`-row tensor, in order (a tensor's last
    block may be partial)."""
    starts = rows[::block]
    if bool((starts % block).any()):
        return False
    whole = [torch.arange(int(s), min(int(s) + block, ckpt_rows)) for s in starts]
    return bool(torch.equal(torch.cat(whole), rows)) if whole else True


class QuantLinearMethod:
    """The common part of the methods: the layer's rows and columns, and which rows a checkpoint tensor fills."""

    def __init__(self, config: QuantConfig):
        self.config = config

    def create_weights(self, layer: nn.Module, dtype=None, device=None):
        self.parts = [(shard, int(ckpt), rows.long()) for shard, ckpt, rows in layer.quant_parts()]
        cols, self.ckpt_cols = layer.quant_in_cols()
        self.cols = cols.long()
        self.out_features = sum(r.numel() for _, _, r in self.parts)
        self.in_features = self.cols.numel()
        self.shard_ids = [shard for shard, _, _ in self.parts]
        self.layer_ref = layer.__class__.__name__
        if hasattr(layer, 'weight'):
            del layer.weight

    def register(self, layer: nn.Module, name: str, param: nn.Parameter, loader):
        setattr(layer, name, keep_dtype(param))
        shards = self.shard_ids if len(self.parts) > 1 else None
        set_weight_loader(param, lambda p, w, shard_id=None: loader(layer, p, w, shard_id), shards=shards)

    def rows_for(self, layer, param, shard_id) -> Rows:
        """The rows of the checkpoint tensor loaded with `shard_id` (None: the layer's one projection, or every
        projection fused in one tensor, as Phi-3 stores qkv_proj)."""
        if shard_id is None:
            rows, offset, ckpt_offset = [], 0, 0
            for _, ckpt, r in self.parts:
                rows.append(r + ckpt_offset)
                ckpt_offset += ckpt
            return Rows(torch.cat(rows), 0, ckpt_offset, [s for s in self.shard_ids] if len(self.parts) > 1 else [None])
        if len(self.parts) == 1:
            raise WeightLoadError(f'{describe_param(param)} is one projection; it takes no shard_id ({shard_id!r})')
        idx = layer.shard_index(shard_id)
        offset = sum(r.numel() for _, _, r in self.parts[:idx])
        _, ckpt, rows = self.parts[idx]
        return Rows(rows, offset, ckpt, [self.shard_ids[idx]])

    def record(self, param, where: Rows):
        for shard in where.shards:
            record_load(param, shard)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None, act: str | None = None):
        raise NotImplementedError


class Fp8BlockLinear(QuantLinearMethod):
    """FP8 codes `weight [N, K]` and float32 `weight_scale_inv` per 128x128 block (or per output row and 128
    columns, `scale_per_row`, when this layer's projections don't start on block boundaries: tiny models, odd
    tensor-parallel splits); the input is quantised per token group of 128 at run time."""

    def create_weights(self, layer, dtype=None, device=None):
        super().create_weights(layer, dtype, device)
        bn, bk = self.config.block
        k0, k = int(self.cols[0]), self.in_features
        if k0 % bk or (k % bk and k0 + k != self.ckpt_cols):
            raise ConfigError(f'{self.layer_ref}: this rank keeps input features {k0}..{k0 + k - 1} of '
                              f'{self.ckpt_cols}, which cut through FP8 scale blocks of {bk}; use a tensor-parallel '
                              f'size that splits in_features into multiples of {bk}')
        self.per_row = not self._aligned(bn)
        rows = self.out_features if self.per_row else -(-self.out_features // bn)
        self.register(layer, 'weight', nn.Parameter(torch.empty(self.out_features, k, dtype=FP8_DTYPE, device=device),
                                                    requires_grad=False), self.load_weight)
        self.register(layer, 'weight_scale_inv', nn.Parameter(torch.empty(rows, -(-k // bk), dtype=torch.float32,
                                                                           device=device), requires_grad=False),
                      self.load_scale)

    def _aligned(self, bn: int) -> bool:
        """Whether the scales can stay in 128-row blocks: every projection starts on a block boundary of the
        layer's output and of a fused checkpoint tensor, and keeps whole blocks of its checkpoint tensor."""
        offset = ckpt_offset = 0
        for i, (_, ckpt, rows) in enumerate(self.parts):
            if offset % bn or ckpt_offset % bn or not _blocks_whole(rows, ckpt, bn):
                return False
            if rows.numel() % bn and i != len(self.parts) - 1:
                return False
            offset += rows.numel()
            ckpt_offset += ckpt
        return True

    def load_weight(self, layer, param, loaded, shard_id=None):
        where = self.rows_for(layer, param, shard_id)
        if loaded.dtype != FP8_DTYPE:
            raise WeightLoadError(f'{describe_param(param)} is an FP8 layer but the checkpoint tensor is '
                                  f'{loaded.dtype}: the checkpoint did not quantise this layer. List it in '
                                  'quantization_config.modules_to_not_convert, or quantise it')
        check_shape(param, (where.ckpt_rows, self.ckpt_cols), loaded, shard_id)
        local = select(select(loaded, where.rows, 0), self.cols, 1)
        with torch.no_grad():
            param.narrow(0, where.offset, where.rows.numel()).copy_(local)
        self.record(param, where)

    def load_scale(self, layer, param, loaded, shard_id=None):
        where = self.rows_for(layer, param, shard_id)
        bn, bk = self.config.block
        check_shape(param, (-(-where.ckpt_rows // bn), -(-self.ckpt_cols // bk)), loaded, shard_id)
        cols = torch.arange(int(self.cols[0]) // bk, int(self.cols[0]) // bk + param.size(1))
        if self.per_row:
            rows, offset = where.rows // bn, where.offset
        else:
            rows, offset = where.rows[::bn] // bn, where.offset // bn
        local = select(select(loaded, rows, 0), cols, 1)
        with torch.no_grad():
            param.narrow(0, offset, rows.numel()).copy_(local.float())
        self.record(param, where)

    def apply(self, layer, x, bias, act=None):
        return kernels.fp8_block_linear(x, layer.weight, layer.weight_scale_inv, bias, act, self.per_row)


class AwqLinear(QuantLinearMethod):
    """4-bit codes with zero points per group of input features, kept in lmdp's layout (`lmdp.kernels.quant`):
    `qweight [N, K / 8]` int32, `scales [N, K / G]` float16, `qzeros [N, K / G]` uint8; loaded from (and named as)
    the checkpoint's AWQ GEMM tensors."""

    def create_weights(self, layer, dtype=None, device=None):
        super().create_weights(layer, dtype, device)
        g = self.config.group_size
        k0, k = int(self.cols[0]), self.in_features
        if k % g or k0 % g:
            raise ConfigError(f'{self.layer_ref}: {k} input features (from {k0}) are no whole AWQ groups of {g}; '
                              f'in_features must be a multiple of the group size on every tensor-parallel rank')
        for shard, ckpt, rows in self.parts:
            if rows.numel() % AWQ_PACK or not _blocks_whole(rows, ckpt, AWQ_PACK):
                raise ConfigError(f'{self.layer_ref}: the output features this rank keeps of projection {shard!r} are '
                                  f'not whole groups of {AWQ_PACK} (AWQ packs {AWQ_PACK} output features per int32)')
        n = self.out_features
        empty = lambda cols, dt: nn.Parameter(torch.empty(n, cols, dtype=dt, device=device),  # noqa: E731
                                              requires_grad=False)
        self.register(layer, 'qweight', empty(k // AWQ_PACK, torch.int32), self.load_qweight)
        self.register(layer, 'scales', empty(k // g, torch.float16), self.load_scales)
        self.register(layer, 'qzeros', empty(k // g, torch.uint8), self.load_qzeros)

    def _packed_cols(self, param, where: Rows) -> torch.Tensor:
        if where.ckpt_rows % AWQ_PACK or not _blocks_whole(where.rows, where.ckpt_rows, AWQ_PACK):
            raise WeightLoadError(f'{describe_param(param)}: the projections of this fused AWQ tensor do not start on '
                                  f'multiples of {AWQ_PACK} output features')
        return where.rows[::AWQ_PACK] // AWQ_PACK

    def _groups(self) -> torch.Tensor:
        g = self.config.group_size
        return torch.arange(int(self.cols[0]) // g, (int(self.cols[0]) + self.in_features) // g)

    def _store(self, param, where: Rows, local: torch.Tensor):
        with torch.no_grad():
            param.narrow(0, where.offset, where.rows.numel()).copy_(local)
        self.record(param, where)

    def _on_device(self, param, loaded):
        return loaded if param.device.type == 'meta' else loaded.to(param.device)

    def load_qweight(self, layer, param, loaded, shard_id=None):
        where = self.rows_for(layer, param, shard_id)
        if loaded.dtype != torch.int32:
            raise WeightLoadError(f'{describe_param(param)} is an AWQ layer but the checkpoint tensor is '
                                  f'{loaded.dtype}, not packed int32 codes')
        check_shape(param, (self.ckpt_cols, where.ckpt_rows // AWQ_PACK), loaded, shard_id)
        words = select(select(self._on_device(param, loaded), self._packed_cols(param, where), 1), self.cols, 0)
        self._store(param, where, pack_rows(awq_unpack(words).t()))

    def load_qzeros(self, layer, param, loaded, shard_id=None):
        where = self.rows_for(layer, param, shard_id)
        g = self.config.group_size
        check_shape(param, (self.ckpt_cols // g, where.ckpt_rows // AWQ_PACK), loaded, shard_id)
        words = select(select(self._on_device(param, loaded), self._packed_cols(param, where), 1), self._groups(), 0)
        self._store(param, where, awq_unpack(words).t())

    def load_scales(self, layer, param, loaded, shard_id=None):
        where = self.rows_for(layer, param, shard_id)
        check_shape(param, (self.ckpt_cols // self.config.group_size, where.ckpt_rows), loaded, shard_id)
        local = select(select(loaded, where.rows, 1), self._groups(), 0).t().to(torch.float16)
        if not bool(torch.isfinite(local).all()):
            raise WeightLoadError(f'{describe_param(param)}: AWQ scales overflow float16 (the checkpoint holds '
                                  f'{loaded.dtype} scales out of its range)')
        self._store(param, where, local)

    def apply(self, layer, x, bias, act=None):
        return kernels.awq_linear(x, layer.qweight, layer.scales, layer.qzeros, bias, act)


METHODS = {'fp8': Fp8BlockLinear, 'awq': AwqLinear}


def linear_quant_method(quant_config, prefix: str = '') -> QuantLinearMethod | None:
    """The method of a linear layer built with `quant_config` (None: unquantised, also for a layer the config's
    `modules_to_not_convert` names through `prefix`); ConfigError for a scheme lmdp can't run."""
    config = parse_quant_config(quant_config)
    if config is None or config.skips(prefix):
        return None
    return METHODS[config.method](config)
