"""Token embeddings, split over the vocabulary under tensor parallelism."""
import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_reduce, get_tp_world_rank
from ..weight_loader.loaders import default_weight_loader, set_weight_loader, split_for_rank


class ParallelEmbedding(nn.Module):
    """`weight[input_ids]`; with `is_tp` each rank holds a slice of the vocabulary and the results are summed.

    `padding_size` and `layer_type` are lmdeploy's (vocabulary padding for uneven splits, per-layer TP groups) and
    change nothing here; `force_dtype` keeps the table in that dtype (the output is cast to `dtype`).
    """

    def __init__(self, vocab_size: int, hidden_size: int, padding_idx: int = None, dtype=None, device=None,
                 is_tp: bool = False, padding_size: int = 64, layer_type: str = 'attn', force_dtype=None):
        super().__init__()
        self.tp_world, self.tp_rank = get_tp_world_rank() if is_tp else (1, 0)
        if vocab_size % self.tp_world:
            raise ValueError(f'vocab_size ({vocab_size}) does not split evenly over {self.tp_world} ranks')
        self.vocab_size, self.padding_idx = vocab_size, padding_idx
        self.out_dtype = dtype if force_dtype is not None else None
        local = vocab_size // self.tp_world
        self.start = self.tp_rank * local
        self.weight = nn.Parameter(torch.empty(local, hidden_size, dtype=force_dtype or dtype, device=device),
                                   requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param, loaded_weight):
        default_weight_loader(param, split_for_rank(loaded_weight, 0, self.tp_world, self.tp_rank, 'embedding'))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_world == 1:
            out = F.embedding(input_ids, self.weight)
        else:
            local = input_ids - self.start
            inside = (local >= 0) & (local < self.weight.size(0))
            out = all_reduce(F.embedding(local.clamp(0, self.weight.size(0) - 1), self.weight) * inside.unsqueeze(-1))
        return out if self.out_dtype is None else out.to(self.out_dtype)


def build_embedding(vocab_size, hidden_size, padding_idx=None, dtype=None, device=None, is_tp=False):
    return ParallelEmbedding(vocab_size, hidden_size, padding_idx, dtype, device, is_tp)
