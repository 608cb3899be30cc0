"""The engine: requests in, one scheduled step at a time, sampled tokens out.

It owns the model runner, the KV pool's block manager, the scheduler and the sampler, and knows nothing of text
(the pipeline does). `add_request` and `abort` may be called from any thread: they go through an inbox that
`step` drains, so one thread can drive steps while others submit.

One bad request never takes others down. Requests are checked in full when submitted (`sampling_params`,
`check_prompt`). Should a step fail anyway, `step` finds the requests that make it fail by re-running halves of the
step's batch, finishes only those with finish_reason 'error' (and the reason), frees their blocks, and puts the
others back to run in the next step; when it can't tell (the failure is after the tokens were drawn, or does not
repeat), it fails that step's requests. `step` itself never raises for a request's sake.
"""
import itertools
import logging
import queue
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from ..errors import TensorParallelError
from ..messages import GenerationConfig, PytorchEngineConfig
from ..paging import BlockManager
from . import request_checks
from .cache_engine import CacheEngine, plan_num_blocks
from .model_agent import ModelAgent
from .model_runner import ModelRunner
from .sampler import Sampler, logprob_dicts
from .scheduler import ScheduledBatch, Scheduler
from .sequence import SamplingParams, Sequence, SequenceStatus
from .tp import LeaderModelRunner, RankPlan, start_ranks

logger = logging.getLogger('lmdp')


@dataclass(slots=True)
class EngineOutput:
    """What one step did to one request: the token it drew (None if none) and why it finished (None if not)."""
    seq_id: int
    token_id: int | None
    finish_reason: str | None = None
    logprobs: dict[int, float] | None = None
    error: str | None = None          # with finish_reason 'error': what went wrong


@dataclass
class _InFlight:
    """A step whose tokens are drawn on the device but not yet read back by the host."""
    batch: ScheduledBatch
    index: list[int]                  # rows of the batch that drew a token
    tokens: torch.Tensor              # [len(index)] on the device
    host_tokens: torch.Tensor         # their copy on the host, in flight until `ready`
    ready: torch.cuda.Event | None
    logprobs: tuple | None
    want_logprobs: list[int] | None


@dataclass
class EngineStats:
    prefill_steps: int = 0       # steps with prompt tokens (mixed steps included)
    decode_steps: int = 0        # decode-only steps
    prefill_tokens: int = 0      # prompt tokens computed (prefix-cache hits excluded)
    decode_tokens: int = 0       # decode rows, in decode-only and mixed steps
    mixed_steps: int = 0         # prefill steps that decoded running sequences too (mixed_prefill)
    # host wall time of the `step()` calls that finished a prefill (mixed included) / decode-only step: where a
    # run's time goes (with `overlap`, a decode call also launches the step after it)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    prefill_max_seconds: float = 0.0  # the longest such call of each kind (a kernel compiled mid-run shows here)
    decode_max_seconds: float = 0.0


def engine_limits(config: PytorchEngineConfig, model_config, device: str) -> tuple[int, int]:
    """(max_batch_size, session_len) before the KV pool is sized: the config's, or the defaults."""
    max_batch_size = config.max_batch_size or (256 if device == 'cuda' else 32)
    session_len = config.session_len or model_config.max_position_embeddings or 4096
    return max_batch_size, session_len


