"""Mixed prefill on the real engine (tiny llama, CPU): prompt chunks ride along with the running decodes.

The scheduler's own rules (budget, order, no starvation, block accounting) are properties in
test_scheduler_properties.py, over a stand-in model; here the model is real and the engine's step loop (overlap,
sampling of the last row only, aborts) runs.
"""
import random

import pytest

from lmdp import GenerationConfig
from lmdp.engine.sequence import SamplingParams

pytest.importorskip('hypothesis', reason='the property tests need hypothesis (the [test] extra)')
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

BLOCK = 16


@pytest.fixture(scope='module')
def tight_pipe(tiny2, make_pipe):
    """A pool of 24 blocks (384 tokens): the workloads below preempt now and then."""
    return make_pipe(tiny2, num_gpu_blocks=24, max_batch_size=8, session_len=384)


def _run(pipe, mixed, budget, prompts, gens):
    engine = pipe.engine
    engine.scheduler.mixed_prefill = mixed
    engine.scheduler.max_prefill_token_num = budget
    before = engine.stats.mixed_steps
    out = pipe(prompts, gen_config=gens, do_preprocess=False)
    assert engine.block_manager.num_used == 0 and not engine.scheduler.has_unfinished()
    return [(r.token_ids, r.finish_reason) for r in out], engine.stats.mixed_steps - before


@st.composite
def workloads(draw):
    rng = random.Random(draw(st.integers(0, 1 << 16)))
    n = draw(st.integers(2, 7))
    # short prompts and a few long ones (several chunks under the smaller budgets)
    prompts = [[rng.randrange(7, 500) for _ in range(rng.choice([rng.randrange(2, 20), rng.randrange(40, 120)]))]
               for _ in range(n)]
    gens = [GenerationConfig(max_new_tokens=rng.randrange(1, 24), ignore_eos=True) for _ in range(n)]
    return prompts, gens, draw(st.sampled_from([8, 24, 64, 512]))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workloads())
def test_mixing_gives_every_request_the_tokens_it_gets_without(tight_pipe, workload):
    prompts, gens, budget = workload
    plain, _ = _run(tight_pipe, False, budget, prompts, gens)
    mixed, mixed_steps = _run(tight_pipe, True, budget, prompts, gens)
    assert mixed == plain
    event(f'mixed steps: {mixed_steps > 0}')


def test_a_long_prompt_does_not_stall_the_running_requests(tiny2, make_pipe):
    """A 200-token prompt arrives while two requests decode; under a 32-token budget it takes 7 steps to prefill.
    With mixing, both running requests draw a token in each of those steps; without, they wait them all out."""
    stalls = {}
    for mixed in (True, False):
        engine = make_pipe(tiny2, max_prefill_token_num=32, mixed_prefill=mixed).engine
        params = SamplingParams(max_new_tokens=40)
        short = [engine.add_request([1, 9, 17, 30 + i], params) for i in range(2)]
        while not {o.seq_id for o in engine.step()} >= set(short):
            pass                                            # the short ones are prefilled and decoding
        long_id = engine.add_request([1] + [7 + i % 400 for i in range(199)], params)
        steps = 0
        missed = 0
        while True:
            drew = {o.seq_id for o in engine.step() if o.token_id is not None}
            steps += 1
            missed += sum(s not in drew for s in short)
            if long_id in drew:
                break
        stalls[mixed] = missed
        assert steps >= 200 // 32
        engine.abort_all()
    assert stalls[True] == 0
    assert stalls[False] >= 2 * 6, 'prefill first should have stalled the decodes (the test shows nothing else)'


def test_aborting_a_prompt_part_way_through_its_chunks(tiny2, make_pipe):
    """The long prompt is aborted between two of its chunks; the running requests go on and the pool empties."""
    pipe = make_pipe(tiny2, max_prefill_token_num=16, mixed_prefill=True)
    engine = pipe.engine
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    short = [[1, 9, 17, 31], [1, 12, 40]]
    expected = [r.token_ids for r in pipe(short, gen_config=gen, do_preprocess=False)]
    params = engine.sampling_params(gen)
    ids = [engine.add_request(p, params) for p in short]
    got = {i: [] for i in ids}
    aborted = False

    def step():
        nonlocal aborted
        for o in engine.step():
            if o.seq_id == long_id:
                assert o.token_id is None and o.finish_reason == 'abort'
                aborted = True
            elif o.token_id is not None:
                got[o.seq_id].append(o.token_id)
    long_id = None
    step()
    long_id = engine.add_request([1] + [7 + i for i in range(100)], params)
    step()
    step()
    assert engine.stats.mixed_steps > 0 and engine.scheduler.waiting, 'the long prompt is part-way through'
    engine.abort(long_id)
    while engine.has_unfinished():
        step()
    assert aborted
    assert [got[i] for i in ids] == expected
    assert engine.block_manager.num_used == 0


@pytest.mark.gpu
@pytest.mark.skipif(not __import__('torch').cuda.is_available(), reason='needs CUDA')
def test_gpu_mixed_steps_run_eagerly_and_decode_only_steps_still_replay_graphs(tmp_path):
    """Prompts arrive while others decode. Mixed steps run eagerly (decode rows on the decode kernel), the
    decode-only steps between them replay CUDA graphs, and every request's greedy tokens equal those of an eager
    engine that never mixes. float32: the batches differ between the two, and in bfloat16 a random tiny model's
    near-ties would flip on the GEMMs' batch-dependent rounding."""
    from lmdp import PytorchEngineConfig, pipeline
    from lmdp.tiny import make_tiny
    path = str(make_tiny('llama', tmp_path / 'tl', dtype='float32'))
    rng = random.Random(7)
    prompts = [[rng.randrange(7, 500) for _ in range(rng.randrange(5, 300))] for _ in range(12)]
    gens = [GenerationConfig(max_new_tokens=rng.randrange(8, 40), ignore_eos=True) for _ in prompts]
    outs, counts = {}, {}
    for eager, mixed in ((True, False), (False, True)):
        cfg = PytorchEngineConfig(dtype='float32', session_len=512, max_batch_size=8, num_gpu_blocks=64,
                                  max_prefill_token_num=128, eager_mode=eager, mixed_prefill=mixed,
                                  cudagraph_capture_batch_sizes=[1, 2, 4, 8])
        pipe = pipeline(path, backend_config=cfg)
        runner = pipe.engine.runner
        replays = []
        replay = runner.replay
        runner.replay = lambda inputs: replays.append(1) or replay(inputs)
        outs[mixed] = [r.token_ids for r in pipe(prompts, gen_config=gens, do_preprocess=False)]
        counts[mixed] = (len(replays), pipe.engine.stats.mixed_steps)
        pipe.close()
    assert counts[True][0] > 0 and counts[True][1] > 0, counts
    assert outs[True] == outs[False]
