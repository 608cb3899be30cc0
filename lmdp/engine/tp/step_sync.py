"""One step on every rank: rank 0's model runner broadcasts each op it runs, and the workers run the same op.

The engine schedules and samples on rank 0 alone. Whenever its model runner runs an op (a forward, the logits of
some rows, a CUDA-graph replay, a capture), `LeaderModelRunner` first broadcasts a small header (which op, the
step's sizes) over the control group, then the step's tensors over the default group: one int32 tensor holding
q_seqlens | history_lengths | block_offsets | token ids (the token ids of a decode step that runs ahead are still on
the device: broadcasting them needs no host sync), and the embeddings or the rows to sample where the op has them.
`follow` is the workers' loop: receive, rebuild the same ModelInputs, run the same op on their shard, and wait for
the next. The layers' own collectives (all-reduce after row-parallel layers, the vocabulary all-gather) then meet
in the same order on every rank.
"""

import numpy as np
import torch
import torch.distributed as dist

from ...model_inputs import ModelInputs
from ..model_runner import ModelRunner

FORWARD, LOGITS, REPLAY, CAPTURE, SHUTDOWN = 1, 2, 3, 4, 5
OP_NAMES = {FORWARD: 'forward', LOGITS: 'logits', REPLAY: 'graph replay', CAPTURE: 'CUDA-graph capture',
            SHUTDOWN: 'shutdown'}
# header: op, step, batch, tokens, block-table width, is_decoding, max_q, max_kv, sum_kv, has_embeds, rows,
# num_decodes
HEADER = 12


def _header(op: int, step: int, inputs: ModelInputs | None = None, rows: torch.Tensor | None = None):
    h = torch.zeros(HEADER, dtype=torch.int64)
    h[0], h[1], h[10] = op, step, -1 if rows is None else rows.numel()
    if inputs is not None:
        batch, width = inputs.block_offsets.shape
        h[2:10] = torch.tensor([batch, inputs.input_ids.numel(), width, int(inputs.is_decoding), inputs.max_q_seqlen,
                                inputs.max_kv_seqlen, inputs.sum_kv_seqlen, int(inputs.inputs_embeds is not None)])
        h[11] = inputs.num_decodes
    return h


def _pack(inputs: ModelInputs) -> torch.Tensor:
    return torch.cat([inputs.seq_length.int(), inputs.history_lengths.int(), inputs.block_offsets.int().flatten(),
                      inputs.input_ids.flatten().int()])


def _receive_inputs(h: torch.Tensor, device, model_config) -> ModelInputs:
    batch, tokens, width, decoding, max_q, max_kv, sum_kv, embeds = h[2:10].tolist()
    num_decodes = int(h[11])
    packed = torch.empty(2 * batch + batch * width + tokens, dtype=torch.int32, device=device)
    dist.broadcast(packed, 0)
    seq_length, history, offsets, ids = packed.split([batch, batch, batch * width, tokens])
    inputs_embeds = None
    if embeds:
        inputs_embeds = torch.empty(tokens, model_config.hidden_size, dtype=model_config.dtype, device=device)
        dist.broadcast(inputs_embeds, 0)
    return ModelInputs(input_ids=ids.long().view(1, tokens), seq_length=seq_length, history_lengths=history,
                       block_offsets=offsets.view(batch, width), is_decoding=bool(decoding), max_q_seqlen=max_q,
                       max_kv_seqlen=max_kv, sum_kv_seqlen=sum_kv, inputs_embeds=inputs_embeds,
                       num_decodes=num_decodes)


