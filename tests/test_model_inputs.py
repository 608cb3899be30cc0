"""One step's context: what StepContext.new hands through to the model, and how StepContextManager nests."""
import pytest
import torch

from lmdp.model_inputs import ModelInputs, StepContext, StepContextManager


def _inputs():
    return ModelInputs.make([[1, 2], [3]], history_lengths=[0, 4], block_tables=[[2], [0, 1]], is_decoding=False)


def test_the_context_carries_the_model_config_caches_and_embeddings():
    inputs = _inputs()
    inputs.inputs_embeds = torch.ones(1, 3, 8)
    caches = [(torch.zeros(1), torch.zeros(1))]
    config = object()
    ctx = StepContext.new(inputs, model_config=config, kv_caches=caches)
    assert ctx.model_config is config and ctx.kv_caches is caches and ctx.inputs_embeds is inputs.inputs_embeds
    assert ctx.extras == {} and StepContext.new(inputs).extras is not ctx.extras    # a fresh dict per step
    bare = StepContext.new(_inputs())
    assert bare.kv_caches == [] and bare.model_config is None and bare.inputs_embeds is None


def test_attention_metadata_agrees_with_the_context():
    ctx = StepContext.new(_inputs())
    meta = ctx.attn_metadata
    assert ctx.is_decoding is False and meta.is_decoding is False and meta.block_offsets is ctx.block_offsets
    decode = StepContext.new(ModelInputs.make([[5]], [3], [[0]], is_decoding=True))
    assert decode.is_decoding is True and decode.attn_metadata.is_decoding is True
    for name in ('q_start_loc', 'q_seqlens', 'kv_seqlens'):
        assert torch.equal(getattr(meta, name), getattr(ctx, name)), name
    assert (meta.max_q_seqlen, meta.max_kv_seqlen) == (ctx.max_q_seqlen, ctx.max_kv_seqlen) == (2, 5)


def test_block_offsets_are_as_wide_as_the_longest_table_and_at_least_one():
    assert StepContext.new(_inputs()).block_offsets.shape == (2, 2)
    one = ModelInputs.make([[1], [2]], [0, 0], [[4], [7]], is_decoding=False)
    assert one.block_offsets.tolist() == [[4], [7]] and one.block_offsets.dtype == torch.int32
    none = ModelInputs.make([[1]], [0], [[]], is_decoding=False)
    assert none.block_offsets.shape == (1, 1)


def test_contexts_nest_and_the_outer_one_comes_back():
    manager = StepContextManager(build_ctx='settings')
    assert manager.build_ctx == 'settings' and manager.current_context() is None
    outer, inner = StepContext.new(_inputs()), StepContext.new(_inputs())
    with manager.context(outer) as got:
        assert got is outer and manager.current_context() is outer
        with manager.context(inner):
            assert manager.current_context() is inner
        assert manager.current_context() is outer
        with pytest.raises(KeyError):
            with manager.context(inner):
                raise KeyError('a failed forward')
        assert manager.current_context() is outer
    assert manager.current_context() is None


def test_packed_tensors_have_the_layout_dtypes_on_the_asked_device():
    """int64 token ids, int32 lengths and block offsets (what the kernels index with), all on `device`."""
    inputs = ModelInputs.make([[1, 2], [3]], [0, 4], [[2], [0, 1]], is_decoding=False, device='meta')
    tensors = {'input_ids': torch.long, 'seq_length': torch.int32, 'history_lengths': torch.int32,
               'block_offsets': torch.int32}
    for name, dtype in tensors.items():
        t = getattr(inputs, name)
        assert (t.dtype, t.device.type) == (dtype, 'meta'), name
