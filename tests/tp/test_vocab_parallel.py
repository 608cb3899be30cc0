"""Vocabulary-parallel embedding and lm_head, one rank at a time (simulated_tp: no processes): the ranks' lookups
sum to the whole lookup and their logits, concatenated, are the whole logits, for vocabularies that do not divide
too (the last rank's padding rows are zeros and cut off)."""
from unittest import mock

import torch
from hypothesis import given, settings, strategies as st

from lmdp.distributed import simulated_tp
from lmdp.nn import ParallelEmbedding, build_lm_head


@settings(max_examples=25)
@given(vocab=st.integers(5, 70), world=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_shards_make_up_the_whole_table(vocab, world, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = 8
    table = torch.randn(vocab, hidden, generator=g)
    ids = torch.randint(0, vocab, (11,), generator=g)
    x = torch.randn(3, hidden, generator=g)
    looked_up, logits = torch.zeros(11, hidden), []
    for rank in range(world):
        with simulated_tp(world, rank):
            emb = ParallelEmbedding(vocab, hidden, is_tp=True)
            head = build_lm_head(hidden, vocab)
        emb.weight_loader(emb.weight, table)
        head.weight_loader(head.weight, table)
        # each rank's forward with its collective (all-reduce / all-gather) left out: the test joins them
        with simulated_tp(world, rank), mock.patch('lmdp.nn.embedding.all_reduce', lambda t: t), \
                mock.patch('lmdp.nn.lm_head.all_gather', lambda t, dim: t):
            looked_up += emb(ids)
            logits.append(head(x))
        assert head.weight.size(0) == emb.weight.size(0) == -(-vocab // world)
    torch.testing.assert_close(looked_up, table[ids])
    torch.testing.assert_close(torch.cat(logits, -1)[:, :vocab], x @ table.T)
