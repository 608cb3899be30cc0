"""One forward step's inputs, in the packed layout every layer sees.

Tokens of all sequences in a step are packed into `input_ids [1, T]` with no padding. Per sequence b: `q_seqlens[b]`
new tokens after `history_lengths[b]` cached ones, so `kv_seqlens = history + q_seqlens`, and its blocks of the
paged KV cache are `block_offsets[b, :]`. A step is all-decode (`is_decoding`: one token per sequence), or a
prefill step; a prefill step may lead with `num_decodes` decode rows of running sequences (a mixed step), which
attention can hand to its decode kernel.
"""
import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .kernels.fill_kv_cache import token_positions


@dataclass
class ModelInputs:
    """What the scheduler hands the model runner for one step (host-side sizes are plain ints)."""
    input_ids: torch.Tensor            # [1, T]
    seq_length: torch.Tensor           # q_seqlens [B]
    history_lengths: torch.Tensor      # [B]
    block_offsets: torch.Tensor        # [B, max_blocks] int32
    is_decoding: bool
    max_q_seqlen: int
    max_kv_seqlen: int
    sum_kv_seqlen: int                 # keys of the prefill rows (all rows but the num_decodes leading ones)
    inputs_embeds: torch.Tensor | None = None
    num_decodes: int = 0               # leading rows of a prefill step that are decodes (q_len 1, with history)

    @classmethod
    def make(cls, token_ids: list[list[int]], history_lengths: list[int], block_tables: list[list[int]],
             is_decoding: bool, device='cpu') -> 'ModelInputs':
        """Pack per-sequence new tokens, history lengths and block tables into one step's inputs."""
        q_lens = [len(t) for t in token_ids]
        if any(n == 0 for n in q_lens):
            raise ValueError('every sequence in a step needs at least one new token')
        if is_decoding and any(n != 1 for n in q_lens):
            raise ValueError('a decode step takes exactly one new token per sequence')
        width = max(len(b) for b in block_tables)
        offsets = torch.zeros(len(block_tables), max(width, 1), dtype=torch.int32)
        for i, blocks in enumerate(block_tables):
            offsets[i, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        kv_lens = [h + q for h, q in zip(history_lengths, q_lens)]
        flat = [t for seq in token_ids for t in seq]
        return cls(input_ids=torch.tensor([flat], dtype=torch.long, device=device),
                   seq_length=torch.tensor(q_lens, dtype=torch.int32, device=device),
                   history_lengths=torch.tensor(history_lengths, dtype=torch.int32, device=device),
                   block_offsets=offsets.to(device), is_decoding=is_decoding, max_q_seqlen=max(q_lens),
                   max_kv_seqlen=max(kv_lens), sum_kv_seqlen=sum(kv_lens))


@dataclass
class AttentionMetadata:
    """What the attention layers read: where each sequence's queries sit and which cache blocks it owns."""
    is_decoding: bool
    block_offsets: torch.Tensor        # [B, max_blocks] int32
    q_start_loc: torch.Tensor          # [B] offset of each sequence's first token in the packed step
    q_seqlens: torch.Tensor            # [B]
    kv_seqlens: torch.Tensor           # [B] history + new
    max_q_seqlen: int = 0
    max_kv_seqlen: int = 0
    sum_kv_seqlen: int = 0             # keys of the step's prefill rows (sizes torch's packed-K/V path); 0: unknown
    num_decodes: int = 0               # a mixed step's leading decode rows (0 in decode-only steps)


@dataclass
class StepContext:
    """Everything about the current step a layer may need; reach it through `StepContextManager`."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor         # [1, T] absolute position of each packed token
    q_seqlens: torch.Tensor
    kv_seqlens: torch.Tensor
    q_start_loc: torch.Tensor
    block_offsets: torch.Tensor
    history_lengths: torch.Tensor
    is_decoding: bool
    max_q_seqlen: int
    max_kv_seqlen: int
    sum_kv_seqlen: int
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    attn_metadata: AttentionMetadata
    model_config: Any = None
    inputs_embeds: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)

    @classmethod
    def new(cls, inputs: ModelInputs, model_config=None, kv_caches=None) -> 'StepContext':
        q_seqlens = inputs.seq_length
        history = inputs.history_lengths
        kv_seqlens = history + q_seqlens
        q_start_loc = torch.cumsum(q_seqlens, 0) - q_seqlens
        if inputs.is_decoding:
            position_ids = history.long()[None]
        else:
            position_ids = token_positions(q_start_loc, q_seqlens, kv_seqlens, inputs.input_ids.size(-1))[1][None]
        attn_metadata = AttentionMetadata(is_decoding=inputs.is_decoding, block_offsets=inputs.block_offsets,
                                          q_start_loc=q_start_loc, q_seqlens=q_seqlens, kv_seqlens=kv_seqlens,
                                          max_q_seqlen=inputs.max_q_seqlen, max_kv_seqlen=inputs.max_kv_seqlen,
                                          sum_kv_seqlen=inputs.sum_kv_seqlen,
                                          num_decodes=0 if inputs.is_decoding else inputs.num_decodes)
        return cls(input_ids=inputs.input_ids, position_ids=position_ids, q_seqlens=q_seqlens,
                   kv_seqlens=kv_seqlens, q_start_loc=q_start_loc, block_offsets=inputs.block_offsets,
                   history_lengths=history, is_decoding=inputs.is_decoding, max_q_seqlen=inputs.max_q_seqlen,
                   max_kv_seqlen=inputs.max_kv_seqlen, sum_kv_seqlen=inputs.sum_kv_seqlen,
                   kv_caches=kv_caches or [], attn_metadata=attn_metadata, model_config=model_config,
                   inputs_embeds=inputs.inputs_embeds)


class StepContextManager:
    """Hands the current step's context to any layer that asks (set by the model runner around each forward)."""

    def __init__(self, build_ctx=None):
        self._current: StepContext | None = None
        self.build_ctx = build_ctx  # engine-level settings a model may read at construction time

    def current_context(self) -> StepContext | None:
        return self._current

    @contextlib.contextmanager
    def context(self, ctx: StepContext):
        previous, self._current = self._current, ctx
        try:
            yield ctx
        finally:
            self._current = previous
