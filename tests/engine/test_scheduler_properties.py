"""The scheduler, block manager and step packing, run against a stand-in model that reads its KV cache (hypothesis).

The stand-in keeps, in each KV slot, what a real layer's K/V at that position depends on: the token, its position
and everything before it (it reads the previous slot through the block table, as attention does). Where a
sequence samples, it reads the whole history back through that table: whatever the batching, chunking,
preemption, prefix sharing and eviction did, a sequence must find exactly the entries its own tokens make, and
every request must end with the tokens it would have made alone. The rules the scheduler promises are checked at
every step: the token budget, the batch limit, one chunked prompt per step at most, preemption of the newest
running sequences, and block accounting. Both scheduling policies run: prefill first, and mixed prefill (every
running sequence decodes in every step, prompt chunks ride along), whose extra rules are checked too: no running
sequence misses a step unless it was preempted, and no prompt waits while the budget and the pool have room for it.
"""
import types

import pytest
import torch

from lmdp.engine.model_runner import ModelRunner
from lmdp.engine.scheduler import Scheduler
from lmdp.engine.sequence import SamplingParams, Sequence, SequenceStatus
from lmdp.model_inputs import ModelInputs, StepContext
from lmdp.paging import BlockManager

pytest.importorskip('hypothesis', reason='the property tests need hypothesis (the [test] extra)')
from hypothesis import event, given, settings, strategies as st  # noqa: E402

VOCAB = 5      # few distinct tokens: prompts share prefixes, so prefix caching finds blocks to share


def next_token(tokens):
    """The stand-in model: a deterministic function of the whole history it was given."""
    return hash(tuple(tokens)) % VOCAB


def alone(prompt, params, session_len):
    """What a request makes with nothing else running: (new tokens, finish reason)."""
    tokens = list(prompt)
    while True:
        token = next_token(tokens)
        tokens.append(token)
        if token in params.stop_ids:
            return tokens[len(prompt):], 'stop'
        if len(tokens) - len(prompt) >= params.max_new_tokens or len(tokens) >= session_len:
            return tokens[len(prompt):], 'length'


def kv_entry(previous, token, position):
    """What the stand-in writes for a token: a digest of the token, its position and the entry before it."""
    return hash((previous, token, position))


def kv_entries(tokens):
    """The entries a sequence's tokens make, position by position."""
    out, previous = [], None
    for position, token in enumerate(tokens):
        previous = kv_entry(previous, token, position)
        out.append(previous)
    return out


