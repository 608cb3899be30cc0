"""Soak: 2,000 requests of random valid and invalid settings, random lengths, random cancellations and poisoned
steps, through async callers and batch calls at once, on a KV pool a third too small for a full batch.

Every valid request that runs to its end gives exactly what it gives alone; a cancelled one gave a prefix of that;
every invalid or poisoned one ends in an error naming its fault; and at the end the pool is whole and the engine
holds nothing.
"""
import asyncio
import contextlib
import math
import random
import time
from dataclasses import dataclass, field

import pytest

from lmdp import GenerationConfig

N = 2000
MAX_BATCH = 32
MAX_PROMPT, MAX_NEW = 40, 8
POISON_SEED = 10**12          # seeds from here on fail in the sampler once that many tokens were drawn


@dataclass
class Req:
    kind: str                 # 'valid', 'invalid' or 'poison'
    prompt: object
    gen: GenerationConfig
    fault: str = ''           # words the error must hold
    stop_after: int = -1      # pieces after which an async caller stops listening (-1: never)
    cancel_after: float = -1  # seconds after which the caller's task is cancelled (-1: never)
    via_batch: bool = False
    tokens: list = field(default_factory=list)
    text: str = ''
    finish: object = None
    error: object = None
    cancelled: bool = False


def _valid_gen(rng: random.Random) -> GenerationConfig:
    g = GenerationConfig(max_new_tokens=rng.randint(1, MAX_NEW), ignore_eos=rng.random() < 0.7,
                         min_new_tokens=rng.choice([None, 0, 2]))
    if rng.random() < 0.3:
        g.stop_token_ids = rng.sample(range(7, 512), 3)
    if rng.random() < 0.4:                              # seeded sampling repeats exactly, whatever the batch
        g.do_sample, g.random_seed = True, rng.randrange(10**9)
        g.temperature = rng.choice([0.6, 1.0, 1.3])
        # one top_k for every sampled request: a batch mixing top_k=0 with top_k>0 (and top_p=1) skips top-k
        # filtering altogether, the sampler bug issue 20 fixes; vary it here once that fix is in
        g.top_k, g.top_p, g.min_p = 40, rng.choice([1.0, 0.8]), rng.choice([0.0, 0.05])
    if rng.random() < 0.15:
        g.repetition_penalty = 1.3
    if rng.random() < 0.1:
        g.stop_words = ['e']
    return g


def _corrupt(g: GenerationConfig, name: str, value) -> GenerationConfig:
    object.__setattr__(g, name, value)       # as if changed behind the checks' back
    return g


INVALID = [
    (lambda rng, p: (p, GenerationConfig(stop_token_ids=[512 + rng.randrange(10**5)], min_new_tokens=2)),
     'outside the vocabulary'),
    (lambda rng, p: (p, _corrupt(GenerationConfig(max_new_tokens=4), 'random_seed', 1.5)), 'random_seed'),
    (lambda rng, p: (p, _corrupt(GenerationConfig(max_new_tokens=4), 'temperature', '0.5')), 'temperature'),
    (lambda rng, p: (p, _corrupt(GenerationConfig(max_new_tokens=4), 'top_p', 0.0)), 'top_p'),
    (lambda rng, p: (p + [512 + rng.randrange(1000)], GenerationConfig(max_new_tokens=4)), 'outside the vocabulary'),
    (lambda rng, p: ([], GenerationConfig(max_new_tokens=4)), 'prompt is empty'),
    (lambda rng, p: ([1] * 1100, GenerationConfig(max_new_tokens=4)), 'session_len'),
    (lambda rng, p: (p[:1] + [True] + p[1:], GenerationConfig(max_new_tokens=4)), 'bool'),
    (lambda rng, p: ('text \ud800 here', GenerationConfig(max_new_tokens=4)), 'not valid Unicode'),
]


def _requests(seed: int = 12):
    rng = random.Random(seed)
    heads = [[1] + [rng.randrange(7, 512) for _ in range(rng.randint(16, 30))] for _ in range(4)]
    reqs = []
    for i in range(N):
        length = rng.randint(2, MAX_PROMPT)
        prompt = [1] + [rng.randrange(7, 512) for _ in range(length - 1)]
        if rng.random() < 0.3:                           # shares a head with others: prefix-cache hits
            head = rng.choice(heads)
            prompt = (head + prompt[1:])[:MAX_PROMPT]
        roll = rng.random()
        if roll < 0.2:
            make, fault = rng.choice(INVALID)
            p, g = make(rng, prompt)
            reqs.append(Req('invalid', p, g, fault))
        elif roll < 0.27:
            g = GenerationConfig(max_new_tokens=MAX_NEW, ignore_eos=True, do_sample=rng.random() < 0.5,
                                 random_seed=POISON_SEED + rng.randrange(MAX_NEW))
            reqs.append(Req('poison', prompt, g, 'poisoned at token'))
        else:
            reqs.append(Req('valid', prompt, _valid_gen(rng)))
        r = reqs[-1]
        r.via_batch = rng.random() < 0.2
        if not r.via_batch and rng.random() < 0.15:
            if rng.random() < 0.5:
                r.stop_after = rng.randint(0, 3)
            else:
                r.cancel_after = rng.random() * 0.5
    return reqs


