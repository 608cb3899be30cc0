"""A step driver over token ids for tests, notebooks and the parity harness: the engine's own step path without its
scheduler.

Each call packs a step with `ModelRunner.prepare_inputs` (the packer `pipeline()` uses), runs it with
`ModelRunner.forward`/`logits`, and draws the greedy token with the engine's `Sampler`; blocks come from the
engine's `BlockManager` (optionally handed out shuffled, so block tables are not contiguous) and sequences are the
engine's `Sequence` records. CUDA graphs are the model runner's (`ModelRunner.capture_cuda_graphs` / `replay`).
What this adds is only the choice of tokens: the caller says which tokens each step feeds (teacher forcing).
"""
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from ..model_inputs import ModelInputs
from ..paging import BlockManager, OutOfBlocks
from .cache_engine import CacheEngine
from .model_agent import ModelAgent
from .model_runner import ModelRunner
from .sampler import Sampler
from .scheduler import ScheduledBatch
from .sequence import SamplingParams, Sequence, SequenceStatus

GREEDY = SamplingParams(max_new_tokens=1 << 30)


@dataclass
class StepOutput:
    seq_ids: list[int]
    logits: torch.Tensor                                  # [B, vocab] float32, each sequence's last token
    all_logits: list[torch.Tensor] | None = None       # per sequence [q_len, vocab], when asked for
    tokens: list[int] | None = None                    # the engine sampler's greedy pick from `logits`