class PagedStandIn:
    """Runs scheduled steps through the engine's packing (`ModelRunner.prepare_inputs`, `StepContext.new`) over a
    paged KV cache of `kv_entry` digests, slot by slot."""

    def __init__(self, block_size, max_blocks_per_seq):
        self.block_size = block_size
        self.kv = {}
        self.runner = ModelRunner(types.SimpleNamespace(device=torch.device('cpu')), None, max_blocks_per_seq)

    def step(self, batch):
        inputs = self.runner.prepare_inputs(batch)
        ctx = StepContext.new(inputs)
        self._check_against_make(batch, ctx)
        bs, ids = self.block_size, ctx.input_ids[0].tolist()
        sampled = []
        for b, seq in enumerate(batch.seqs):
            table = ctx.block_offsets[b].tolist()
            start, n = ctx.q_start_loc[b].item(), ctx.q_seqlens[b].item()
            for i in range(start, start + n):
                pos = ctx.position_ids[0, i].item()
                previous = self.kv.get((table[(pos - 1) // bs], (pos - 1) % bs)) if pos else None
                self.kv[table[pos // bs], pos % bs] = kv_entry(previous, ids[i], pos)
            kv_len = ctx.kv_seqlens[b].item()
            if kv_len < seq.num_tokens:
                sampled.append(None)          # a chunk short of the prompt's end: nothing to sample yet
                continue
            history = [self.kv.get((table[p // bs], p % bs)) for p in range(kv_len)]
            assert history == kv_entries(seq.token_ids), f'seq {seq.seq_id} reads another history from its blocks'
            sampled.append(next_token(seq.token_ids))
        return sampled

    @staticmethod
    def _check_against_make(batch, ctx):
        """`ModelInputs.make`, the other packer (the step runner's), packs the same step the same way."""
        new = [s.token_ids[s.num_cached:s.num_cached + n] for s, n in zip(batch.seqs, batch.num_new)]
        made = StepContext.new(ModelInputs.make(new, [s.num_cached for s in batch.seqs],
                                                [s.blocks for s in batch.seqs], batch.is_decoding))
        for name in ('input_ids', 'position_ids', 'q_seqlens', 'kv_seqlens', 'q_start_loc', 'history_lengths'):
            assert torch.equal(getattr(made, name).long(), getattr(ctx, name).long()), name
        assert (made.max_q_seqlen, made.max_kv_seqlen, made.is_decoding) == \
            (ctx.max_q_seqlen, ctx.max_kv_seqlen, ctx.is_decoding)
        # sum_kv_seqlen sizes the prefill kernels' packed K/V: a mixed step's leading decode rows are not theirs
        prefill_rows = 0 if batch.is_decoding else batch.num_decodes
        assert ctx.sum_kv_seqlen == sum(made.kv_seqlens[prefill_rows:].tolist())
        assert made.sum_kv_seqlen == sum(made.kv_seqlens.tolist())
        for b, seq in enumerate(batch.seqs):
            width = len(seq.blocks)
            assert made.block_offsets[b, :width].tolist() == ctx.block_offsets[b, :width].tolist() == seq.blocks


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    num_blocks = draw(st.integers(2, 12))
    session_len = draw(st.just(num_blocks * block_size) | st.integers(2, num_blocks * block_size))
    heads = draw(st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=9), min_size=1, max_size=3))
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        prompt = draw(st.sampled_from(heads)) + draw(st.lists(st.integers(0, VOCAB - 1), max_size=6))
        prompt = (prompt or [0])[:session_len - 1]
        stop = draw(st.frozensets(st.integers(0, VOCAB - 1), max_size=1))
        requests.append((prompt, SamplingParams(max_new_tokens=draw(st.integers(1, 12)), stop_ids=stop)))
    return dict(block_size=block_size, num_blocks=num_blocks, session_len=session_len, requests=requests,
                caching=draw(st.booleans()), shuffle=draw(st.none() | st.integers(0, 3)),
                max_batch_size=draw(st.integers(1, 8)), budget=draw(st.integers(1, 16)), mixed=draw(st.booleans()),
                arrivals=draw(st.lists(st.integers(0, 3), min_size=len(requests), max_size=len(requests))),
                aborts=draw(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 7)), max_size=2)))


def check_held_blocks(bm, seqs):
    """The pool counts as used exactly the blocks sequences hold; a sequence holds blocks for its cached tokens."""
    held = {b for s in seqs for b in s.blocks}
    assert bm.num_used == len(held), f'{bm.num_used} blocks in use, sequences hold {len(held)}'
    for s in seqs:
        assert s.num_cached <= len(s.blocks) * bm.block_size and len(s.blocks) <= bm.blocks_for(s.num_tokens)
        assert len(s.block_hashes) <= s.num_cached // bm.block_size


def simulate(w):
    """Run workload `w` to the end through the scheduler and the stand-in, checking the rules at every step."""
    bs, session_len = w['block_size'], w['session_len']
    bm = BlockManager(w['num_blocks'], bs, w['caching'], shuffle_seed=w['shuffle'])
    taken = []                        # the prefix length of every allocation, for the hit counts
    allocate = bm.allocate

    def counting_allocate(seq, num_tokens, prefix=()):
        if bm.enable_prefix_caching and not seq.blocks:
            # a prompt takes every cached block of its prefix there is (but always computes its last token)
            assert list(prefix) == bm.match_prefix(seq), 'a cached prefix was left unused'
        done = allocate(seq, num_tokens, prefix)
        taken.extend([len(prefix)] if done else [])
        return done
    bm.allocate = counting_allocate
    sched = Scheduler(bm, w['max_batch_size'], w['budget'], mixed_prefill=w['mixed'])
    model = PagedStandIn(bs, -(-session_len // bs))
    seqs = [Sequence(i, list(p), len(p), params) for i, (p, params) in enumerate(w['requests'])]
    arrive = {}
    for seq, t in zip(seqs, w['arrivals']):
        arrive.setdefault(t, []).append(seq)
    aborts = {t: seqs[i % len(seqs)] for t, i in w['aborts']}
    aborted = set()
    for t in range(100 * sum(len(s.token_ids) + s.params.max_new_tokens for s in seqs)):
        for seq in arrive.pop(t, []):
            sched.add(seq)
        if t in aborts and not aborts[t].is_finished and aborts[t] in sched.waiting + sched.running:
            sched.abort(aborts[t])
            aborted.add(aborts[t].seq_id)
            assert aborts[t].finish_reason == 'abort' and not aborts[t].blocks
        if not sched.has_unfinished():
            if not arrive:
                break
            continue
        running_before, waiting_before = list(sched.running), list(sched.waiting)
        batch = sched.schedule()
        assert batch is not None, 'nothing can run although the pool holds a whole session'
        assert isinstance(batch.is_decoding, bool)
        assert len(batch.seqs) <= w['max_batch_size']
        d = batch.num_decodes
        assert batch.num_new[:d] == [1] * d and sum(batch.num_new[d:]) <= w['budget']
        if w['mixed'] and running_before:
            # the running sequences all decode, but for those that had to make room; then the whole pool is
            # theirs and no prompt rides along; a prefill-only step only when every one of them had to go
            assert d > 0 or not sched.running
            if d < len(running_before):
                assert len(batch.seqs) == d or d == 0
        if w['mixed'] and d and not batch.is_decoding:
            event('a mixed step')
            assert batch.seqs[:d] == running_before, 'a running sequence missed a mixed step'
            prompts = batch.seqs[d:]
            assert prompts == waiting_before[:len(prompts)], 'prompts ride along in arrival order'
            assert all(s.num_cached + n == s.num_tokens for s, n in zip(prompts[1:], batch.num_new[d + 1:]))
            assert list(sched.running) == running_before
        elif batch.is_decoding:
            # decode: the oldest running sequences run; those that had to make room are the newest, and they
            # wait at the head of the queue in the order they ran
            n = len(batch.seqs)
            assert batch.seqs == running_before[:n] and batch.num_new == [1] * n
            assert list(sched.waiting) == running_before[n:] + waiting_before
            assert sched.num_preemptions >= len(running_before) - n
        else:
            assert sum(batch.num_new) <= w['budget']
            assert len(batch.seqs) + len(sched.running) <= w['max_batch_size']
            ends = [s.num_cached + n == s.num_tokens for s, n in zip(batch.seqs, batch.num_new)]
            if not ends[0]:
                event('a prompt prefilled in chunks')
            assert all(ends[1:]), 'only the first prompt of a prefill step may be cut short'
            # prompts join in arrival order; when no decode could run either, the newest running sequences were
            # preempted to make room, and they are first in line
            j = len(sched.running)
            assert list(sched.running) == running_before[:j]
            assert batch.seqs == (running_before[j:] + waiting_before)[:len(batch.seqs)]
        assert all(s.status is not SequenceStatus.FINISHED for s in batch.seqs)
        sampled = model.step(batch)
        sched.update(batch, sampled, session_len)
        check_held_blocks(bm, [s for s in seqs if not s.is_finished])
        assert all(s.status is SequenceStatus.RUNNING for s in sched.running)
        assert all(s.status is SequenceStatus.WAITING for s in sched.waiting)
    else:
        raise AssertionError('the requests did not finish')
    assert bm.num_used == 0 and not sched.running and not sched.waiting
    assert (bm.stats.hit_blocks, bm.stats.hit_tokens) == (sum(taken), sum(taken) * bs)
    # what the example exercised (pytest --hypothesis-show-statistics)
    event(f'preempted: {sched.num_preemptions > 0}')
    event(f'prefix hits: {bm.stats.hit_blocks > 0}')
    event(f'aborted: {bool(aborted)}')
    for seq, (prompt, params) in zip(seqs, w['requests']):
        tokens, reason = alone(prompt, params, session_len)
        got = seq.token_ids[len(prompt):]
        if seq.seq_id in aborted:
            assert seq.finish_reason == 'abort' and got == tokens[:len(got)]
        else:
            assert (got, seq.finish_reason) == (tokens, reason)
    return sched, bm


@settings(max_examples=150)
@given(workloads())
def test_any_schedule_gives_each_request_its_own_tokens_and_keeps_the_rules(w):
    simulate(w)


@st.composite
def pressed_workloads(draw):
    """Several short prompts that arrive at once and grow far past a pool that holds one session: preemption."""
    num_blocks = draw(st.integers(6, 10))
    requests = [(draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=2)),
                 SamplingParams(max_new_tokens=draw(st.integers(6, 16))))
                for _ in range(draw(st.integers(3, 6)))]
    return dict(block_size=1, num_blocks=num_blocks, session_len=num_blocks, requests=requests,
                caching=draw(st.booleans()), shuffle=None, max_batch_size=8, budget=16, mixed=draw(st.booleans()),
                arrivals=[0] * len(requests), aborts=[])


@settings(max_examples=60)
@given(pressed_workloads())
def test_under_memory_pressure_the_newest_sequences_make_room(w):
    sched, _ = simulate(w)
    assert sched.num_preemptions > 0


@st.composite
def cached_workloads(draw):
    """Prompts that share long heads and arrive over time, with prefix caching on: hits, revivals, evictions."""
    block_size = draw(st.sampled_from([1, 2]))
    num_blocks = draw(st.integers(6, 16))
    heads = draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=3, max_size=8), min_size=1, max_size=2))
    requests = [((draw(st.sampled_from(heads)) + draw(st.lists(st.integers(0, VOCAB - 1), max_size=3)))
                 [:num_blocks * block_size - 1], SamplingParams(max_new_tokens=draw(st.integers(1, 6))))
                for _ in range(draw(st.integers(3, 8)))]
    return dict(block_size=block_size, num_blocks=num_blocks, session_len=num_blocks * block_size,
                requests=requests, caching=True, shuffle=None, max_batch_size=draw(st.integers(1, 4)),
                mixed=draw(st.booleans()),
                budget=draw(st.integers(2, 16)),
                arrivals=draw(st.lists(st.integers(0, 8), min_size=len(requests), max_size=len(requests))), aborts=[])


@settings(max_examples=60)
@given(cached_workloads())
def test_prefix_caching_shares_blocks_only_between_equal_prefixes(w):
    """Each sequence reads its own tokens back (checked in `simulate`), through blocks other prompts computed."""
    simulate(w)
