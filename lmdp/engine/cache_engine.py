"""The paged KV cache: per layer a (k_cache, v_cache) pair `[num_blocks, block_size, num_kv_heads, head_dim]`."""
from typing import List, Tuple

import torch

from ..config import ModelConfig


class CacheEngine:

    def __init__(self, model_config: ModelConfig, num_blocks: int, block_size: int = 64, device='cpu',
                 dtype: torch.dtype = None):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f'block_size must be a power of two, got {block_size}')
        self.num_blocks, self.block_size = num_blocks, block_size
        dtype = dtype or model_config.dtype
        kv_heads = model_config.num_key_value_heads
        self.kv_caches: List[Tuple[torch.Tensor, torch.Tensor]] = [
            (torch.zeros(num_blocks, block_size, kv_heads, model_config.k_head_dim, dtype=dtype, device=device),
             torch.zeros(num_blocks, block_size, kv_heads, model_config.v_head_dim, dtype=dtype, device=device))
            for _ in range(model_config.num_layers)
        ]

    @staticmethod
    def bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype = None) -> int:
        dtype = dtype or model_config.dtype
        per_token = model_config.num_key_value_heads * (model_config.k_head_dim + model_config.v_head_dim)
        return per_token * block_size * model_config.num_layers * torch.finfo(dtype).bits // 8
