"""The output projection to the vocabulary, split over the vocabulary under tensor parallelism."""

import torch
from torch import nn

from .. import kernels
from ..distributed import all_gather
from ..weight_loader.loaders import set_weight_loader
from .embedding import VocabShard


class ParallelLMHead(nn.Module):
    """`logits = x W^T (+ b)`, W `[vocab, hidden]`. With `is_tp` each rank holds the rows of its slice of the
    vocabulary (the same rows as a vocabulary-parallel `ParallelEmbedding`, so the two may share one weight: tied
    embeddings), computes its slice of the logits, and every rank gets the whole `[..., vocab]` by an all-gather.
    """

    def __init__(self, in_features: int, vocab_size: int, bias: bool = False, dtype=None, device=None,
                 is_tp: bool = True):
        super().__init__()
        self.shard = VocabShard(vocab_size, is_tp)
        self.in_features, self.out_features = in_features, vocab_size
        self.weight = nn.Parameter(torch.empty(self.shard.rows, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.shard.rows, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        for p in self.parameters():
            set_weight_loader(p, self.weight_loader)

    def weight_loader(self, param, loaded_weight):
        self.shard.load(param, loaded_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = kernels.linear(x, self.weight, self.bias)
        if self.shard.tp_world == 1:
            return logits
        return all_gather(logits, dim=-1)[..., :self.out_features]

    def extra_repr(self):
        return (f'in_features={self.in_features}, vocab={self.out_features}, rows_per_rank={self.shard.rows}, '
                f'bias={self.bias is not None}')


def build_lm_head(in_features: int, vocab_size: int, bias: bool = False, dtype=None, device=None,
                  is_tp: bool = True, quant_config: object | None = None) -> ParallelLMHead:
    """The vocabulary projection; vocabulary-parallel under tensor parallelism (never quantised)."""
    return ParallelLMHead(in_features, vocab_size, bias, dtype, device, is_tp)
