"""lmdeploy's builder API as lmdp keeps it: the role builders, the keyword arguments lmdeploy's ports pass, a
TypeError naming anything else, and CudaGraphMixin."""
import warnings

import pytest
import torch

from lmdp.model_inputs import AttentionMetadata
from lmdp.models.utils.cudagraph import CudaGraphMixin
from lmdp.nn import (
    Attention,
    ParallelEmbedding,
    RMSNorm,
    build_colwise_linear,
    build_down_linear,
    build_gateup_linear,
    build_merged_colwise_linear,
    build_o_proj,
    build_qkv_proj,
    build_rowwise_linear,
    linear as linear_mod,
)
from lmdp.nn.linear import ColwiseParallelLinear, MergedColwiseLinear, RowwiseParallelLinear

BUILDERS = {
    'build_colwise_linear': lambda **kw: build_colwise_linear(8, 8, bias=False, **kw),
    'build_rowwise_linear': lambda **kw: build_rowwise_linear(8, 8, bias=False, **kw),
    'build_merged_colwise_linear': lambda **kw: build_merged_colwise_linear(8, [4, 4], bias=False, **kw),
    'build_qkv_proj': lambda **kw: build_qkv_proj(8, num_q_heads=2, num_kv_heads=1, head_size=4, **kw),
    'build_o_proj': lambda **kw: build_o_proj(8, 8, bias=False, **kw),
    'build_gateup_linear': lambda **kw: build_gateup_linear(8, [4, 4], bias=False, **kw),
    'build_down_linear': lambda **kw: build_down_linear(8, 8, bias=False, **kw),
    'Attention': lambda **kw: Attention(2, 4, **kw),
    'RMSNorm': lambda **kw: RMSNorm(8, **kw),
    'ParallelEmbedding': lambda **kw: ParallelEmbedding(16, 8, None, **kw),
}


@pytest.mark.parametrize('name', sorted(BUILDERS))
def test_an_unknown_keyword_is_a_type_error_naming_it(name):
    build = BUILDERS[name]
    build()    # the defaults build
    with pytest.raises(TypeError, match="'sliding_windw'"):
        build(sliding_windw=4096)


# keyword arguments lmdeploy's current ports pass (its defaults): they must keep building
LMDEPLOY_KWARGS = {
    'build_colwise_linear': dict(tp_align_size=1, dp_disable_tp=False, dp_gather=False, check_dist=True,
                                 layer_type='attn', prefix='model.layers.0.mlp'),
    'build_rowwise_linear': dict(tp_align_size=1, all_reduce=True, dp_disable_tp=False, check_dist=True,
                                 layer_type='attn', prefix='x'),
    'build_merged_colwise_linear': dict(out_names=['gate', 'up'], dp_gather=False, check_dist=True,
                                        layer_type='mlp', prefix='x'),
    'build_qkv_proj': dict(num_replicate_kv_heads=1, prefix='x'),
    'build_o_proj': dict(is_tp=True, tp_align_size=1, all_reduce=True, prefix='x'),
    'build_gateup_linear': dict(is_tp=True, out_names=[0, 1], dp_gather=True, prefix='x'),
    'build_down_linear': dict(is_tp=True, tp_align_size=1, all_reduce=True, prefix='x'),
    'Attention': dict(use_flash_mla=False, learnable_sink=False, prefix='x'),
    'RMSNorm': dict(quant_config=None, tp=False, align=1, prefix='x'),
    'ParallelEmbedding': dict(is_tp=False, padding_size=64, layer_type='attn'),
}


@pytest.mark.parametrize('name', sorted(BUILDERS))
def test_lmdeploys_own_keywords_are_accepted(name):
    BUILDERS[name](**LMDEPLOY_KWARGS[name])


def test_lmdeploy_features_lmdp_lacks_are_refused_not_ignored():
    with pytest.raises(NotImplementedError, match='learnable_sink'):
        Attention(2, 4, learnable_sink=True)
    with pytest.raises(NotImplementedError, match='all_reduce_group'):
        RMSNorm(8, all_reduce_group='attn')


def _as_rank(monkeypatch, world, rank):
    monkeypatch.setattr(linear_mod, 'get_tp_world_rank', lambda: (world, rank))


def test_role_builders_split_the_way_their_role_needs(monkeypatch):
    """o_proj and down_proj split their inputs (heads / intermediate) and sum; gate_up splits its outputs."""
    _as_rank(monkeypatch, 2, 1)
    o = build_o_proj(8, 6, bias=False, is_tp=True)
    down = build_down_linear(8, 6, bias=False, is_tp=True)
    gate_up = build_gateup_linear(6, [8, 8], bias=False, is_tp=True)
    assert isinstance(o, RowwiseParallelLinear) and o.weight.shape == (6, 4) and o.all_reduce
    assert isinstance(down, RowwiseParallelLinear) and down.weight.shape == (6, 4)
    assert isinstance(gate_up, MergedColwiseLinear) and gate_up.weight.shape == (8, 6)
    w = torch.randn(6, 8)
    o.weight.weight_loader(o.weight, w)
    torch.testing.assert_close(o.weight, w[:, 4:])       # rank 1 holds the second half of the input features
    assert isinstance(build_colwise_linear(6, 8, bias=False, is_tp=True), ColwiseParallelLinear)


def test_aligned_uneven_splits_are_refused_under_tensor_parallelism(monkeypatch):
    build_o_proj(8, 8, bias=False, is_tp=True, tp_align_size=16)   # one rank: nothing to align
    _as_rank(monkeypatch, 2, 0)
    with pytest.raises(NotImplementedError, match='tp_align_size=16'):
        build_o_proj(8, 8, bias=False, is_tp=True, tp_align_size=16)


def _meta(is_decoding):
    one = torch.ones(1, dtype=torch.int32)
    return AttentionMetadata(is_decoding=is_decoding, block_offsets=one[None], q_start_loc=one - 1, q_seqlens=one,
                             kv_seqlens=one)


def test_cuda_graph_mixin_answers_decode_steps_only():

    class Port(torch.nn.Module, CudaGraphMixin):
        pass

    port, ids = Port(), torch.zeros(1, 1, dtype=torch.long)
    assert port.support_cuda_graph(ids, ids, [], attn_metadata=_meta(True)) is True
    assert port.support_cuda_graph(ids, ids, [], attn_metadata=_meta(False)) is False


def test_cuda_graph_mixin_warns_about_buffer_hooks_lmdp_never_calls():
    with pytest.warns(UserWarning, match='fill_buffers_cudagraph, which lmdp never calls'):
        class Port(torch.nn.Module, CudaGraphMixin):
            def fill_buffers_cudagraph(self, graph_meta, *args, **kwargs):
                return {}
    with warnings.catch_warnings():
        warnings.simplefilter('error')

        class Plain(torch.nn.Module, CudaGraphMixin):
            def support_cuda_graph(self, *args, **kwargs):
                return False