class Engine:
    """Continuous batching over a paged KV cache. Build with `Engine(model_path, PytorchEngineConfig(...))`."""

    def __init__(self, model_path: str, config: PytorchEngineConfig | None = None):
        self.config = config = config or PytorchEngineConfig()
        device = config.resolved_device()
        # tp > 1: the other ranks start now and load their shards while this process loads its own
        self.ranks = start_ranks(model_path, config) if config.tp > 1 else None
        try:
            self._build(model_path, config, device)
        except BaseException:
            if self.ranks is not None:
                self.ranks.abort('rank 0 failed while building the engine')
            raise
        model_config = self.model_config
        self.sampler = Sampler(model_config.vocab_size, device)
        # Decode steps run one ahead of the host: the next step is launched on the device before the tokens of
        # the current one are read back, so scheduling, detokenising and the graph launch hide behind the GPU.
        self.overlap = True
        self._inflight: _InFlight | None = None
        self.stats = EngineStats()
        self._finished_kind: str | None = None      # 'prefill' | 'decode': what the current step() accounted
        self._inbox = queue.SimpleQueue()
        self._seqs: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self._stepping: list[Sequence] = []     # the sequences the running step works on (whom a failure concerns)
        vocab = model_config.vocab_size
        stray = [t for t in model_config.eos_token_id if not 0 <= t < vocab]
        if stray:
            logger.warning('eos_token_id %s in config.json is outside the vocabulary [0, %d): it can never be '
                           'generated, so it is ignored as a stop id', stray, vocab)

    def _build(self, model_path: str, config: PytorchEngineConfig, device: str):
        """The model, the KV pool and the model runner (every rank builds its own; see lmdp.engine.tp.worker)."""
        self.agent = ModelAgent.from_pretrained(model_path, dtype=config.dtype, device=device,
                                                custom_module_map=config.custom_module_map,
                                                trust_remote_code=config.trust_remote_code,
                                                model_impl=config.model_impl)
        model_config = self.model_config = self.agent.model_config
        self.max_batch_size, session_len = engine_limits(config, model_config, device)
        bs = config.block_size
        num_blocks = plan_num_blocks(model_config, bs, device, config.num_gpu_blocks, config.cache_max_entry_count,
                                     session_len, self.max_batch_size)
        if self.ranks is not None:      # the pool every rank can hold
            num_blocks = self.ranks.agree_num_blocks(num_blocks)
        if session_len > num_blocks * bs:
            logger.warning('session_len %d is more than the KV pool holds; lowered to %d', session_len,
                           num_blocks * bs)
            session_len = num_blocks * bs
        self.session_len = session_len
        use_graphs = device == 'cuda' and not config.eager_mode
        # with CUDA graphs one extra block, never handed to a sequence, takes the padding slots' K/V
        plan = RankPlan(num_blocks + int(use_graphs), bs, max_blocks_per_seq=-(-session_len // bs))
        self.cache = CacheEngine(model_config, plan.cache_blocks, bs, device)
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.max_batch_size, config.max_prefill_token_num,
                                   mixed_prefill=config.mixed_prefill)
        if self.ranks is None:
            self.runner = ModelRunner(self.agent, self.cache, plan.max_blocks_per_seq)
        else:
            self.ranks.send_plan(plan)
            self.runner = LeaderModelRunner(self.agent, self.cache, plan.max_blocks_per_seq, self.ranks)
        if use_graphs:
            self.runner.capture_cuda_graphs(scratch_block=num_blocks, max_batch_size=self.max_batch_size,
                                            batch_sizes=config.cudagraph_capture_batch_sizes)

    def close(self):
        """Let go of the other ranks (tensor parallelism); the engine can't step afterwards."""
        self.runner.close()

    # -- requests ---------------------------------------------------------------------------------------------

    def sampling_params(self, gen_config: GenerationConfig, eos_token_ids: Seq[int] = ()) -> SamplingParams:
        """Check a GenerationConfig in full against this model and resolve it (see `request_checks`): TypeError or
        ValueError, naming the field, for a setting no step could run."""
        eos = list(self.model_config.eos_token_id) + list(eos_token_ids)
        return request_checks.sampling_params(gen_config, self.model_config.vocab_size, eos)

    def check_prompt(self, token_ids: Seq[int]):
        """Raise ValueError (TypeError for ids that are not ints), saying why, for a prompt no step could run."""
        request_checks.check_prompt(token_ids, self.session_len, self.model_config.vocab_size)

    def check_params(self, params: SamplingParams):
        request_checks.check_params(params, self.model_config.vocab_size)

    def add_request(self, token_ids: Seq[int], params: SamplingParams, seq_id: int | None = None) -> int:
        """Queue a prompt; returns its sequence id (`seq_id` when given: a caller that must know the id before the
        request can produce output picks it). Raises ValueError or TypeError for a request that can't run."""
        self.check_prompt(token_ids)
        self.check_params(params)
        seq_id = next(self._ids) if seq_id is None else seq_id
        seq = Sequence(seq_id, list(token_ids), len(token_ids), params)
        self._inbox.put(('add', seq))
        return seq.seq_id

    def abort(self, seq_id: int):
        """Stop a request; its blocks are freed at the start of the next step."""
        self._inbox.put(('abort', seq_id))

    def has_unfinished(self) -> bool:
        return not self._inbox.empty() or self.scheduler.has_unfinished() or self._inflight is not None

    @property
    def num_sequences(self) -> int:
        """Sequences the engine holds (queued, running or waiting): 0 when every request has been answered."""
        return len(self._seqs)

    def abort_all(self, reason: str = 'abort', error: str | None = None) -> list[EngineOutput]:
        """Finish every request now (those still in the inbox too) and free their blocks; an output for each."""
        outputs = self._drain_inbox()
        self._inflight = None
        seqs = list(self._seqs.values())
        return outputs + self._fail(seqs, reason, error)

    def _drain_inbox(self) -> list[EngineOutput]:
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

    def step(self) -> list[EngineOutput]:
        """Run one prefill or decode step; what it did to each request it touched.

        With `overlap`, a decode step returns the tokens of the step before it: its own are read back by the next
        call, which first launches the step after it. A failure fails only the requests behind it (see above).
        """
        start = time.perf_counter()
        self._finished_kind = None
        outputs = self._drain_inbox()
        try:
            outputs += self._step()
        except TensorParallelError:    # a rank is gone: no request can run any more; the caller must hear it
            raise
        except Exception as e:         # whatever a step raises concerns its requests, not the engine
            outputs += self._recover(e)
        finally:
            self._stepping = []
            if self._finished_kind is not None:
                seconds = time.perf_counter() - start
                kind, stats = self._finished_kind, self.stats
                setattr(stats, f'{kind}_seconds', getattr(stats, f'{kind}_seconds') + seconds)
                setattr(stats, f'{kind}_max_seconds', max(getattr(stats, f'{kind}_max_seconds'), seconds))
        return outputs

    def _step(self) -> list[EngineOutput]:
        if self._inflight is not None:
            previous = self._inflight
            self._stepping = previous.batch.seqs
            try:
                self._inflight = self._launch_ahead(previous)
            except TensorParallelError:
                raise
            except Exception:          # not running ahead is always safe; the next step shows who
                logger.debug('running a decode step ahead failed; the next step runs in lock-step', exc_info=True)
                self._inflight = None
            return self._finish(previous)
        batch = self.scheduler.schedule()
        if batch is None:
            if self.scheduler.waiting:
                # the head of the queue can't fit even in an empty pool (cannot happen while session_len fits it)
                seq = self.scheduler.waiting[0]
                return self._fail([seq], 'error', f'the request needs {seq.num_tokens} tokens of KV cache but the '
                                  f'pool holds {self.block_manager.num_blocks * self.block_manager.block_size}; '
                                  'raise num_gpu_blocks or cache_max_entry_count, or lower session_len')
            return []
        self._stepping = batch.seqs
        try:
            launched = self._launch(batch, self.runner.prepare_inputs(batch))
        except TensorParallelError:
            raise
        except Exception as e:         # find the requests that make it fail; the rest run again
            return self._isolate(batch, e)
        if launched is not None and batch.is_decoding and self.overlap:
            self._inflight = launched
            return []
        return self._finish(launched, batch)

    def _isolate(self, batch: ScheduledBatch, error: Exception) -> list[EngineOutput]:
        """`batch` failed before its tokens were accounted: fail the sequences that fail alone (halving the batch
        to find them), and queue the others to run again as if the step had not happened."""
        culprits = self._culprits(batch, error, known_to_fail=True)
        if not culprits:                # it does not repeat: no one to blame, so the step's requests fail
            logger.error('a step of %d sequences failed and no part of it fails again; failing them all',
                         len(batch.seqs), exc_info=error)
            return self._fail(batch.seqs, 'error', _describe(error, 'a step with this request failed'))
        blamed = {id(seq) for seq, _ in culprits}
        # prefill took its prompts off the queue: back to its front, in order (decode rows stay in the running set)
        healthy = [seq for seq in batch.seqs[batch.num_decodes:] if id(seq) not in blamed]
        self.scheduler.waiting.extendleft(reversed(healthy))
        outputs = []
        for seq, e in culprits:
            logger.warning('request %s failed in a step and was dropped: %r', seq.seq_id, e)
            outputs += self._fail([seq], 'error', _describe(e, 'the model step failed for this request'))
        return outputs

    def _culprits(self, batch: ScheduledBatch, error: Exception, known_to_fail: bool = False):
        """[(sequence, its error)] for the sequences of `batch` whose step fails on its own."""
        if not known_to_fail:
            try:
                launched = self._launch(batch, self.runner.prepare_inputs(batch))
                if launched is not None and launched.ready is not None:
                    self.runner.wait(launched.ready)      # a device-side failure shows here
                return []
            except TensorParallelError:
                raise
            except Exception as e:
                error = e
        if len(batch.seqs) == 1:
            return [(batch.seqs[0], error)]
        half = len(batch.seqs) // 2
        parts = [batch.rows(0, half), batch.rows(half, len(batch.seqs))]
        return [c for part in parts for c in self._culprits(part, error)]

    def _recover(self, error: Exception) -> list[EngineOutput]:
        """A step failed where the culprit can't be told (accounting a step's tokens, or the scheduler): fail
        the step's requests, or every request when the step had none yet."""
        self._inflight = None
        seqs = [s for s in self._stepping if not s.is_finished] or list(self._seqs.values())
        logger.error('a step failed; failing its %d request(s)', len(seqs), exc_info=error)
        return self._fail(seqs, 'error', _describe(error, 'a step with this request failed'))

    def _fail(self, seqs: list[Sequence], reason: str, error: str | None) -> list[EngineOutput]:
        """Finish `seqs` now with `reason`, free their blocks and forget them."""
        outputs = []
        for seq in seqs:
            self.scheduler.abort(seq, reason)
            self.block_manager.free(seq)      # a no-op when the scheduler freed them already
            self._seqs.pop(seq.seq_id, None)
            outputs.append(EngineOutput(seq.seq_id, None, reason, error=error))
        return outputs

    def _launch(self, batch: ScheduledBatch, inputs, ahead: int = 0) -> _InFlight | None:
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

    def _launch_ahead(self, previous: _InFlight) -> _InFlight | None:
        """Launch the decode step after `previous` before its tokens are known on the host, or None where the
        next step can't be decided yet: prompts wait, a sequence needs its tokens on the host (repetition
        penalty), or the pool has no block to spare."""
        if self.scheduler.waiting or not self._inbox.empty():
            return None
        # one pass over the batch (it runs every decode step, 256 rows and more: kept lean)
        bm, session_len = self.block_manager, self.session_len
        room = bm.block_size
        keep, grow = [], []
        for i, seq in enumerate(previous.batch.seqs):
            if seq.status is SequenceStatus.FINISHED:
                continue                   # aborted meanwhile
            params = seq.params
            if params.repetition_penalty != 1.0:
                return None
            # the previous step's token makes it num_tokens + 1 long: a length limit is known in advance
            length = len(seq.token_ids) + 1
            if length - seq.num_prompt_tokens >= params.max_new_tokens or length >= session_len:
                continue
            keep.append(i)
            if length > len(seq.blocks) * room:
                grow.append(seq)
        if not keep:
            return None
        seqs = [previous.batch.seqs[i] for i in keep]
        # the blocks they need all together must be free: each one alone fitting is not enough (a failed
        # allocation would leave a sequence writing past its blocks, into another sequence's)
        if sum(bm.blocks_for(len(seq.token_ids) + 1) - len(seq.blocks) for seq in grow) > bm.num_free:
            return None
        for seq in grow:
            allocated = bm.allocate(seq, len(seq.token_ids) + 1)
            assert allocated, 'the blocks were counted free just above'
        tokens = previous.tokens if len(keep) == len(previous.batch.seqs) else \
            previous.tokens[torch.tensor(keep, device=previous.tokens.device)]
        batch = ScheduledBatch(seqs, [1] * len(seqs), is_decoding=True)
        return self._launch(batch, self.runner.prepare_inputs(batch, ahead_tokens=tokens), ahead=1)

    def _finish(self, launched: _InFlight | None, batch: ScheduledBatch | None = None) -> list[EngineOutput]:
        """Read a launched step's tokens back and account them (the step's one device -> host sync)."""
        if launched is None:                         # a prefill step that drew no token
            sampled = [None] * len(batch.seqs)
        else:
            batch = launched.batch
            if launched.ready is not None:
                self.runner.wait(launched.ready)
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
        self.stats.decode_tokens += batch.num_decodes
        self._finished_kind = 'decode' if batch.is_decoding else 'prefill'
        if batch.is_decoding:
            self.stats.decode_steps += 1
        else:
            self.stats.prefill_steps += 1
            self.stats.mixed_steps += batch.num_decodes > 0
            self.stats.prefill_tokens += sum(batch.num_new[batch.num_decodes:])

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


def _describe(error: Exception, what: str) -> str:
    return f'{what} ({type(error).__name__}: {error}); the engine dropped the request and serves the others'
