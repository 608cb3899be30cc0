"""CUDA-graph decode: replay against eager, padding isolation, capture refusals (GPU only)."""
import pytest
import torch

from lmdp.backends.cuda import CUDAGraphRunner, default_capture_batch_sizes
from lmdp.backends.cuda.capture_errors import explain_capture_error
from lmdp.model_inputs import ModelInputs

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


def _runner(tmp_path, dtype='bfloat16'):
    from lmdp.engine import StepRunner
    from lmdp.tiny import make_tiny
    path = make_tiny('llama', tmp_path / 'tl', dtype=dtype)
    return StepRunner.from_pretrained(str(path), dtype=dtype, device='cuda', num_blocks=64, block_size=16,
                                      shuffle_blocks_seed=0)


def _decode_inputs(runner, seq_ids, tokens):
    seqs = [runner.sequences[i] for i in seq_ids]
    for s in seqs:
        runner._reserve(s, s.num_cached + 1)
    return ModelInputs.make([[t] for t in tokens], [s.num_cached for s in seqs], [s.blocks for s in seqs],
                            is_decoding=True, device='cuda')


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize('batch', [4, 3])
def test_replay_equals_eager(tmp_path, batch):
    runner = _runner(tmp_path)
    prompts = [list(range(3 + i, 20 + 7 * i)) for i in range(batch)]
    out = runner.prefill(prompts)
    scratch = runner.allocator.allocate(1)[0]
    graphs = CUDAGraphRunner(runner.model, runner.agent.ctx_mgr, runner.agent.model_config, runner.cache.kv_caches,
                             max_blocks_per_seq=8, scratch_block=scratch, capture_batch_sizes=[1, 2, 4, 8])
    results = graphs.capture_all()
    assert all(r.captured for r in results), [(r.batch_size, r.reason) for r in results]

    tokens = out.logits.argmax(-1).tolist()
    inputs = _decode_inputs(runner, out.seq_ids, tokens)
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
    # padding slots wrote only to the scratch block: every real block holds what the eager step wrote
    for (k, _), ke, kb in zip(runner.cache.kv_caches, k_eager, k_before):
        real = [b for s in runner.sequences.values() for b in s.blocks]
        assert torch.equal(k[real], ke[real])


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
                             max_blocks_per_seq=4, scratch_block=runner.allocator.allocate(1)[0],
                             capture_batch_sizes=[1])
    result = graphs.capture(1)
    assert not result.captured
    assert 'synchronis' in result.reason and result.fix
