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
        self._scratch_block: Optional[int] = None   # the CUDA-graph padding slots' block (capture_cuda_graphs)

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

    def _inputs(self, seqs: List[SequenceState], new_tokens: Sequence[Sequence[int]],
                is_decoding: bool) -> ModelInputs:
        """Reserve the blocks `new_tokens` need and pack the step (the sequences do not advance)."""
        for seq, tokens in zip(seqs, new_tokens):
            self._reserve(seq, seq.num_cached + len(tokens))
        return ModelInputs.make([list(t) for t in new_tokens], [s.num_cached for s in seqs],
                                [s.blocks for s in seqs], is_decoding, device=self.agent.device)

    def decode_inputs(self, seq_ids: Sequence[int], tokens: Sequence[int]) -> ModelInputs:
        """The inputs of a decode step feeding `tokens[i]` to sequence `seq_ids[i]`, blocks reserved.

        The sequences do not advance: running these inputs (eagerly or by CUDA-graph replay) writes K/V at
        each sequence's next position, which the next `step`/`decode` overwrites. For comparing ways of running
        one step on the same state."""
        return self._inputs([self.sequences[i] for i in seq_ids], [[t] for t in tokens], is_decoding=True)

    def step(self, seq_ids: Sequence[int], new_tokens: Sequence[Sequence[int]], all_logits: bool = False,
             is_decoding: Optional[bool] = None) -> StepOutput:
        """Append `new_tokens[i]` to sequence `seq_ids[i]` in one packed step and run the model."""
        seqs = [self.sequences[i] for i in seq_ids]
        if is_decoding is None:
            is_decoding = all(len(t) == 1 for t in new_tokens) and all(s.num_cached > 0 for s in seqs)
        inputs = self._inputs(seqs, new_tokens, is_decoding)
        output = self.agent.forward(inputs, self.cache.kv_caches)
        ends = torch.cumsum(inputs.seq_length.long(), 0)
        per_seq = None
        if all_logits:   # lm_head once over every row; each sequence's last row is taken from it
            every = self.agent.get_logits(output)
            per_seq = list(every.split(inputs.seq_length.tolist()))
            logits = every[ends - 1]
        else:
            logits = self.agent.get_logits(output[ends - 1])
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

    def capture_cuda_graphs(self, batch_sizes: Sequence[int], max_blocks_per_seq: Optional[int] = None):
        """A `CUDAGraphRunner` over this runner's KV cache with one decode graph per batch size, captured.

        The padding slots of a replay write their K/V to a scratch block taken from the allocator once (shared by
        every runner this returns; never handed to a sequence). max_blocks_per_seq: the longest block table a
        replay accepts (default: the whole cache). Buckets that failed to capture say why in `.results`."""
        from ..backends.cuda import CUDAGraphRunner
        if self.agent.device.type != 'cuda':
            raise RuntimeError(f'CUDA graphs need a CUDA device; this runner is on {self.agent.device}')
        if self._scratch_block is None:
            self._scratch_block = self.allocator.allocate(1)[0]
        graphs = CUDAGraphRunner(self.agent.model, self.agent.ctx_mgr, self.agent.model_config, self.cache.kv_caches,
                                 max_blocks_per_seq=max_blocks_per_seq or self.allocator.num_blocks,
                                 scratch_block=self._scratch_block, capture_batch_sizes=list(batch_sizes))
        graphs.capture_all()
        return graphs

    def release(self, seq_ids: Optional[Sequence[int]] = None):
        """Free the blocks of the given sequences (all when None)."""
        for i in list(self.sequences if seq_ids is None else seq_ids):
            self.allocator.free(self.sequences.pop(i).blocks)
