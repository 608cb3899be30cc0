"""The engine: requests in, one scheduled step at a time, sampled tokens out.

It owns the model runner, the KV pool's block manager, the scheduler and the sampler, and knows nothing of text
(the pipeline does). `add_request` and `abort` may be called from any thread: they go through an inbox that
`step` drains, so one thread can drive steps while others submit.
"""
import itertools
import logging
import queue
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence as Seq

import torch

from ..messages import GenerationConfig, PytorchEngineConfig
from ..paging import BlockManager
from .cache_engine import CacheEngine, plan_num_blocks
from .model_agent import ModelAgent
from .model_runner import ModelRunner
from .sampler import Sampler, logprob_dicts
from .scheduler import ScheduledBatch, Scheduler
from .sequence import SamplingParams, Sequence

logger = logging.getLogger('lmdp')


@dataclass(slots=True)
class EngineOutput:
    """What one step did to one request: the token it drew (None if none) and why it finished (None if not)."""
    seq_id: int
    token_id: Optional[int]
    finish_reason: Optional[str] = None
    logprobs: Optional[Dict[int, float]] = None


@dataclass
class _InFlight:
    """A step whose tokens are drawn on the device but not yet read back by the host."""
    batch: ScheduledBatch
    index: List[int]                  # rows of the batch that drew a token
    tokens: torch.Tensor              # [len(index)] on the device
    host_tokens: torch.Tensor         # their copy on the host, in flight until `ready`
    ready: Optional[torch.cuda.Event]
    logprobs: Optional[tuple]
    want_logprobs: Optional[List[int]]


@dataclass
class EngineStats:
    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0      # prompt tokens computed (prefix-cache hits excluded)
    decode_tokens: int = 0