class LeaderModelRunner(ModelRunner):
    """Rank 0's model runner: each op runs on every rank (see the module docstring). A failure inside an op leaves
    the ranks out of step, so it ends the group: a TensorParallelError that names the rank behind it."""

    def __init__(self, agent, cache, max_blocks_per_seq: int, ranks):
        super().__init__(agent, cache, max_blocks_per_seq)
        self.ranks = ranks
        self._last_hidden = None

    def _send(self, op: int, inputs: ModelInputs | None = None, rows: torch.Tensor | None = None):
        dist.broadcast(_header(op, self.ranks.step, inputs, rows), 0, group=self.ranks.cpu_group)
        if inputs is not None:
            dist.broadcast(_pack(inputs), 0)
            if inputs.inputs_embeds is not None:
                dist.broadcast(inputs.inputs_embeds.contiguous(), 0)
        if rows is not None:
            dist.broadcast(rows, 0)

    def forward(self, inputs: ModelInputs) -> torch.Tensor:
        with self.ranks.op('forward'):
            self._send(FORWARD, inputs)
            hidden = super().forward(inputs)
        self._last_hidden = hidden
        return hidden

    def logits(self, hidden: torch.Tensor, rows=None) -> torch.Tensor:
        # the workers take the rows from their own output of the last forward
        if hidden is not self._last_hidden:
            raise RuntimeError('under tensor parallelism, logits() takes the output of the last forward()')
        if rows is not None and not torch.is_tensor(rows):
            rows = self._stage(np.asarray(rows, dtype=np.int64), 'rows')
        with self.ranks.op('logits'):
            self._send(LOGITS, rows=rows)
            return super().logits(hidden, rows)

    def replay(self, inputs: ModelInputs) -> torch.Tensor:
        with self.ranks.op('graph replay'):
            self._send(REPLAY, inputs)
            return super().replay(inputs)

    def capture_cuda_graphs(self, scratch_block: int, max_batch_size: int, batch_sizes=None, progress: bool = True):
        with self.ranks.op('CUDA-graph capture'):
            self._send(CAPTURE)
            args = dict(scratch_block=scratch_block, max_batch_size=max_batch_size, batch_sizes=batch_sizes)
            dist.broadcast_object_list([args], 0, group=self.ranks.cpu_group)
            return super().capture_cuda_graphs(progress=progress, **args)

    def wait(self, event):
        self.ranks.wait(event)

    def close(self):
        """Tell the workers to stop, and end the group."""
        if not self.ranks.closed and not self.ranks.broken:
            try:
                dist.broadcast(_header(SHUTDOWN, self.ranks.step + 1), 0, group=self.ranks.cpu_group)
            except Exception:   # noqa: BLE001 - a worker gone already: shutdown stops the rest
                self.ranks.abort('rank 0 could not reach every rank to stop it')
        self.ranks.shutdown()


def follow(runner: ModelRunner, ranks, heartbeat):
    """A worker: run rank 0's ops on this rank's shard until it says stop."""
    hidden = None
    config = runner.agent.model_config
    while True:
        h = torch.empty(HEADER, dtype=torch.int64)
        heartbeat.state = 'idle'
        dist.broadcast(h, 0, group=ranks.cpu_group)
        op, heartbeat.step = int(h[0]), int(h[1])
        heartbeat.state = 'busy'
        if op == SHUTDOWN:
            return
        if op in (FORWARD, REPLAY):
            inputs = _receive_inputs(h, runner.device, config)
            if op == FORWARD:
                hidden = runner.forward(inputs)
            elif runner.can_replay(inputs):
                runner.replay(inputs)
            else:       # no graph of that size here: the eager step runs the same collectives in the same order
                runner.logits(runner.forward(inputs))
        elif op == LOGITS:
            rows = None
            if h[10] >= 0:
                rows = torch.empty(int(h[10]), dtype=torch.int64, device=runner.device)
                dist.broadcast(rows, 0)
            runner.logits(hidden, rows)
        elif op == CAPTURE:
            args = [None]
            dist.broadcast_object_list(args, 0, group=ranks.cpu_group)
            runner.capture_cuda_graphs(progress=False, **args[0])
        else:
            raise RuntimeError(f'rank {ranks.rank}: unknown op {op} from rank 0 (step {int(h[1])}); the ranks run '
                               'different lmdp versions?')
