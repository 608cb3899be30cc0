"""How many KV blocks the pool gets, and the figure in the log."""
import logging

import torch

from lmdp.config import ModelConfig
from lmdp.engine.cache_engine import CacheEngine, plan_num_blocks

MC = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                 eos_token_id=2, head_dim=16, vocab_size=512, dtype=torch.float32)


def test_cpu_default_and_explicit_blocks(caplog):
    with caplog.at_level(logging.INFO, logger='lmdp'):
        assert plan_num_blocks(MC, 16, 'cpu', session_len=1000, max_batch_size=8) == 63 * 8
    assert 'KV cache: 504 blocks x 16 tokens' in caplog.text and 'session_len 1000' in caplog.text
    assert plan_num_blocks(MC, 16, 'cpu', num_gpu_blocks=7) == 7


def test_cuda_takes_a_fraction_of_the_free_memory(monkeypatch, caplog):
    per_block = CacheEngine.bytes_per_block(MC, 64)          # 2 layers x 2 x 2 heads x 16 x 64 tokens x 4 bytes
    assert per_block == 2 * 2 * 2 * 16 * 64 * 4
    monkeypatch.setattr(torch.cuda, 'empty_cache', lambda: None)
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (1000 * per_block, 4000 * per_block))
    with caplog.at_level(logging.INFO, logger='lmdp'):
        assert plan_num_blocks(MC, 64, 'cuda', cache_max_entry_count=0.5) == 500
    assert '50% of' in caplog.text


def test_a_gib_cap_bounds_the_pool_sized_from_free_memory(monkeypatch):
    per_block = CacheEngine.bytes_per_block(MC, 64)
    monkeypatch.setattr(torch.cuda, 'empty_cache', lambda: None)
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (2**31, 2**33))   # 2 GiB free
    monkeypatch.setenv('LMDP_MAX_KV_POOL_GIB', '0.5')
    assert plan_num_blocks(MC, 64, 'cuda', cache_max_entry_count=0.8) == 2**29 // per_block
    monkeypatch.setenv('LMDP_MAX_KV_POOL_GIB', '4')                  # above 80% of what is free: no effect
    assert plan_num_blocks(MC, 64, 'cuda', cache_max_entry_count=0.8) == int(2**31 * 0.8) // per_block
    assert plan_num_blocks(MC, 64, 'cuda', num_gpu_blocks=3) == 3    # an explicit size is not capped


def test_the_engine_fits_session_len_to_a_small_pool(tiny2, make_pipe):
    pipe = make_pipe(tiny2, num_gpu_blocks=4, session_len=1024)
    assert pipe.engine.session_len == 4 * 16 and pipe.engine.runner.max_blocks_per_seq == 4
