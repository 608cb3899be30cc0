"""The step runner and the packed step layout."""
import pytest
import torch

from lmdp.engine import StepRunner
from lmdp.model_inputs import ModelInputs, StepContext
from lmdp.paging import BlockAllocator, OutOfBlocks


def test_packed_context_positions_and_offsets():
    inputs = ModelInputs.make([[1, 2, 3], [4], [5, 6]], history_lengths=[0, 7, 2],
                              block_tables=[[3], [0, 5], [9]], is_decoding=False)
    ctx = StepContext.new(inputs)
    assert ctx.input_ids.tolist() == [[1, 2, 3, 4, 5, 6]]
    assert ctx.q_start_loc.tolist() == [0, 3, 4]
    assert ctx.kv_seqlens.tolist() == [3, 8, 4]
    assert ctx.position_ids.tolist() == [[0, 1, 2, 7, 2, 3]]
    assert ctx.block_offsets.tolist() == [[3, 0], [0, 5], [9, 0]]
    assert (ctx.max_q_seqlen, ctx.max_kv_seqlen, ctx.sum_kv_seqlen) == (3, 8, 15)
    decode = StepContext.new(ModelInputs.make([[1], [2]], [4, 9], [[0], [1, 2]], is_decoding=True))
    assert decode.position_ids.tolist() == [[4, 9]] and decode.attn_metadata.is_decoding


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match='exactly one new token'):
        ModelInputs.make([[1, 2]], [3], [[0]], is_decoding=True)
    with pytest.raises(ValueError, match='at least one new token'):
        ModelInputs.make([[]], [0], [[0]], is_decoding=False)


def test_allocator_shuffles_and_runs_out():
    alloc = BlockAllocator(8, shuffle_seed=0)
    got = alloc.allocate(8)
    assert sorted(got) == list(range(8)) and got != list(range(8))
    with pytest.raises(OutOfBlocks, match='need 1 KV-cache blocks, 0 free of 8'):
        alloc.allocate(1)
    alloc.free(got[:3])
    assert alloc.num_free == 3


def test_release_returns_every_block_and_chunked_prefill_matches(tiny_llama):
    runner = StepRunner.from_pretrained(tiny_llama, dtype='float32', num_blocks=16, block_size=16,
                                        shuffle_blocks_seed=5)
    prompt = list(range(3, 43))
    whole = runner.prefill([prompt])
    runner.release()
    assert runner.block_manager.num_free == 16 and not runner.sequences
    # the same prompt in two chunks: the second is a prefill step with history
    first = runner.prefill([prompt[:23]])
    chunked = runner.step(first.seq_ids, [prompt[23:]], is_decoding=False)
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-5, atol=1e-5)
    runner.release()
    assert runner.block_manager.num_free == 16


def test_out_of_blocks_is_a_clear_error(tiny_llama):
    runner = StepRunner.from_pretrained(tiny_llama, dtype='float32', num_blocks=2, block_size=16)
    with pytest.raises(OutOfBlocks, match='need 3 KV-cache blocks, 2 free'):
        runner.prefill([list(range(40))])
