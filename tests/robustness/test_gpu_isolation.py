"""Request isolation on CUDA, where a step runs ahead of the host and decode replays CUDA graphs: a refused request
leaves the batch's bits alone, a step that fails mid-decode fails only its request, and nothing leaks. On a GPU a
bad index reaching a kernel would be a device-side assert that no one survives, so the submit-time checks matter
most here."""
import asyncio

import pytest
import torch

from lmdp import GenerationConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]

GOOD = GenerationConfig(max_new_tokens=16, ignore_eos=True)
POISON = GenerationConfig(max_new_tokens=8, stop_token_ids=[99999], min_new_tokens=2)


@pytest.fixture(scope='module')
def gpu_pipe(tmp_path_factory):
    from lmdp import PytorchEngineConfig, pipeline
    from lmdp.tiny import make_tiny
    path = str(make_tiny('llama', tmp_path_factory.mktemp('gpu_iso'), dtype='bfloat16'))
    cfg = PytorchEngineConfig(dtype='bfloat16', session_len=512, max_batch_size=8, num_gpu_blocks=64,
                              cudagraph_capture_batch_sizes=[1, 2, 4, 8])
    pipe = pipeline(path, backend_config=cfg)
    assert pipe.engine.runner.graphs is not None
    yield pipe
    pipe.close()


def _whole(pipe):
    engine = pipe.engine
    engine.step()
    assert engine.block_manager.num_free == engine.block_manager.num_blocks
    assert engine.num_sequences == 0 and not engine.has_unfinished() and not pipe._active


def test_a_refused_request_leaves_the_batch_bit_for_bit(gpu_pipe):
    prompts = [[1, 20 + i, 30, 40] for i in range(3)]
    clean = gpu_pipe(prompts, GOOD)
    out = gpu_pipe(prompts + [[1, 2, 3]], [GOOD, GOOD, GOOD, POISON])
    assert [r.token_ids for r in out[:3]] == [r.token_ids for r in clean]
    assert out[3].finish_reason == 'error' and 'stop_token_ids [99999]' in out[3].error
    _whole(gpu_pipe)


def test_a_failure_mid_decode_with_graphs_fails_only_its_request(gpu_pipe, monkeypatch):
    sampler = gpu_pipe.engine.sampler
    prepare = sampler.prepare

    def poisoned(seqs, ahead=0):
        if any(s.params.seed == 4242 and s.num_generated + ahead >= 3 for s in seqs):
            raise RuntimeError('poisoned sampler')
        return prepare(seqs, ahead)

    monkeypatch.setattr(sampler, 'prepare', poisoned)
    prompts = [[1, 20 + i, 30, 40] for i in range(3)] + [[1, 7, 8, 9]]
    gens = [GOOD] * 3 + [GenerationConfig(max_new_tokens=16, ignore_eos=True, random_seed=4242)]
    out = gpu_pipe(prompts, gens)
    assert [r.finish_reason for r in out] == ['length'] * 3 + ['error']
    assert all(len(r.token_ids) == 16 for r in out[:3])
    assert 'RuntimeError: poisoned sampler' in out[3].error and len(out[3].token_ids) == 3
    _whole(gpu_pipe)


def test_six_async_callers_one_poisoned_on_cuda(gpu_pipe):
    async def last(prompt, gen):
        tokens, piece = [], None
        async for piece in gpu_pipe.generate(prompt, gen):
            tokens += piece.token_ids
        return piece.finish_reason, tokens, piece.error

    async def main():
        calls = [last([1, 50 + i, 51], GOOD) for i in range(5)] + [last([1, 2, 3], POISON)]
        return await asyncio.wait_for(asyncio.gather(*calls), timeout=10)

    results = asyncio.run(main())
    assert [r[0] for r in results] == ['length'] * 5 + ['error']
    assert all(len(r[1]) == 16 for r in results[:5]) and 'outside the vocabulary' in results[5][2]
    _whole(gpu_pipe)
