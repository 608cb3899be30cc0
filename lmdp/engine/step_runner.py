"""A step runner over token ids: prefill sequences packed in one step, then decode them through the paged cache.

This is the seed the engine grows from: it owns the KV cache, the block allocator and each sequence's block
table, and drives `ModelAgent` one packed step at a time. It does no scheduling and no sampling beyond greedy.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..model_inputs import ModelInputs
from ..paging import BlockAllocator
from .cache_engine import CacheEngine
from .model_agent import ModelAgent


@dataclass
class SequenceState:
    seq_id: int
    token_ids: List[int] = field(default_factory=list)   # every token the cache holds or is about to hold
    num_cached: int = 0                                   # tokens already written to the KV cache
    blocks: List[int] = field(default_factory=list)


@dataclass
class StepOutput:
    seq_ids: List[int]
    logits: torch.Tensor                                  # [B, vocab] float32, each sequence's last token
    all_logits: Optional[List[torch.Tensor]] = None       # per sequence [q_len, vocab], when asked for


class StepRunner:
    """Prefill/decode driver for tests, the parity harness and (later) the engine."""

    def __init__(self, agent: ModelAgent, num_blocks: int = 256, block_size: int = 64,
                 shuffle_blocks_seed: Optional[int] = None):
        self.agent = agent
        self.block_size = block_size
        self.cache = CacheEngine(agent.model_config, num_blocks, block_size, agent.device)
        self.allocator = BlockAllocator(num_blocks, shuffle_seed=shuffle_blocks_seed)
        self.sequences: Dict[int, SequenceState] = {}
        self._next_id = 0

    @classmethod
    def from_pretrained(cls, model_path: str, dtype='auto', device='cpu', num_blocks: int = 256,
                        block_size: int = 64, custom_module_map=None, shuffle_blocks_seed: Optional[int] = None):
        agent = ModelAgent.from_pretrained(model_path, dtype=dtype, device=device,
                                           custom_module_map=custom_module_map)
        return cls(agent, num_blocks, block_size, shuffle_blocks_seed)

    @property
    def model(self):
        return self.agent.model

    def _reserve(self, seq: SequenceState, num_tokens: int):
        needed = -(-num_tokens // self.block_size) - len(seq.blocks)
        if needed > 0:
            seq.blocks.extend(self.allocator.allocate(needed))

    def step(self, seq_ids: Sequence[int], new_tokens: Sequence[Sequence[int]], all_logits: bool = False,
             is_decoding: Optional[bool] = None) -> StepOutput:
        """Append `new_tokens[i]` to sequence `seq_ids[i]` in one packed step and run the model."""
        seqs = [self.sequences[i] for i in seq_ids]
        if is_decoding is None:
            is_decoding = all(len(t) == 1 for t in new_tokens) and all(s.num_cached > 0 for s in seqs)
        for seq, tokens in zip(seqs, new_tokens):
            self._reserve(seq, seq.num_cached + len(tokens))
        inputs = ModelInputs.make([list(t) for t in new_tokens], [s.num_cached for s in seqs],
                                  [s.blocks for s in seqs], is_decoding, device=self.agent.device)
        output = self.agent.forward(inputs, self.cache.kv_caches)
        ends = torch.cumsum(inputs.seq_length.long(), 0)
        logits = self.agent.get_logits(output[ends - 1])
        per_seq = None
        if all_logits:
            per_seq = list(self.agent.get_logits(output).split(inputs.seq_length.tolist()))
        for seq, tokens in zip(seqs, new_tokens):
            seq.token_ids.extend(tokens)
            seq.num_cached += len(tokens)
        return StepOutput(list(seq_ids), logits, per_seq)

    def prefill(self, prompts: Sequence[Sequence[int]], all_logits: bool = False) -> StepOutput:
        """Start one sequence per prompt and prefill them all in one packed step."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError('prefill needs at least one prompt, and no prompt may be empty')
        ids = []
        for _ in prompts:
            self.sequences[self._next_id] = SequenceState(self._next_id)
            ids.append(self._next_id)
            self._next_id += 1
        return self.step(ids, prompts, all_logits=all_logits, is_decoding=False)

    def decode(self, seq_ids: Sequence[int], next_tokens: Sequence[int]) -> StepOutput:
        """One decode step: one new token per sequence."""
        return self.step(seq_ids, [[t] for t in next_tokens], is_decoding=True)

    def generate_greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int):
        """Greedy continuation of each prompt: (tokens per prompt, logits of every step `[B, vocab]`)."""
        out = self.prefill(prompts)
        step_logits = [out.logits]
        generated = [[t] for t in out.logits.argmax(-1).tolist()]
        for _ in range(max_new_tokens - 1):
            out = self.decode(out.seq_ids, [g[-1] for g in generated])
            step_logits.append(out.logits)
            for g, t in zip(generated, out.logits.argmax(-1).tolist()):
                g.append(t)
        return generated, step_logits

    def release(self, seq_ids: Optional[Sequence[int]] = None):
        """Free the blocks of the given sequences (all when None)."""
        for i in list(self.sequences if seq_ids is None else seq_ids):
            self.allocator.free(self.sequences.pop(i).blocks)
