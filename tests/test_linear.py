"""Linear builders: stacked loading and tensor-parallel slicing (simulated ranks)."""
import pytest
import torch

from lmdp.errors import WeightLoadError
from lmdp.nn import build_colwise_linear, build_merged_colwise_linear, build_qkv_proj, build_rowwise_linear
from lmdp.nn import linear as linear_mod


def _as_rank(monkeypatch, world, rank):
    monkeypatch.setattr(linear_mod, 'get_tp_world_rank', lambda: (world, rank))


def test_qkv_proj_stacks_and_splits():
    qkv = build_qkv_proj(16, num_q_heads=4, num_kv_heads=2, head_size=8, bias=True, is_tp=False)
    wq, wk, wv = torch.randn(32, 16), torch.randn(16, 16), torch.randn(16, 16)
    bq, bk, bv = torch.randn(32), torch.randn(16), torch.randn(16)
    for w, b, s in ((wk, bk, 'k'), (wq, bq, 'q'), (wv, bv, 'v')):
        qkv.weight.weight_loader(qkv.weight, w, shard_id=s)
        qkv.bias.weight_loader(qkv.bias, b, shard_id=s)
    x = torch.randn(5, 16)
    q, k, v = qkv.split_qkv(qkv(x))
    torch.testing.assert_close(q.flatten(1), x @ wq.T + bq)
    torch.testing.assert_close(k.flatten(1), x @ wk.T + bk)
    torch.testing.assert_close(v.flatten(1), x @ wv.T + bv)
    assert q.shape == (5, 4, 8) and k.shape == (5, 2, 8)


def test_merged_colwise_by_name_and_index():
    m = build_merged_colwise_linear(8, [6, 6], bias=False, out_names=['gate', 'up'])
    g, u = torch.randn(6, 8), torch.randn(6, 8)
    m.weight.weight_loader(m.weight, u, shard_id='up')
    m.weight.weight_loader(m.weight, g, shard_id=0)
    torch.testing.assert_close(m.weight, torch.cat([g, u]))
    with pytest.raises(WeightLoadError, match="unknown shard 'down'"):
        m.weight.weight_loader(m.weight, g, shard_id='down')


def test_tensor_parallel_slices_recombine(monkeypatch):
    """Per rank: colwise takes output rows, rowwise input columns; the pieces rebuild the full layer."""
    torch.manual_seed(0)
    w_col, w_row, x = torch.randn(8, 6), torch.randn(5, 8), torch.randn(3, 6)
    col_parts, row_parts = [], []
    for rank in range(2):
        _as_rank(monkeypatch, 2, rank)
        col = build_colwise_linear(6, 8, bias=False, is_tp=True)
        col.weight.weight_loader(col.weight, w_col)
        row = build_rowwise_linear(8, 5, bias=False, is_tp=True, all_reduce=False)
        row.weight.weight_loader(row.weight, w_row)
        h = col(x)
        col_parts.append(h)
        row_parts.append(row(h))
    torch.testing.assert_close(torch.cat(col_parts, -1), x @ w_col.T)
    torch.testing.assert_close(sum(row_parts), x @ w_col.T @ w_row.T)


def test_qkv_tensor_parallel_replicates_scarce_kv_heads(monkeypatch):
    wq, wk, wv = torch.randn(4 * 2, 4), torch.randn(1 * 2, 4), torch.randn(1 * 2, 4)
    for rank in range(2):
        _as_rank(monkeypatch, 2, rank)
        qkv = build_qkv_proj(4, num_q_heads=4, num_kv_heads=1, head_size=2, is_tp=True)
        for w, s in ((wq, 'q'), (wk, 'k'), (wv, 'v')):
            qkv.weight.weight_loader(qkv.weight, w, shard_id=s)
        q, k, v = qkv.weight.split([4, 2, 2])
        torch.testing.assert_close(q, wq[rank * 4:(rank + 1) * 4])
        torch.testing.assert_close(k, wk)                    # the one kv head lives on both ranks


def test_uneven_split_is_refused(monkeypatch):
    _as_rank(monkeypatch, 3, 0)
    with pytest.raises(ValueError, match='does not split evenly over 3'):
        build_colwise_linear(4, 8, bias=False, is_tp=True)


def test_quantised_config_is_refused_up_front():
    with pytest.raises(NotImplementedError, match="'awq'"):
        build_rowwise_linear(4, 4, bias=False, quant_config={'quant_method': 'awq'})
