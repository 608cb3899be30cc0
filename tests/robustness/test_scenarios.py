"""The four failures of issue 12, points 1-3, as tests: a poisoned request among async callers, the same request in
a batch call, its relatives, and a stray weight file."""
import asyncio
import time

import pytest
import torch

from lmdp import GenerationConfig
from lmdp.errors import WeightLoadError

GOOD = GenerationConfig(max_new_tokens=8, ignore_eos=True)
# an id outside the 512-token vocabulary, with min_new_tokens so the sampler would mask it
POISON = GenerationConfig(max_new_tokens=8, stop_token_ids=[99999], min_new_tokens=2)


async def _last(pipe, prompt, gen):
    """The last piece of a generate() stream, its token_ids replaced by those of every piece."""
    last, tokens = None, []
    async for piece in pipe.generate(prompt, gen):
        last = piece
        tokens += piece.token_ids
    last.token_ids = tokens
    return last


def test_six_async_callers_one_poisoned_all_finish(pipe, nothing_lost, monkeypatch):
    """Point 1: five good generate() calls and the poisoned one all return within 10 s; the driver does not spin
    once they are answered."""
    prompts = [[1, 40 + i, 41, 42] for i in range(5)]
    clean = pipe(prompts, GOOD)
    steps = {'n': 0}
    step = pipe._step

    def counted():
        steps['n'] += 1
        step()

    monkeypatch.setattr(pipe, '_step', counted)

    async def main():
        calls = [_last(pipe, p, GOOD) for p in prompts] + [_last(pipe, [1, 2, 3], POISON)]
        results = await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
        await asyncio.sleep(0.2)              # a driver that kept spinning would run many steps here
        return results

    start = time.perf_counter()
    results = asyncio.run(main())
    assert time.perf_counter() - start < 10
    assert [r.token_ids for r in results[:5]] == [c.token_ids for c in clean]
    assert [r.finish_reason for r in results] == ['length'] * 5 + ['error']
    assert 'stop_token_ids [99999] are outside the vocabulary [0, 512)' in results[5].error
    # 8 new tokens: one prefill and 7 decode steps (the overlapped one finishing a step later), not thousands
    assert steps['n'] <= 12, f'the driver ran {steps["n"]} steps for 8 tokens'
    assert pipe._driver.done()
    nothing_lost(pipe)


def test_the_next_async_request_after_a_poisoned_one_runs(pipe, nothing_lost):
    """Point 1, second half: after the failure the next request is served (the driver did not die)."""
    async def main():
        bad = await _last(pipe, [1, 2, 3], POISON)
        good = await asyncio.wait_for(_last(pipe, [1, 2, 3], GOOD), timeout=10)
        return bad, good
    bad, good = asyncio.run(main())
    assert bad.finish_reason == 'error' and good.finish_reason == 'length' and len(good.token_ids) == 8
    nothing_lost(pipe)


def test_a_step_failure_reaches_the_async_caller_as_an_error(pipe, nothing_lost, monkeypatch):
    """A request that fails inside a step (not at submit) still answers its async caller, and the others
    sharing the step finish."""
    sampler = pipe.engine.sampler
    prepare = sampler.prepare
    monkeypatch.setattr(sampler, 'prepare', lambda seqs, ahead=0: (_ for _ in ()).throw(RuntimeError('boom'))
                        if any(s.params.seed == 77 for s in seqs) else prepare(seqs, ahead))
    prompts = [[1, 40 + i, 41, 42] for i in range(3)]
    clean = pipe(prompts, GOOD)
    poisoned = GenerationConfig(max_new_tokens=8, ignore_eos=True, random_seed=77)

    async def main():
        calls = [_last(pipe, p, GOOD) for p in prompts] + [_last(pipe, [1, 5, 5], poisoned)]
        return await asyncio.wait_for(asyncio.gather(*calls), timeout=10)

    results = asyncio.run(main())
    assert [r.token_ids for r in results[:3]] == [c.token_ids for c in clean]
    assert results[3].finish_reason == 'error' and 'RuntimeError: boom' in results[3].error
    nothing_lost(pipe)


def test_the_batch_call_returns_three_results_and_one_error(pipe, nothing_lost):
    """Point 2: `pipe([[5,6,7]]*3 + [[1,2,3]], [g, g, g, bad])` returns 3 results and 1 error, no block leaked."""
    engine = pipe.engine
    free = engine.block_manager.num_free
    alone = pipe([5, 6, 7], GOOD)
    out = pipe([[5, 6, 7]] * 3 + [[1, 2, 3]], [GOOD, GOOD, GOOD, POISON])
    assert [r.finish_reason for r in out] == ['length'] * 3 + ['error']
    assert [r.token_ids for r in out[:3]] == [alone.token_ids] * 3
    assert 'stop_token_ids [99999]' in out[3].error
    assert engine.block_manager.num_free == free
    nothing_lost(pipe)


