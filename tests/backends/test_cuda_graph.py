"""CUDA-graph decode: replay against eager, padding isolation, capture refusals (GPU only)."""
import pytest
import torch

from lmdp.backends.cuda import CUDAGraphRunner, default_capture_batch_sizes
from lmdp.backends.cuda.capture_errors import explain_capture_error

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')


def test_default_buckets():
    assert default_capture_batch_sizes(1) == [1]
    assert default_capture_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = default_capture_batch_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and 64 in sizes and 80 in sizes


def test_capture_errors_are_explained():
    reason, fix = explain_capture_error(RuntimeError('CUDA error: operation not permitted when stream is capturing'))
    assert '.item()' in reason and 'torch.where' in fix
    reason, _ = explain_capture_error(RuntimeError('something else entirely'))
    assert 'something else entirely' in reason


def test_decode_inputs_reserve_blocks_and_leave_the_sequences_as_they_were(tiny_llama):
    from lmdp.engine import StepRunner
    runner = StepRunner.from_pretrained(tiny_llama, dtype='float32', num_blocks=16, block_size=16,
                                        shuffle_blocks_seed=0)
    out = runner.prefill([list(range(3, 19)), list(range(5, 12))])     # 16 tokens: the next one needs a block
    inputs = runner.decode_inputs(out.seq_ids, [1, 2])
    seqs = [runner.sequences[i] for i in out.seq_ids]
    assert [s.num_cached for s in seqs] == [16, 7] and [len(s.blocks) for s in seqs] == [2, 1]
    assert inputs.is_decoding and inputs.input_ids.tolist() == [[1, 2]]
    assert inputs.history_lengths.tolist() == [16, 7]
    # the engine's decode layout: block tables padded to a fixed width (max_blocks_per_seq), so graphs fit
    assert inputs.block_offsets.shape == (2, 16) and inputs.block_offsets[0, :2].tolist() == seqs[0].blocks
    eager = runner.agent.get_logits(runner.agent.forward(inputs, runner.cache.kv_caches))
    # the step those inputs describe is the step decode then runs
    assert torch.equal(runner.decode(out.seq_ids, [1, 2]).logits, eager)
    assert [s.num_cached for s in seqs] == [17, 8]
    with pytest.raises(RuntimeError, match='CUDA graphs need a CUDA device; this runner is on cpu'):
        runner.capture_cuda_graphs([1, 2])


def _runner(tmp_path, dtype='bfloat16'):
    from lmdp.engine import StepRunner
    from lmdp.tiny import make_tiny
    path = make_tiny('llama', tmp_path / 'tl', dtype=dtype)
    return StepRunner.from_pretrained(str(path), dtype=dtype, device='cuda', num_blocks=64, block_size=16,
                                      shuffle_blocks_seed=0)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize('batch', [4, 3])
def test_replay_equals_eager(tmp_path, batch):
    runner = _runner(tmp_path)
    prompts = [list(range(3 + i, 20 + 7 * i)) for i in range(batch)]
    out = runner.prefill(prompts)
    graphs = runner.capture_cuda_graphs([1, 2, 4, 8], max_blocks_per_seq=8)
    assert isinstance(graphs, CUDAGraphRunner) and graphs.scratch_block == runner.scratch_block
    results = graphs.results.values()
    assert all(r.captured for r in results), [(r.batch_size, r.reason) for r in results]

    tokens = out.logits.argmax(-1).tolist()
    inputs = runner.decode_inputs(out.seq_ids, tokens)
    k_before = [k.clone() for k, _ in runner.cache.kv_caches]
    eager = runner.agent.get_logits(runner.agent.forward(inputs, runner.cache.kv_caches))
    k_eager = [k.clone() for k, _ in runner.cache.kv_caches]
    graph = graphs.decode(inputs).clone()
    assert graph.shape == eager.shape
    if batch in graphs.batch_sizes:
        # same kernels, same shapes: the replay is the eager step, bit for bit
        assert torch.equal(graph, eager)
    else:
        # padded to the next bucket: the GEMMs run at another M, so cuBLAS may pick other tiles
        torch.testing.assert_close(graph, eager, rtol=2e-2, atol=2e-2)
        assert (graph.argmax(-1) == eager.argmax(-1)).all()
    # padding slots wrote only to the scratch block: outside it, only each sequence's new slot changed, and
    # that slot holds what the eager step wrote (bit for bit at a bucket size; by rounding when padded)
    new_slots = [(s.blocks[s.num_cached // 16], s.num_cached % 16) for s in runner.sequences.values()]
    for (k, _), kb in zip(runner.cache.kv_caches, k_before):
        untouched = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
        untouched[graphs.scratch_block] = False
        for block, slot in new_slots:
            untouched[block, slot] = False
        assert torch.equal(k[untouched], kb[untouched])
    for (k, _), ke in zip(runner.cache.kv_caches, k_eager):
        for block, slot in new_slots:
            if batch in graphs.batch_sizes:
                assert torch.equal(k[block, slot], ke[block, slot])
            else:
                torch.testing.assert_close(k[block, slot], ke[block, slot], rtol=2e-2, atol=2e-2)


@cuda
@pytest.mark.gpu
def test_host_sync_in_forward_is_refused_with_a_reason(tmp_path):
    runner = _runner(tmp_path)
    runner.prefill([[5, 6, 7]])
    model = runner.model
    original = model.forward

    def syncing_forward(*args, **kwargs):
        hidden = original(*args, **kwargs)
        if hidden.sum().item() > 1e30:       # a host sync: illegal inside capture
            hidden = hidden * 0
        return hidden
    model.forward = syncing_forward
    graphs = CUDAGraphRunner(model, runner.agent.ctx_mgr, runner.agent.model_config, runner.cache.kv_caches,
                             max_blocks_per_seq=4, scratch_block=runner.scratch_block,
                             capture_batch_sizes=[1])
    result = graphs.capture(1)
    assert not result.captured
    assert 'synchronis' in result.reason and result.fix