class StepRunner:
    """Prefill/decode driver: `prefill(prompts)`, then `decode(seq_ids, tokens)` or any `step(...)`."""

    def __init__(self, agent: ModelAgent, num_blocks: int = 256, block_size: int = 64,
                 shuffle_blocks_seed: int | None = None, max_blocks_per_seq: int | None = None):
        self.agent = agent
        self.block_size = block_size
        # one block past the pool takes the padding slots of CUDA-graph replays, as in the engine
        self.cache = CacheEngine(agent.model_config, num_blocks + 1, block_size, agent.device)
        self.block_manager = BlockManager(num_blocks, block_size, shuffle_seed=shuffle_blocks_seed)
        self.runner = ModelRunner(agent, self.cache, max_blocks_per_seq or num_blocks)
        self.sampler = Sampler(agent.model_config.vocab_size, agent.device)
        self.sequences: dict[int, Sequence] = {}
        self._next_id = 0

    @classmethod
    def from_pretrained(cls, model_path: str, dtype='auto', device='cpu', num_blocks: int = 256,
                        block_size: int = 64, custom_module_map=None, shuffle_blocks_seed: int | None = None):
        agent = ModelAgent.from_pretrained(model_path, dtype=dtype, device=device,
                                           custom_module_map=custom_module_map)
        return cls(agent, num_blocks, block_size, shuffle_blocks_seed)

    @property
    def model(self):
        return self.agent.model

    @property
    def scratch_block(self) -> int:
        return self.block_manager.num_blocks

    def _reserve(self, seq: Sequence, num_tokens: int):
        if not self.block_manager.allocate(seq, num_tokens):
            need = self.block_manager.blocks_for(num_tokens) - len(seq.blocks)
            raise OutOfBlocks(f'need {need} KV-cache blocks, {self.block_manager.num_free} free of '
                              f'{self.block_manager.num_blocks}')

    def _batch(self, seqs: list[Sequence], new_tokens: Seq[Seq[int]], is_decoding: bool) -> ScheduledBatch:
        """Append the tokens, reserve their blocks, and say how many each sequence adds (nothing is run)."""
        for seq, tokens in zip(seqs, new_tokens):
            if not tokens:
                raise ValueError(f'sequence {seq.seq_id}: every sequence in a step needs at least one new token')
            if is_decoding and len(tokens) != 1:
                raise ValueError(f'sequence {seq.seq_id}: a decode step takes exactly one new token per sequence')
        for seq, tokens in zip(seqs, new_tokens):
            self._reserve(seq, seq.num_cached + len(tokens))
        for seq, tokens in zip(seqs, new_tokens):
            seq.token_ids.extend(int(t) for t in tokens)
        return ScheduledBatch(seqs, [len(t) for t in new_tokens], is_decoding)

    def decode_inputs(self, seq_ids: Seq[int], tokens: Seq[int]) -> ModelInputs:
        """The inputs of a decode step feeding `tokens[i]` to sequence `seq_ids[i]`, blocks reserved.

        The sequences do not advance: running these inputs (eagerly or by CUDA-graph replay) writes K/V at
        each sequence's next position, which the next `step`/`decode` overwrites. For comparing ways of running
        one step on the same state."""
        seqs = [self.sequences[i] for i in seq_ids]
        batch = self._batch(seqs, [[t] for t in tokens], is_decoding=True)
        try:
            return self.runner.prepare_inputs(batch)
        finally:
            for seq in seqs:
                seq.token_ids.pop()

    def step(self, seq_ids: Seq[int], new_tokens: Seq[Seq[int]], all_logits: bool = False,
             is_decoding: bool | None = None, replay: bool = False) -> StepOutput:
        """Append `new_tokens[i]` to sequence `seq_ids[i]` in one packed step and run the model.

        replay: run a decode step by CUDA-graph replay when a captured graph fits (as the engine does)."""
        seqs = [self.sequences[i] for i in seq_ids]
        if is_decoding is None:
            is_decoding = all(len(t) == 1 for t in new_tokens) and all(s.num_cached > 0 for s in seqs)
        batch = self._batch(seqs, new_tokens, is_decoding)
        inputs = self.runner.prepare_inputs(batch)
        ends = torch.cumsum(torch.tensor(batch.num_new), 0)
        per_seq = None
        if replay and self.runner.can_replay(inputs):
            logits = self.runner.replay(inputs).clone()
        else:
            hidden = self.runner.forward(inputs)
            if all_logits:   # lm_head once over every row; each sequence's last row is taken from it
                every = self.runner.logits(hidden)
                per_seq = list(every.split(batch.num_new))
                logits = every[(ends - 1).to(every.device)]
            else:
                logits = self.runner.logits(hidden, (ends - 1).tolist())
        for seq, n in zip(seqs, batch.num_new):
            seq.num_cached += n
            seq.status = SequenceStatus.RUNNING
        tokens, _ = self.sampler(logits, self.sampler.prepare(seqs))
        return StepOutput(list(seq_ids), logits, per_seq, tokens.tolist())

    def prefill(self, prompts: Seq[Seq[int]], all_logits: bool = False) -> StepOutput:
        """Start one sequence per prompt and prefill them all in one packed step."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError('prefill needs at least one prompt, and no prompt may be empty')
        ids = []
        for prompt in prompts:
            self.sequences[self._next_id] = Sequence(self._next_id, [], len(prompt), GREEDY)
            ids.append(self._next_id)
            self._next_id += 1
        return self.step(ids, prompts, all_logits=all_logits, is_decoding=False)

    def decode(self, seq_ids: Seq[int], next_tokens: Seq[int], replay: bool = False) -> StepOutput:
        """One decode step: one new token per sequence."""
        return self.step(seq_ids, [[t] for t in next_tokens], is_decoding=True, replay=replay)

    def generate_greedy(self, prompts: Seq[Seq[int]], max_new_tokens: int):
        """Greedy continuation of each prompt: (tokens per prompt, logits of every step `[B, vocab]`)."""
        out = self.prefill(prompts)
        step_logits = [out.logits]
        generated = [[t] for t in out.tokens]
        for _ in range(max_new_tokens - 1):
            out = self.decode(out.seq_ids, [g[-1] for g in generated])
            step_logits.append(out.logits)
            for g, t in zip(generated, out.tokens):
                g.append(t)
        return generated, step_logits

    def capture_cuda_graphs(self, batch_sizes: Seq[int], max_blocks_per_seq: int | None = None):
        """The model runner's `CUDAGraphRunner` with one decode graph per batch size, captured over this runner's
        KV cache. Padding slots write the block past the pool. max_blocks_per_seq: the longest block table a step
        may have from now on (default: as constructed). Buckets that failed to capture say why in `.results`."""
        if self.agent.device.type != 'cuda':
            raise RuntimeError(f'CUDA graphs need a CUDA device; this runner is on {self.agent.device}')
        if max_blocks_per_seq is not None:
            self.runner.max_blocks_per_seq = max_blocks_per_seq
        self.runner.capture_cuda_graphs(self.scratch_block, max(batch_sizes), batch_sizes=list(batch_sizes),
                                        progress=False)
        return self.runner.graphs

    def release(self, seq_ids: Seq[int] | None = None):
        """Free the blocks of the given sequences (all when None)."""
        for i in list(self.sequences if seq_ids is None else seq_ids):
            self.block_manager.free(self.sequences.pop(i))