def test_random_seed_and_stop_ids_of_the_wrong_type_are_refused_where_written():
    """Point 2's relatives fail at the line that wrote them, naming the field."""
    with pytest.raises(TypeError, match=r'GenerationConfig.random_seed must be an integer or None, got float 1.5'):
        GenerationConfig(random_seed=1.5)
    with pytest.raises(TypeError, match=r"GenerationConfig.stop_token_ids\[1\] must be an integer, got str '7'"):
        GenerationConfig(stop_token_ids=[3, '7'])
    g = GenerationConfig()
    with pytest.raises(TypeError, match="GenerationConfig.temperature must be a number, got str '0.5'"):
        g.temperature = '0.5'
    assert g.temperature == 0.8, 'a refused value must not be stored'


def test_checkpoint_eos_outside_the_vocab_with_min_new_tokens(tiny, ckpt_copy, make_pipe, nothing_lost):
    """Point 2: a checkpoint whose eos id is outside the vocabulary, and a request with min_new_tokens: the id can
    never be drawn, so it is ignored as a stop id (with a warning at load) instead of crashing the sampler."""
    path = ckpt_copy(tiny, config_edit=lambda c: c.update(eos_token_id=[2, 700]))
    oov = make_pipe(path)
    reference = make_pipe(tiny)
    gen = GenerationConfig(max_new_tokens=8, min_new_tokens=3)
    prompts = [[1, 30, 31], [1, 90, 91, 92]]
    assert [r.token_ids for r in oov(prompts, gen)] == [r.token_ids for r in reference(prompts, gen)]
    nothing_lost(oov)


def test_a_lone_surrogate_third_prompt_leaves_the_first_two(pipe, nothing_lost):
    """Point 2: the surrogate prompt is an error Response; the two before it run and come back."""
    out = pipe(['Once upon a time', 'The quick brown fox', 'bad \ud800 text'], GOOD)
    assert [r.finish_reason for r in out] == ['length', 'length', 'error']
    assert "'\\ud800'" in out[2].error
    assert out[:2] == pipe(['Once upon a time', 'The quick brown fox'], GOOD)
    nothing_lost(pipe)


def test_a_stray_weight_file_is_refused_with_both_names(tiny, ckpt_copy, make_pipe):
    """Point 3: a second safetensors file holding a zeroed model.norm.weight must not override the real one."""
    from safetensors.torch import save_file

    from lmdp.check_env import check_model
    path = ckpt_copy(tiny)
    save_file({'model.norm.weight': torch.zeros(64)}, f'{path}/zz-extra.safetensors')
    with pytest.raises(WeightLoadError) as info:
        make_pipe(path)
    message = str(info.value)
    assert 'zz-extra.safetensors' in message and 'model.safetensors' in message
    assert "'model.norm.weight'" in message
    assert message in check_model(path).problems


def test_a_request_the_engine_lost_is_answered_not_waited_for(pipe, nothing_lost, monkeypatch):
    """Defence in depth: should the engine ever drop a request without a word, its caller gets an error instead
    of a driver spinning forever on empty steps."""
    add = pipe.engine.add_request
    monkeypatch.setattr(pipe.engine, 'add_request',
                        lambda ids, params, seq_id=None: seq_id if 333 in ids else add(ids, params, seq_id))
    steps = {'n': 0}
    step = pipe._step
    monkeypatch.setattr(pipe, '_step', lambda: steps.__setitem__('n', steps['n'] + 1) or step())

    async def main():
        return await asyncio.wait_for(asyncio.gather(_last(pipe, [1, 333], GOOD), _last(pipe, [1, 5, 6], GOOD)), 10)

    lost, fine = asyncio.run(main())
    assert lost.finish_reason == 'error' and 'the engine lost this request' in lost.error
    assert fine.finish_reason == 'length' and len(fine.token_ids) == 8
    assert steps['n'] <= 12
    nothing_lost(pipe)


def test_closing_the_pipeline_answers_its_async_callers(tiny, make_pipe):
    closing = make_pipe(tiny, num_gpu_blocks=16)

    async def main():
        waiting = asyncio.ensure_future(_last(closing, [1, 5, 6], GenerationConfig(max_new_tokens=500,
                                                                                    ignore_eos=True)))
        while not closing._active:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        closing.close()
        return await asyncio.wait_for(waiting, 10)

    last = asyncio.run(main())
    assert last.finish_reason == 'error' and 'closed' in last.error


def test_a_cancelled_driver_answers_its_async_callers(pipe, nothing_lost):
    async def main():
        waiting = asyncio.ensure_future(_last(pipe, [1, 5, 6], GenerationConfig(max_new_tokens=500,
                                                                                 ignore_eos=True)))
        while pipe._driver is None or pipe._driver.done():
            await asyncio.sleep(0.01)
        pipe._driver.cancel()
        return await asyncio.wait_for(waiting, 10)

    last = asyncio.run(main())
    assert last.finish_reason == 'error' and 'stopped serving async requests' in last.error
    nothing_lost(pipe)
