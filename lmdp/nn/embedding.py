"""Token embeddings, split over the vocabulary under tensor parallelism."""
import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce, get_tp_world_rank, vocab_per_rank
from ..weight_loader.loaders import check_shape, set_weight_loader
from ..weight_loader.tracker import record_load


class VocabShard:
    """Rows `[start, start + size)` of a `[vocab, ...]` table: this rank's slice of the vocabulary. Each rank holds
    `vocab_per_rank` rows; where the vocabulary does not divide, the last rank's extra rows are zeros."""

    def __init__(self, vocab_size: int, is_tp: bool):
        self.vocab_size = vocab_size
        self.tp_world, self.tp_rank = get_tp_world_rank() if is_tp else (1, 0)
        self.rows = vocab_per_rank(vocab_size, self.tp_world)
        self.start = min(self.tp_rank * self.rows, vocab_size)
        self.size = min(self.rows, vocab_size - self.start)

    def load(self, param, loaded_weight: torch.Tensor):
        """Copy this rank's rows of a full checkpoint table into `param` (`[rows, ...]`), zeros past the end."""
        check_shape(param, (self.vocab_size, *param.shape[1:]), loaded_weight)
        with torch.no_grad():
            param[:self.size].copy_(loaded_weight.narrow(0, self.start, self.size).to(param.dtype))
            param[self.size:].zero_()
        record_load(param)


class ParallelEmbedding(nn.Module):
    """`weight[input_ids]`; with `is_tp` each rank holds a slice of the vocabulary and the results are summed.

    `padding_size` and `layer_type` are lmdeploy's (vocabulary padding for uneven splits, per-layer TP groups) and
    change nothing here (an uneven vocabulary is padded on the last rank); `force_dtype` keeps the table in that
    dtype (the output is cast to `dtype`).
    """

    def __init__(self, vocab_size: int, hidden_size: int, padding_idx: int = None, dtype=None, device=None,
                 is_tp: bool = False, padding_size: int = 64, layer_type: str = 'attn', force_dtype=None):
        super().__init__()
        self.shard = VocabShard(vocab_size, is_tp)
        self.tp_world, self.tp_rank = self.shard.tp_world, self.shard.tp_rank
        self.vocab_size, self.padding_idx = vocab_size, padding_idx
        self.out_dtype = dtype if force_dtype is not None else None
        self.start = self.shard.start
        self.weight = nn.Parameter(torch.empty(self.shard.rows, hidden_size, dtype=force_dtype or dtype,
                                               device=device), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param, loaded_weight):
        self.shard.load(param, loaded_weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_world == 1:
            out = F.embedding(input_ids, self.weight)
        else:
            # each rank looks up the ids in its slice and zeroes the others; the sum over ranks is the lookup
            local = input_ids - self.start
            inside = (local >= 0) & (local < self.shard.size)
            out = F.embedding(local.clamp(0, self.weight.size(0) - 1), self.weight) * inside.unsqueeze(-1)
            out = all_reduce(out)
        return out if self.out_dtype is None else out.to(self.out_dtype)


def build_embedding(vocab_size, hidden_size, padding_idx=None, dtype=None, device=None, is_tp=False):
    return ParallelEmbedding(vocab_size, hidden_size, padding_idx, dtype, device, is_tp)
