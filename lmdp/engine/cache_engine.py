"""The paged KV cache: per layer a (k_cache, v_cache) pair `[num_blocks, block_size, num_kv_heads, head_dim]`."""
import logging
import os

import torch

from .. import envs
from ..config import ModelConfig
from ..distributed import get_tp_world_rank, kv_heads_per_rank

logger = logging.getLogger('lmdp')


class CacheEngine:

    def __init__(self, model_config: ModelConfig, num_blocks: int, block_size: int = 64, device='cpu',
                 dtype: torch.dtype = None):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f'block_size must be a power of two, got {block_size}')
        self.num_blocks, self.block_size = num_blocks, block_size
        dtype = dtype or model_config.dtype
        kv_heads = local_kv_heads(model_config)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.zeros(num_blocks, block_size, kv_heads, model_config.k_head_dim, dtype=dtype, device=device),
             torch.zeros(num_blocks, block_size, kv_heads, model_config.v_head_dim, dtype=dtype, device=device))
            for _ in range(model_config.num_layers)
        ]

    @staticmethod
    def bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype = None) -> int:
        dtype = dtype or model_config.dtype
        per_token = local_kv_heads(model_config) * (model_config.k_head_dim + model_config.v_head_dim)
        return per_token * block_size * model_config.num_layers * torch.finfo(dtype).bits // 8


def local_kv_heads(model_config: ModelConfig) -> int:
    """Key/value heads this rank's cache holds (its share under tensor parallelism)."""
    return kv_heads_per_rank(model_config.num_key_value_heads, get_tp_world_rank()[0])


def available_host_memory() -> int:
    """Bytes of RAM free now (Linux); 0 where it can't be read."""
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return 0


def plan_num_blocks(model_config: ModelConfig, block_size: int, device, num_gpu_blocks: int = 0,
                    cache_max_entry_count: float = 0.8, session_len: int = 4096, max_batch_size: int = 32,
                    dtype: torch.dtype = None) -> int:
    """How many blocks the KV pool gets, and why (logged).

    `num_gpu_blocks` wins when set. On CUDA the pool takes `cache_max_entry_count` of the memory free once the
    weights are loaded; the rest is left for activations. Elsewhere, room for `max_batch_size` sequences of
    `session_len` tokens, but never more than a quarter of the RAM free now.
    """
    device = torch.device(device)
    per_block = CacheEngine.bytes_per_block(model_config, block_size, dtype)
    if num_gpu_blocks > 0:
        num_blocks, why = num_gpu_blocks, 'num_gpu_blocks'
    elif device.type == 'cuda':
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        num_blocks = int(free * cache_max_entry_count) // per_block
        why = (f'{cache_max_entry_count:.0%} of {free / 2**30:.2f} GiB free after the weights '
               f'({total / 2**30:.2f} GiB card)')
        cap_gib = envs.LMDP_MAX_KV_POOL_GIB
        if cap_gib > 0 and num_blocks * per_block > cap_gib * 2**30:
            num_blocks, why = int(cap_gib * 2**30) // per_block, f'LMDP_MAX_KV_POOL_GIB={cap_gib:g}'
    else:
        num_blocks = -(-session_len // block_size) * max_batch_size
        why = f'{max_batch_size} sequences x session_len {session_len}'
        cap = available_host_memory() // 4 // per_block
        if 0 < cap < num_blocks:
            num_blocks, why = cap, f'a quarter of the {available_host_memory() / 2**30:.1f} GiB of free RAM'
    if num_blocks <= 0:
        raise RuntimeError(f'no room for a single KV-cache block ({per_block / 2**20:.1f} MiB each) on {device}; '
                           'free memory, lower block_size or set num_gpu_blocks')
    logger.info('KV cache: %d blocks x %d tokens = %.2f GiB (%s)', num_blocks, block_size,
                num_blocks * per_block / 2**30, why)
    return num_blocks
