"""CUDA graphs for decode steps: one graph per batch-size bucket, static input buffers, one memory pool.

A decode step of n sequences replays the graph of the smallest bucket >= n. The slots past n are padding: their
token is 0, their history is empty, and their block table points at a scratch block no sequence owns, so the
K/V they write lands where nobody reads it. The graph covers the model's forward and `get_logits`, so a replay
is the whole device side of a decode step.
"""
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ...model_inputs import ModelInputs, StepContext
from .capture_errors import explain_capture_error

logger = logging.getLogger('lmdp')


def default_capture_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond (vLLM-like spacing)."""
    sizes, step, bs = [1, 2, 4], 8, 8
    while bs < max_batch_size:
        sizes.append(bs)
        step = 8 if bs < 64 else 16 if bs < 256 else 32
        bs += step
    sizes.append(max_batch_size)
    return sorted({s for s in sizes if s <= max_batch_size})


@dataclass
class CaptureResult:
    """What happened when one bucket was captured (the CUDA-graph eligibility view shows these)."""
    batch_size: int
    supported: bool                   # what the model's support_cuda_graph answered
    captured: bool = False
    reason: str | None = None      # why not, in words
    fix: str | None = None
    seconds: float = 0.0


class CUDAGraphRunner:

    def __init__(self, model, ctx_mgr, model_config, kv_caches, max_blocks_per_seq: int, scratch_block: int,
                 capture_batch_sizes: Sequence[int] | None = None, max_batch_size: int = 256,
                 logits_fn: Callable | None = None):
        self.model, self.ctx_mgr, self.model_config = model, ctx_mgr, model_config
        self.kv_caches = kv_caches
        self.device = kv_caches[0][0].device
        self.block_size = kv_caches[0][0].size(1)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.scratch_block = scratch_block
        self.batch_sizes = sorted(set(capture_batch_sizes or default_capture_batch_sizes(max_batch_size)))
        get_logits = getattr(model, 'get_logits', None)
        self.logits_fn = logits_fn or ((lambda h: get_logits(h).float()) if get_logits else (lambda h: h.float()))
        self.pool = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.results: dict[int, CaptureResult] = {}
        n, dev = self.batch_sizes[-1], self.device
        # Static inputs, sized for the largest bucket; smaller buckets use leading slices. A replay copies a step's
        # token ids, history lengths and block table in; everything derived from them (positions, kv_seqlens,
        # q_start_loc) is computed inside the graph by StepContext.new, the same code an eager step runs.
        self.input_ids = torch.zeros(1, n, dtype=torch.long, device=dev)
        self.history_lengths = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_offsets = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=dev)
        self.q_seqlens = torch.ones(n, dtype=torch.int32, device=dev)

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def bucket(self, batch: int) -> int | None:
        return next((b for b in self.batch_sizes if b >= batch), None)

    def static_inputs(self, bs: int) -> ModelInputs:
        """The graph's inputs for bucket `bs`: views of the static buffers a replay copies a step into."""
        max_kv = self.max_blocks_per_seq * self.block_size    # grids sized for the longest sequence that fits
        return ModelInputs(input_ids=self.input_ids[:, :bs], seq_length=self.q_seqlens[:bs],
                           history_lengths=self.history_lengths[:bs], block_offsets=self.block_offsets[:bs],
                           is_decoding=True, max_q_seqlen=1, max_kv_seqlen=max_kv, sum_kv_seqlen=bs * max_kv)

    def _context(self, bs: int) -> StepContext:
        return StepContext.new(self.static_inputs(bs), self.model_config, self.kv_caches)

    def _run(self, bs: int) -> torch.Tensor:
        ctx = self._context(bs)
        with self.ctx_mgr.context(ctx):
            kwargs = self.model.prepare_inputs_for_generation(past_key_values=self.kv_caches, context=ctx)
            hidden = self.model(**kwargs)
            return self.logits_fn(hidden.reshape(-1, hidden.size(-1)))

    def supports(self, bs: int) -> bool:
        flag = getattr(self.model, 'support_cuda_graph', True)
        if not callable(flag):
            return bool(flag)
        ctx = self._context(bs)
        kwargs = self.model.prepare_inputs_for_generation(past_key_values=self.kv_caches, context=ctx)
        return bool(flag(**kwargs))

    @torch.inference_mode()
    def capture(self, bs: int) -> CaptureResult:
        """Capture one bucket (padding slots only: no real sequence is touched)."""
        import time
        start = time.perf_counter()
        result = CaptureResult(bs, supported=self.supports(bs))
        self.results[bs] = result
        if not result.supported:
            result.reason = 'the model answered support_cuda_graph = False for this step'
            result.fix = 'nothing to fix if intended; otherwise make support_cuda_graph return True'
            return result
        self._reset_padding(0, bs)
        try:
            # warm-up outside the graph: Triton compiles and autotunes here, cuBLAS picks its kernels
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._run(bs)
            torch.cuda.current_stream().wait_stream(stream)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._run(bs)
            self.graphs[bs], self.outputs[bs] = graph, out
            result.captured = True
        except Exception as e:  # noqa: BLE001 - any failure becomes an explained refusal
            result.reason, result.fix = explain_capture_error(e)
            logger.warning('CUDA graph capture failed for batch %d: %s', bs, result.reason)
            torch.cuda.synchronize()
        result.seconds = time.perf_counter() - start
        return result

    def capture_all(self, progress: bool = False) -> list[CaptureResult]:
        """Capture every bucket, largest first so the smaller graphs reuse its memory pool."""
        sizes = list(reversed(self.batch_sizes))
        if progress:
            try:
                from tqdm import tqdm
                sizes = tqdm(sizes, desc='capturing CUDA graphs', unit='graph')
            except ImportError:
                pass
        return [self.capture(bs) for bs in sizes]

    def can_run(self, inputs: ModelInputs) -> bool:
        if not inputs.is_decoding or inputs.inputs_embeds is not None:
            return False
        batch = inputs.seq_length.numel()
        bs = self.bucket(batch)
        return bs in self.graphs and inputs.block_offsets.size(1) <= self.max_blocks_per_seq

    def _reset_padding(self, start: int, end: int):
        if end > start:
            self.input_ids[:, start:end].zero_()
            self.history_lengths[start:end].zero_()
            self.block_offsets[start:end].fill_(self.scratch_block)

    @torch.inference_mode()
    def decode(self, inputs: ModelInputs) -> torch.Tensor:
        """float32 logits `[batch, vocab]` of a decode step, by graph replay."""
        n = inputs.seq_length.numel()
        bs = self.bucket(n)
        width = inputs.block_offsets.size(1)
        self.input_ids[:, :n].copy_(inputs.input_ids, non_blocking=True)
        self.history_lengths[:n].copy_(inputs.history_lengths, non_blocking=True)
        self.block_offsets[:n, :width].copy_(inputs.block_offsets, non_blocking=True)
        self._reset_padding(n, bs)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
