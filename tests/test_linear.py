"""Linear builders: stacked loading and tensor-parallel slicing (simulated ranks)."""
import pytest
import torch

from lmdp.errors import WeightLoadError
from lmdp.nn import (
    build_colwise_linear,
    build_merged_colwise_linear,
    build_qkv_proj,
    build_rowwise_linear,
    linear as linear_mod,
)


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


def test_unsupported_quantisation_is_refused_up_front():
    from lmdp.errors import ConfigError
    with pytest.raises(ConfigError, match="'gptq'"):
        build_rowwise_linear(128, 128, bias=False, quant_config={'quant_method': 'gptq'})
    with pytest.raises(ConfigError, match='group_size is 256'):
        build_rowwise_linear(256, 128, bias=False, quant_config={'quant_method': 'awq', 'group_size': 256})
    # a supported scheme that the layer's shape cannot take is named before any weight is read
    with pytest.raises(ValueError, match='no whole AWQ groups'):
        build_rowwise_linear(4, 8, bias=False, quant_config={'quant_method': 'awq', 'group_size': 128})


# --- fused checkpoint tensors (Phi-3 stores qkv_proj and gate_up_proj already stacked) ---

from hypothesis import given, settings, strategies as st  # noqa: E402

from lmdp.weight_loader import load_weight  # noqa: E402
from lmdp.weight_loader.tracker import tracking  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(kv_heads=st.integers(1, 4), group=st.integers(1, 3), head=st.sampled_from([2, 4]),
       head_v=st.sampled_from([2, 6]), world=st.sampled_from([1, 2, 4]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_a_fused_qkv_tensor_loads_as_its_three_shards_on_every_rank(kv_heads, group, head, head_v, world, bias, seed):
    """Per rank, loading q|k|v fused (no shard_id) gives exactly what loading q, k and v one by one gives."""
    q_heads = kv_heads * group
    if q_heads % world or (kv_heads >= world and kv_heads % world) or (kv_heads < world and world % kv_heads):
        return   # a split the layer itself refuses
    g = torch.Generator().manual_seed(seed)
    wq, wk, wv = (torch.randn(n, 8, generator=g) for n in (q_heads * head, kv_heads * head, kv_heads * head_v))
    bq, bk, bv = (torch.randn(w.size(0), generator=g) for w in (wq, wk, wv))
    mp = pytest.MonkeyPatch()
    try:
        for rank in range(world):
            mp.setattr(linear_mod, 'get_tp_world_rank', lambda: (world, rank))
            by_shard = build_qkv_proj(8, q_heads, kv_heads, head, head_v, bias=bias, is_tp=True)
            fused = build_qkv_proj(8, q_heads, kv_heads, head, head_v, bias=bias, is_tp=True)
            for name, w, b in (('q', wq, bq), ('k', wk, bk), ('v', wv, bv)):
                load_weight(by_shard.weight, w, shard_id=name)
                if bias:
                    load_weight(by_shard.bias, b, shard_id=name)
            load_weight(fused.weight, torch.cat([wq, wk, wv]))
            if bias:
                load_weight(fused.bias, torch.cat([bq, bk, bv]))
            for a, b in zip(fused.parameters(), by_shard.parameters()):
                assert torch.equal(a, b)
    finally:
        mp.undo()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.sampled_from([4, 8, 12]), min_size=2, max_size=3), world=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 2**16))
def test_a_fused_merged_tensor_loads_as_its_shards_on_every_rank(sizes, world, seed):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(n, 6, generator=g) for n in sizes]
    mp = pytest.MonkeyPatch()
    try:
        for rank in range(world):
            mp.setattr(linear_mod, 'get_tp_world_rank', lambda: (world, rank))
            fused = build_merged_colwise_linear(6, sizes, bias=False, is_tp=True)
            load_weight(fused.weight, torch.cat(parts))
            local = [p.chunk(world)[rank] for p in parts]    # each projection's rows for this rank, in order
            assert torch.equal(fused.weight, torch.cat(local))
    finally:
        mp.undo()


def test_a_fused_tensor_of_the_wrong_size_names_the_parameter_the_tensor_and_the_sizes():
    layer = torch.nn.Module()
    layer.qkv_proj = build_qkv_proj(8, num_q_heads=4, num_kv_heads=2, head_size=4, is_tp=False)
    with tracking(layer) as tracker:
        for name, w in tracker.watch([('model.layers.3.self_attn.qkv_proj.weight', torch.randn(30, 8))]):
            with pytest.raises(WeightLoadError) as e:
                load_weight(layer.qkv_proj.weight, w)
    msg = str(e.value)
    assert "parameter 'qkv_proj.weight'" in msg and "'model.layers.3.self_attn.qkv_proj.weight'" in msg
    assert "'q' 16 + 'k' 8 + 'v' 8 = 32 rows" in msg and '(30, 8)' in msg


def test_a_failing_custom_loader_is_reported_with_the_parameter_and_tensor():
    """Whatever a loader raises (here lmdeploy-style `shard_id` required) comes back naming both sides."""
    layer = torch.nn.Linear(4, 4)
    layer.weight.weight_loader = lambda param, w, shard_id: param.copy_(w)
    with tracking(layer) as tracker:
        for name, w in tracker.watch([('lm.dense.weight', torch.randn(4, 4))]):
            with pytest.raises(WeightLoadError, match=r"parameter 'weight' \(checkpoint tensor 'lm.dense.weight'\)"
                                                      r".*TypeError.*shard_id"):
                load_weight(layer.weight, w)
