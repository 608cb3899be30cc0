"""A sequence's counters: the block manager and scheduler size everything from them."""
from lmdp.engine.sequence import SamplingParams, Sequence, SequenceStatus


def test_counters_follow_the_tokens_and_the_cache():
    seq = Sequence(3, [5, 6, 7], 3, SamplingParams(max_new_tokens=4))
    assert (seq.num_tokens, seq.num_generated, seq.num_uncached) == (3, 0, 3)
    seq.token_ids += [8, 9]
    seq.num_cached = 4
    assert (seq.num_tokens, seq.num_generated, seq.num_uncached) == (5, 2, 1)
    assert not seq.is_finished
    seq.status = SequenceStatus.RUNNING
    assert not seq.is_finished
    seq.status = SequenceStatus.FINISHED
    assert seq.is_finished