class Engine:
    """Continuous batching over a paged KV cache. Build with `Engine(model_path, PytorchEngineConfig(...))`."""

    def __init__(self, model_path: str, config: Optional[PytorchEngineConfig] = None):
        self.config = config = config or PytorchEngineConfig()
        device = config.resolved_device()
        self.agent = ModelAgent.from_pretrained(model_path, dtype=config.dtype, device=device,
                                                custom_module_map=config.custom_module_map,
                                                trust_remote_code=config.trust_remote_code,
                                                model_impl=config.model_impl)
        model_config = self.model_config = self.agent.model_config
        self.max_batch_size = config.max_batch_size or (256 if device == 'cuda' else 32)
        session_len = config.session_len or model_config.max_position_embeddings or 4096
        bs = config.block_size
        num_blocks = plan_num_blocks(model_config, bs, device, config.num_gpu_blocks, config.cache_max_entry_count,
                                     session_len, self.max_batch_size)
        if session_len > num_blocks * bs:
            logger.warning('session_len %d is more than the KV pool holds; lowered to %d', session_len,
                           num_blocks * bs)
            session_len = num_blocks * bs
        self.session_len = session_len
        use_graphs = device == 'cuda' and not config.eager_mode
        # with CUDA graphs one extra block, never handed to a sequence, takes the padding slots' K/V
        self.cache = CacheEngine(model_config, num_blocks + int(use_graphs), bs, device)
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.max_batch_size, config.max_prefill_token_num)
        self.runner = ModelRunner(self.agent, self.cache, max_blocks_per_seq=-(-session_len // bs))
        if use_graphs:
            self.runner.capture_cuda_graphs(scratch_block=num_blocks, max_batch_size=self.max_batch_size,
                                            batch_sizes=config.cudagraph_capture_batch_sizes)
        self.sampler = Sampler(model_config.vocab_size, device)
        # Decode steps run one ahead of the host: the next step is launched on the device before the tokens of
        # the current one are read back, so scheduling, detokenising and the graph launch hide behind the GPU.
        self.overlap = True
        self._inflight: Optional[_InFlight] = None
        self.stats = EngineStats()
        self._inbox = queue.SimpleQueue()
        self._seqs: Dict[int, Sequence] = {}
        self._ids = itertools.count()

    # -- requests ---------------------------------------------------------------------------------------------

    def sampling_params(self, gen_config: GenerationConfig, eos_token_ids: Seq[int] = ()) -> SamplingParams:
        """Resolve a GenerationConfig: stop ids merged with the model's eos ids (unless ignore_eos), a seed drawn
        for requests that give none."""
        g = gen_config
        stop_ids = set(g.stop_token_ids or ())
        if not g.ignore_eos:
            stop_ids.update(self.model_config.eos_token_id)
            stop_ids.update(eos_token_ids)
        seed = g.random_seed if g.random_seed is not None else random.getrandbits(63)
        return SamplingParams(max_new_tokens=g.max_new_tokens, min_new_tokens=g.min_new_tokens or 0,
                              greedy=g.is_greedy, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                              min_p=g.min_p, repetition_penalty=g.repetition_penalty, seed=seed,
                              stop_ids=frozenset(stop_ids), logprobs=g.logprobs or 0)

    def check_prompt(self, token_ids: Seq[int]):
        """Raise ValueError, saying why, for a prompt no step could run."""
        if len(token_ids) == 0:
            raise ValueError('the prompt is empty; give at least one token')
        if len(token_ids) >= self.session_len:
            raise ValueError(f'the prompt has {len(token_ids)} tokens but session_len is {self.session_len}, '
                             'which must hold the prompt and at least one new token; shorten the prompt or '
                             'raise session_len')
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f'token ids {bad[:5]} are outside the vocabulary [0, {vocab})')

    def add_request(self, token_ids: Seq[int], params: SamplingParams, seq_id: Optional[int] = None) -> int:
        """Queue a prompt; returns its sequence id (`seq_id` when given: a caller that must know the id before the
        request can produce output picks it). Raises ValueError for a prompt that can't run."""
        self.check_prompt(token_ids)
        seq_id = next(self._ids) if seq_id is None else seq_id
        seq = Sequence(seq_id, list(token_ids), len(token_ids), params)
        self._inbox.put(('add', seq))
        return seq.seq_id

    def abort(self, seq_id: int):
        """Stop a request; its blocks are freed at the start of the next step."""
        self._inbox.put(('abort', seq_id))

    def has_unfinished(self) -> bool:
        return not self._inbox.empty() or self.scheduler.has_unfinished() or self._inflight is not None

    def _drain_inbox(self) -> List[EngineOutput]:
        outputs = []
        while not self._inbox.empty():
            kind, item = self._inbox.get()
            if kind == 'add':
                if item.params.max_new_tokens == 0:
                    outputs.append(EngineOutput(item.seq_id, None, 'length'))
                    continue
                self._seqs[item.seq_id] = item
                self.scheduler.add(item)
            elif item in self._seqs:
                self.scheduler.abort(self._seqs.pop(item))
                outputs.append(EngineOutput(item, None, 'abort'))
        return outputs

    # -- the step ---------------------------------------------------------------------------------------------

    def step(self) -> List[EngineOutput]:
        """Run one prefill or decode step; what it did to each request it touched.

        With `overlap`, a decode step returns the tokens of the step before it: its own are read back by the next
        call, which first launches the step after it.
        """
        outputs = self._drain_inbox()
        if self._inflight is not None:
            previous = self._inflight
            self._inflight = self._launch_ahead(previous)
            outputs += self._finish(previous)
            return outputs
        batch = self.scheduler.schedule()
        if batch is None:
            if self.scheduler.has_unfinished():
                # cannot happen while session_len fits the pool; fail loudly rather than spin
                raise RuntimeError(f'the scheduler can run nothing: {len(self.scheduler.waiting)} waiting, '
                                   f'{len(self.scheduler.running)} running, {self.block_manager.num_free} of '
                                   f'{self.block_manager.num_blocks} blocks free')
            return outputs
        launched = self._launch(batch, self.runner.prepare_inputs(batch))
        if launched is not None and batch.is_decoding and self.overlap:
            self._inflight = launched
            return outputs
        return outputs + self._finish(launched, batch)

    def _launch(self, batch: ScheduledBatch, inputs, ahead: int = 0) -> Optional[_InFlight]:
        """Run the model and the sampler for a step; the tokens stay on the device (their copy to the host is
        started). None when no row samples (every prompt of a prefill step is part-way through a chunk)."""
        if self.runner.can_replay(inputs):
            graph_logits = self.runner.replay(inputs)          # decode: the whole device step is one replay
            logits_of = lambda rows: graph_logits  # noqa: E731 (decode samples every row)
        else:
            hidden = self.runner.forward(inputs)
            logits_of = lambda rows: self.runner.logits(hidden, rows)  # noqa: E731
        if batch.is_decoding:
            index, rows = list(range(len(batch.seqs))), None
        else:
            ends = list(itertools.accumulate(batch.num_new))
            index = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new)) if s.num_cached + n == s.num_tokens]
            rows = [ends[i] - 1 for i in index]
            if not index:
                return None
        picked = [batch.seqs[i] for i in index]
        sampling_inputs = self.sampler.prepare(picked, ahead=ahead)
        tokens, logprobs = self.sampler(logits_of(rows), sampling_inputs)
        ready = None
        if tokens.is_cuda:
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            host = tokens
        return _InFlight(batch, index, tokens, host, ready, logprobs, sampling_inputs.want_logprobs)

    def _launch_ahead(self, previous: _InFlight) -> Optional[_InFlight]:
        """Launch the decode step after `previous` before its tokens are known on the host, or None where the
        next step can't be decided yet: prompts wait, a sequence needs its tokens on the host (repetition
        penalty), or the pool has no block to spare."""
        if self.scheduler.waiting or not self._inbox.empty():
            return None
        keep = []
        for i, seq in enumerate(previous.batch.seqs):
            if seq.is_finished:
                continue                   # aborted meanwhile
            if seq.params.repetition_penalty != 1.0:
                return None
            # the previous step's token makes it num_tokens + 1 long: a length limit is known in advance
            if seq.num_generated + 1 >= seq.params.max_new_tokens or seq.num_tokens + 1 >= self.session_len:
                continue
            keep.append(i)
        if not keep:
            return None
        seqs = [previous.batch.seqs[i] for i in keep]
        for seq in seqs:
            if not self.block_manager.can_allocate(seq, seq.num_tokens + 1):
                return None
        for seq in seqs:
            self.block_manager.allocate(seq, seq.num_tokens + 1)
        tokens = previous.tokens if len(keep) == len(previous.batch.seqs) else \
            previous.tokens[torch.tensor(keep, device=previous.tokens.device)]
        batch = ScheduledBatch(seqs, [1] * len(seqs), is_decoding=True)
        return self._launch(batch, self.runner.prepare_inputs(batch, ahead_tokens=tokens), ahead=1)

    def _finish(self, launched: Optional[_InFlight], batch: Optional[ScheduledBatch] = None) -> List[EngineOutput]:
        """Read a launched step's tokens back and account them (the step's one device -> host sync)."""
        if launched is None:                         # a prefill step that drew no token
            sampled = [None] * len(batch.seqs)
        else:
            batch = launched.batch
            if launched.ready is not None:
                launched.ready.synchronize()
            tokens = launched.host_tokens.tolist()
            picked = [batch.seqs[i] for i in launched.index]
            if launched.logprobs is not None:
                for seq, lp in zip(picked, logprob_dicts(launched.logprobs, launched.want_logprobs, tokens)):
                    if lp is not None:
                        seq.logprobs.append(lp)
            sampled = [None] * len(batch.seqs)
            for i, token in zip(launched.index, tokens):
                sampled[i] = token
        if batch.is_decoding:
            # a sequence that finished while this step ran ahead: its token is dropped
            live = [i for i, seq in enumerate(batch.seqs) if not seq.is_finished]
            if len(live) < len(batch.seqs):
                batch = ScheduledBatch([batch.seqs[i] for i in live], [1] * len(live), True)
                sampled = [sampled[i] for i in live]
        finished = self.scheduler.update(batch, sampled, self.session_len)
        self._count(batch)
        outputs = []
        for seq, token in zip(batch.seqs, sampled):
            if token is not None:
                lp = seq.logprobs[-1] if seq.params.logprobs else None
                outputs.append(EngineOutput(seq.seq_id, token, seq.finish_reason, lp))
        for seq in finished:
            self._seqs.pop(seq.seq_id, None)
        return outputs

    def _count(self, batch: ScheduledBatch):
        if not batch.seqs:
            return                          # a step run ahead for sequences that all finished meanwhile
        if batch.is_decoding:
            self.stats.decode_steps += 1
            self.stats.decode_tokens += len(batch.seqs)
        else:
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += sum(batch.num_new)

    # -- prompt logits ----------------------------------------------------------------------------------------

    def prompt_logits(self, token_ids: Seq[int]) -> torch.Tensor:
        """float32 logits `[len, vocab]` of every position of one prompt, on the host. Runs outside the scheduler
        (call it while no request is in flight), in chunks of max_prefill_token_num tokens."""
        self.check_prompt(token_ids)
        params = SamplingParams(max_new_tokens=0)
        seq = Sequence(-1, list(token_ids), len(token_ids), params)
        chunk = self.config.max_prefill_token_num
        rows = []
        try:
            while seq.num_cached < seq.num_tokens:
                n = min(chunk, seq.num_tokens - seq.num_cached)
                if not self.block_manager.allocate(seq, seq.num_cached + n):
                    raise RuntimeError('the KV pool is busy; call get_logits/get_ppl while no request runs')
                batch = ScheduledBatch([seq], [n], is_decoding=False)
                hidden = self.runner.forward(self.runner.prepare_inputs(batch))
                rows.append(self.runner.logits(hidden).cpu())
                seq.num_cached += n
        finally:
            self.block_manager.free(seq)
        return torch.cat(rows)
