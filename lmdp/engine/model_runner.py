"""The model runner: packs a scheduled batch into one step's `ModelInputs`, runs the model, picks rows to sample.

Host work per step is kept small: the step's small integer tensors (q_seqlens, history lengths, block_offsets) go
to the device in one copy from a reused pinned buffer, the token ids in a second. Decode steps pad block_offsets
to a fixed width (the blocks of one session_len), so their shapes depend on the batch size alone, which lets
`replay` hand them to a captured CUDA graph of the same batch bucket.
"""

import numpy as np
import torch

from ..model_inputs import ModelInputs
from .cache_engine import CacheEngine
from .model_agent import ModelAgent
from .scheduler import ScheduledBatch


class _Staging:
    """Host arrays reach the device through reused pinned buffers, one per named slot (no pinning per step).

    Before a slot is rewritten, the copy out of it last time must be done: an event recorded after that copy
    says so (it has almost always fired, since each step ends by reading its sampled tokens back).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._slots = {}

    def __call__(self, array: np.ndarray, slot: str) -> torch.Tensor:
        host = torch.from_numpy(array)
        if self.device.type == 'cpu':
            return host
        flat = host.reshape(-1)
        buf, done = self._slots.get(slot, (None, None))
        if done is not None:
            done.synchronize()
        if buf is None or buf.dtype != host.dtype or buf.numel() < flat.numel():
            buf = torch.empty(max(flat.numel(), 4096), dtype=host.dtype, pin_memory=True)
        buf[:flat.numel()].copy_(flat)
        out = buf[:flat.numel()].view(host.shape).to(self.device, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._slots[slot] = (buf, done)
        return out


class ModelRunner:
    """One forward step over the paged KV cache."""

    def __init__(self, agent: ModelAgent, cache: CacheEngine, max_blocks_per_seq: int):
        self.agent, self.cache = agent, cache
        self.device = agent.device
        self.max_blocks_per_seq = max_blocks_per_seq
        self._stage = _Staging(self.device)
        self.graphs = None

    def capture_cuda_graphs(self, scratch_block: int, max_batch_size: int, batch_sizes=None, progress: bool = True):
        """Capture decode graphs for every batch-size bucket (CUDA only); see lmdp.backends.cuda."""
        from ..backends.cuda import CUDAGraphRunner
        agent = self.agent
        self.graphs = CUDAGraphRunner(agent.model, agent.ctx_mgr, agent.model_config, self.cache.kv_caches,
                                      max_blocks_per_seq=self.max_blocks_per_seq, scratch_block=scratch_block,
                                      capture_batch_sizes=batch_sizes, max_batch_size=max_batch_size)
        self.graphs.capture_all(progress=progress)
        return self.graphs.results

    def can_replay(self, inputs: ModelInputs) -> bool:
        return self.graphs is not None and self.graphs.can_run(inputs)

    def replay(self, inputs: ModelInputs) -> torch.Tensor:
        """float32 logits of a decode step `[batch, vocab]`, by CUDA-graph replay."""
        return self.graphs.decode(inputs)

    def prepare_inputs(self, batch: ScheduledBatch, ahead_tokens: torch.Tensor | None = None) -> ModelInputs:
        """The packed step: each sequence's next `num_new` uncached tokens after its cached history.

        `ahead_tokens` (decode only): the tokens the previous decode step drew, still on the device and not yet in
        the sequences' host records; this step feeds them in, one position further on.
        """
        seqs, num_new = batch.seqs, batch.num_new
        B = len(seqs)
        ahead = 0 if ahead_tokens is None else 1
        if batch.is_decoding:
            token_ids = [s.token_ids[-1] for s in seqs] if ahead_tokens is None else []
            width = self.max_blocks_per_seq
        else:
            token_ids = [t for s, n in zip(seqs, num_new) for t in s.token_ids[s.num_cached:s.num_cached + n]]
            width = max(len(s.blocks) for s in seqs)
        # one int32 array: q_seqlens | history_lengths | block_offsets
        meta = np.zeros(2 * B + B * width, dtype=np.int32)
        meta[:B] = num_new
        history = [s.num_cached + ahead for s in seqs]
        meta[B:2 * B] = history
        offsets = meta[2 * B:].reshape(B, width)
        longest = max(len(s.blocks) for s in seqs)
        if longest > width:
            raise ValueError(f'a sequence holds {longest} KV blocks but a decode step\'s block table has room for '
                             f'{width} (max_blocks_per_seq); raise session_len / max_blocks_per_seq')
        for row, seq in zip(offsets, seqs):
            row[:len(seq.blocks)] = seq.blocks
        meta_dev = self._stage(meta, 'meta')
        if ahead_tokens is None:
            ids_dev = self._stage(np.asarray(token_ids, dtype=np.int64), 'input_ids').view(1, -1)
        else:
            ids_dev = ahead_tokens.view(1, -1)
        kv_lens = [h + n for h, n in zip(history, num_new)]
        num_decodes = 0 if batch.is_decoding else batch.num_decodes
        return ModelInputs(input_ids=ids_dev, seq_length=meta_dev[:B], history_lengths=meta_dev[B:2 * B],
                           block_offsets=meta_dev[2 * B:].view(B, width), is_decoding=batch.is_decoding,
                           max_q_seqlen=max(num_new), max_kv_seqlen=max(kv_lens),
                           sum_kv_seqlen=sum(kv_lens[num_decodes:]), num_decodes=num_decodes)

    def forward(self, inputs: ModelInputs) -> torch.Tensor:
        """The model's output for every packed token, `[T, hidden]` (a graph runner replays decode steps here)."""
        return self.agent.forward(inputs, self.cache.kv_caches)

    def logits(self, hidden: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """float32 logits of the given rows of `forward`'s output (all rows when None; a list, or an index tensor
        on the device)."""
        if rows is not None:
            hidden = hidden[rows if torch.is_tensor(rows) else self._stage(np.asarray(rows, dtype=np.int64), 'rows')]
        return self.agent.get_logits(hidden)

    def wait(self, event):
        """Block until a step's event has fired (under tensor parallelism, watching the other ranks meanwhile)."""
        event.synchronize()

    def close(self):
        """Let go of what the runner started (the other ranks, under tensor parallelism)."""
