"""Continuous batching: which sequences run in the next step, and what a step's sampled tokens do to them.

Prefill: waiting sequences join in arrival order while the token budget (`max_prefill_token_num`), the batch limit
and the free blocks allow; only the first prompt of a step may be cut into a chunk, so a prompt longer than the
budget is prefilled over several steps. Decode: every running sequence adds one token. When a decode needs a block
and none is free, the newest running sequence is preempted: its blocks are freed and it goes back to the front of
the queue, to be recomputed later (with prefix caching, mostly from its own blocks still in the cache).

Two policies decide how the two meet. Without `mixed_prefill` a step is all-prefill or all-decode, and prefill
goes first: while prompts wait and fit, the running sequences draw no token (a long prompt stalls them all). With
`mixed_prefill` (as vLLM's and SGLang's chunked-prefill schedulers do), every running sequence decodes in every
step and the prefill chunks ride along in the same step, under the same budget: the step's rows are the decodes
first (q_len 1, `num_decodes` of them), then the prompt chunks. Blocks go to the decodes first; a step in which a
decode had to preempt takes no prompt (the pool is full: a prompt now would only be preempted again).
"""
from collections import deque
from dataclasses import dataclass

from ..paging import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new: list[int]        # tokens each sequence adds to the cache in this step (q_seqlens)
    is_decoding: bool         # every row is a decode (a mixed step is not: it runs the prefill path)
    num_decodes: int = 0      # leading rows that are decodes of running sequences (all of them when is_decoding)

    def __post_init__(self):
        if self.is_decoding:
            self.num_decodes = len(self.seqs)

    def rows(self, lo: int, hi: int) -> 'ScheduledBatch':
        """The step cut down to rows [lo, hi) (to find which rows make a step fail)."""
        num_decodes = max(0, min(hi, self.num_decodes) - lo)
        return ScheduledBatch(self.seqs[lo:hi], self.num_new[lo:hi], self.is_decoding, num_decodes)


class Scheduler:

    def __init__(self, block_manager: BlockManager, max_batch_size: int, max_prefill_token_num: int,
                 mixed_prefill: bool = False):
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_prefill_token_num = max_prefill_token_num
        self.mixed_prefill = mixed_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch, or None when nothing can run."""
        if self.mixed_prefill and self.running:
            batch = self._schedule_mixed()
        else:
            batch = self._schedule_prefill() or self._schedule_decode()
        if batch is None and self.waiting:
            # Nothing runs, yet prompts wait: the pool is held by part-prefilled prompts behind the head of the
            # queue. Let them go (they recompute later) so the head fits: session_len never exceeds the pool.
            for seq in list(self.waiting)[1:]:
                self.block_manager.free(seq)
            batch = self._schedule_prefill()
        return batch

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_prefill_token_num
        seqs, num_new = [], []
        while self.waiting and budget and len(self.running) + len(seqs) < self.max_batch_size:
            seq = self.waiting[0]
            prefix = self.block_manager.match_prefix(seq) if not seq.blocks else []
            cached = len(prefix) * self.block_manager.block_size if prefix else seq.num_cached
            remaining = seq.num_tokens - cached
            n = min(remaining, budget)
            if n < remaining and seqs:
                break
            if not self.block_manager.allocate(seq, cached + n, prefix):
                break
            self.waiting.popleft()
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        return ScheduledBatch(seqs, num_new, is_decoding=False) if seqs else None

    def _schedule_mixed(self) -> ScheduledBatch | None:
        """Every running sequence decodes; waiting prompts fill the budget behind them (see the module docstring)."""
        preempted = self.num_preemptions
        decode = self._schedule_decode()
        if decode is None:                 # every running sequence had to go: a plain prefill step, if any fits
            return self._schedule_prefill()
        if not self.waiting or self.num_preemptions > preempted:
            return decode
        prefill = self._schedule_prefill()
        if prefill is None:
            return decode
        return ScheduledBatch(decode.seqs + prefill.seqs, decode.num_new + prefill.num_new, is_decoding=False,
                              num_decodes=len(decode.seqs))

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.allocate(seq, seq.num_tokens):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                scheduled.append(seq)
        self.running.extend(scheduled)
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_decoding=True) if scheduled else None

    def _preempt(self, seq: Sequence):
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, batch: ScheduledBatch, sampled: list[int | None], session_len: int) -> list[Sequence]:
        """Account a finished step: `sampled[i]` is the token drawn for `batch.seqs[i]`, None where its prefill
        chunk did not reach the end of its tokens. Returns the sequences that finished."""
        finished = []
        for row, (seq, n, token) in enumerate(zip(batch.seqs, batch.num_new, sampled)):
            seq.num_cached += n
            self.block_manager.register_full_blocks(seq)
            if token is None:
                self.waiting.appendleft(seq)      # the rest of its chunked prefill goes first next time
                continue
            seq.token_ids.append(token)
            reason = finish_reason(seq, token, session_len)
            if reason is not None:
                seq.finish_reason = reason
                finished.append(seq)
            elif row >= batch.num_decodes:     # a prompt done: it decodes from now on
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
        if finished:
            self._drop(finished)
        return finished

    def abort(self, seq: Sequence, reason: str = 'abort'):
        """Finish `seq` now, wherever it is."""
        if not seq.is_finished:
            seq.finish_reason = reason
            self._drop([seq])

    def _drop(self, seqs: list[Sequence]):
        gone = set(id(s) for s in seqs)
        for seq in seqs:
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
        self.running = deque(s for s in self.running if id(s) not in gone)
        if any(id(s) in gone for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if id(s) not in gone)


def finish_reason(seq: Sequence, token: int, session_len: int) -> str | None:
    """Why `seq` stops after sampling `token`, or None when it goes on."""
    if token in seq.params.stop_ids:
        return 'stop'
    if seq.num_generated >= seq.params.max_new_tokens or seq.num_tokens >= session_len:
        return 'length'
    return None
