"""Decode steps launched one ahead of the host give exactly what lock-step decoding gives."""
import random

from lmdp import GenerationConfig


def _run(pipe, overlap, prompts, gens):
    pipe.engine.overlap = overlap
    out = pipe(prompts, gen_config=gens, do_preprocess=False)
    assert pipe.engine.block_manager.num_used == 0 and pipe.engine._inflight is None
    return [(r.token_ids, r.finish_reason) for r in out]


def test_overlap_matches_lockstep(tiny2, make_pipe):
    rng = random.Random(0)
    prompts = [[rng.randrange(7, 500) for _ in range(rng.randrange(3, 40))] for _ in range(12)]
    pipe = make_pipe(tiny2, num_gpu_blocks=24, max_batch_size=6)     # tight: preemption happens too
    probe = pipe(prompts[:1], gen_config=GenerationConfig(max_new_tokens=8, ignore_eos=True),
                 do_preprocess=False)[0].token_ids
    gens = []
    for i in range(len(prompts)):
        kind = i % 4
        if kind == 0:      # a stop id the model actually draws: finishes where the host can't foresee it
            gens.append(GenerationConfig(max_new_tokens=20, stop_token_ids=[probe[3]], ignore_eos=True))
        elif kind == 1:    # seeded sampling: the noise key must follow the true position
            gens.append(GenerationConfig(max_new_tokens=15, do_sample=True, temperature=1.3, random_seed=i))
        elif kind == 2:    # min_new_tokens masks the stop ids for exactly the right steps
            gens.append(GenerationConfig(max_new_tokens=12, min_new_tokens=6, stop_token_ids=[probe[1]]))
        else:
            gens.append(GenerationConfig(max_new_tokens=rng.randrange(1, 25), ignore_eos=True))
    lockstep = _run(pipe, False, prompts, gens)
    ahead = _run(pipe, True, prompts, gens)
    assert ahead == lockstep
    assert any(reason == 'stop' for _, reason in ahead)


def test_overlap_reads_tokens_back_one_step_late(tiny2, make_pipe):
    pipe = make_pipe(tiny2)
    engine = pipe.engine
    from lmdp.engine.sequence import SamplingParams
    engine.add_request([5, 6, 7, 8], SamplingParams(max_new_tokens=5))
    first = engine.step()                 # the prefill: synchronous, draws token 1
    assert [o.token_id is not None for o in first] == [True]
    assert engine.step() == []            # decode launched; its token is read by the next call
    assert engine._inflight is not None
    got = engine.step()                   # launches the next decode, then returns the previous token
    assert len(got) == 1 and engine._inflight is not None
    while engine.has_unfinished():
        got += engine.step()
    assert got[-1].finish_reason == 'length' and len(got) == 4


def test_a_step_run_ahead_takes_blocks_only_when_all_its_sequences_get_theirs(tiny2, make_pipe):
    """Four sequences cross into their second block in the same step run ahead, with one block free: each alone
    would fit, all together do not. The step must not be run ahead then (a sequence left without its block would
    write its K/V into block 0, another sequence's), and the tokens stay those of a roomy pool."""
    rng = random.Random(3)
    prompts = [[rng.randrange(7, 500) for _ in range(15)] for _ in range(4)]    # 15 tokens + 1 drawn: one block
    gen = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    expected = make_pipe(tiny2, num_gpu_blocks=64)(prompts, gen_config=gen, do_preprocess=False)
    tight = make_pipe(tiny2, num_gpu_blocks=5, session_len=80)
    got = _run(tight, True, prompts, [gen] * 4)
    assert got == [(r.token_ids, r.finish_reason) for r in expected]