def _poisoned_sampler(sampler):
    prepare = sampler.prepare

    def poisoned(seqs, ahead=0):
        for s in seqs:
            if s.params.seed >= POISON_SEED and s.num_generated + ahead >= s.params.seed - POISON_SEED:
                raise RuntimeError(f'poisoned at token {s.num_generated + ahead}')
        return prepare(seqs, ahead)
    return poisoned


async def _consume(pipe, r: Req):
    pieces = 0
    async with contextlib.aclosing(pipe.generate(r.prompt, r.gen)) as stream:
        async for piece in stream:
            r.tokens += piece.token_ids
            r.text += piece.text
            r.finish, r.error = piece.finish_reason, piece.error
            pieces += 1
            if pieces == r.stop_after and piece.finish_reason is None:
                r.cancelled = True
                return


async def _run_all(pipe, reqs):
    batch = [r for r in reqs if r.via_batch]
    chunks = [batch[i::4] for i in range(4)]

    async def batch_call(chunk):
        out = await asyncio.to_thread(pipe, [r.prompt for r in chunk], [r.gen for r in chunk])
        for r, resp in zip(chunk, out):
            r.tokens, r.text, r.finish, r.error = resp.token_ids, resp.text, resp.finish_reason, resp.error

    async def cancel_later(task, r):
        await asyncio.sleep(r.cancel_after)
        if not task.done():
            r.cancelled = True
            task.cancel()

    tasks = []
    for r in reqs:
        if r.via_batch:
            continue
        task = asyncio.ensure_future(_consume(pipe, r))
        tasks.append(task)
        if r.cancel_after >= 0:
            tasks.append(asyncio.ensure_future(cancel_later(task, r)))
    results = await asyncio.gather(*tasks, *(batch_call(c) for c in chunks), return_exceptions=True)
    unexpected = [e for e in results if isinstance(e, BaseException) and not isinstance(e, asyncio.CancelledError)]
    assert not unexpected, f'{len(unexpected)} callers got an exception: {unexpected[:3]}'


@pytest.mark.slow
def test_soak_2000_requests(tiny, make_pipe, nothing_lost, monkeypatch):
    reqs = _requests()
    blocks_per_request = math.ceil((MAX_PROMPT + MAX_NEW) / 16)
    pool = MAX_BATCH * blocks_per_request * 2 // 3           # a third too small for a full batch at full length
    pipe = make_pipe(tiny, num_gpu_blocks=pool, max_batch_size=MAX_BATCH, enable_prefix_caching=True,
                     max_prefill_token_num=512)
    monkeypatch.setattr(pipe.engine.sampler, 'prepare', _poisoned_sampler(pipe.engine.sampler))

    start, cpu = time.perf_counter(), time.process_time()
    asyncio.run(asyncio.wait_for(_run_all(pipe, reqs), timeout=600))
    served, served_cpu = time.perf_counter() - start, time.process_time() - cpu

    solo = make_pipe(tiny, num_gpu_blocks=64, max_batch_size=1)
    start, cpu = time.perf_counter(), time.process_time()
    checked = 0
    for r in reqs:
        if r.kind != 'valid':
            if r.cancelled and r.finish is None:
                continue                      # its caller left before the fault came up
            assert r.finish == 'error' and r.fault in r.error, (r.kind, r.prompt, r.gen, r.error)
            continue
        alone = solo(r.prompt, r.gen)
        if r.cancelled:
            assert r.finish in (None, 'abort', alone.finish_reason)
            assert alone.token_ids[:len(r.tokens)] == r.tokens, 'a cancelled request drew other tokens'
            continue
        assert (r.tokens, r.text, r.finish) == (alone.token_ids, alone.text, alone.finish_reason), \
            f'request {reqs.index(r)} ({r.gen}) differs from its solo run'
        checked += 1
    solo_s, solo_cpu = time.perf_counter() - start, time.process_time() - cpu

    counts = {k: sum(r.kind == k for r in reqs) for k in ('valid', 'invalid', 'poison')}
    cancelled = sum(r.cancelled for r in reqs)
    engine = pipe.engine
    print(f'\nsoak: {counts}, {cancelled} cancelled, {checked} checked against solo runs; served in {served:.1f} s '
          f'({served_cpu:.1f} s CPU), solo runs {solo_s:.1f} s ({solo_cpu:.1f} s CPU); '
          f'{engine.scheduler.num_preemptions} preemptions, {engine.block_manager.stats.hit_blocks} prefix-cache '
          f'block hits, pool {pool} blocks')
    assert engine.scheduler.num_preemptions > 0, 'the pool was not tight enough to preempt'
    assert cancelled > 50 and counts['poison'] > 50 and counts['invalid'] > 200 and checked > 1000
    nothing_lost(pipe)
    assert pipe._driver is None or pipe._driver.done()
