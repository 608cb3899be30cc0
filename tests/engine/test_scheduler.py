"""The scheduler: token budget and chunked prefill, batch limit, preemption of the newest sequence."""
from lmdp.engine.scheduler import Scheduler
from lmdp.engine.sequence import SamplingParams, Sequence, SequenceStatus
from lmdp.paging import BlockManager


def make(num_blocks=16, block_size=4, max_batch_size=8, budget=32):
    return Scheduler(BlockManager(num_blocks, block_size), max_batch_size, budget)


def seq(i, n, max_new=100):
    return Sequence(i, list(range(1, n + 1)), n, SamplingParams(max_new_tokens=max_new))


def run(s, batch, token=7):
    """Complete a step as the engine would, drawing `token` for every sequence that reaches its end."""
    sampled = [token if q.num_cached + n == q.num_tokens else None for q, n in zip(batch.seqs, batch.num_new)]
    return s.update(batch, sampled, session_len=1000)


def test_prefill_first_within_the_token_budget_then_decode():
    s = make(budget=10)
    for i, n in enumerate([4, 5, 3]):
        s.add(seq(i, n))
    b = s.schedule()
    assert not b.is_decoding and [q.seq_id for q in b.seqs] == [0, 1] and b.num_new == [4, 5]
    run(s, b)
    b = s.schedule()
    assert not b.is_decoding and [q.seq_id for q in b.seqs] == [2]
    run(s, b)
    b = s.schedule()
    assert b.is_decoding and [q.seq_id for q in b.seqs] == [0, 1, 2] and b.num_new == [1, 1, 1]


def test_a_long_prompt_is_prefilled_in_chunks():
    s = make(num_blocks=32, budget=8)
    s.add(seq(0, 20))
    s.add(seq(1, 3))
    chunks = []
    while True:
        b = s.schedule()
        if b.is_decoding:
            break
        chunks.append([(q.seq_id, n) for q, n in zip(b.seqs, b.num_new)])
        run(s, b)
    assert chunks == [[(0, 8)], [(0, 8)], [(0, 4), (1, 3)]]
    assert [q.num_cached for q in b.seqs] == [20, 3]


def test_batch_limit():
    s = make(max_batch_size=2)
    for i in range(3):
        s.add(seq(i, 2))
    b = s.schedule()
    assert len(b.seqs) == 2
    run(s, b)
    assert s.schedule().is_decoding                            # the third waits for a free slot


def test_out_of_blocks_preempts_the_newest_and_recomputes_it():
    s = make(num_blocks=4, block_size=4)
    a, b = seq(0, 4), seq(1, 4)
    s.add(a)
    s.add(b)
    run(s, s.schedule())                                       # 2 blocks held, 2 free
    batch = s.schedule()                                       # both need a second block: fits
    assert batch.is_decoding and len(batch.seqs) == 2
    run(s, batch)
    for _ in range(3):
        run(s, s.schedule())                                   # 8 tokens each: all 4 blocks full
    batch = s.schedule()                                       # a needs a 3rd block: b makes room
    assert [q.seq_id for q in batch.seqs] == [0] and s.num_preemptions == 1
    assert b.status is SequenceStatus.WAITING and b.blocks == [] and b.num_cached == 0
    assert list(s.waiting) == [b]
    s.abort(a)
    batch = s.schedule()                                       # b comes back: prefill of all its 9 tokens
    assert not batch.is_decoding and batch.seqs == [b] and batch.num_new == [9]


def test_finishing_frees_the_blocks():
    s = make()
    a = seq(0, 3, max_new=2)
    s.add(a)
    run(s, s.schedule())
    finished = run(s, s.schedule())
    assert finished == [a] and a.finish_reason == 'length' and a.is_finished
    assert s.block_manager.num_used == 0 and not s.has_unfinished()
