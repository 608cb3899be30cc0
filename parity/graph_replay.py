"""CUDA-graph replay against eager decode, on the port's own cache state (CUDA only).

After the teacher-forced decode steps, the port's next decode step (every sequence fed the reference's next token)
runs three ways on the same cache, through `lmdp.backends.cuda.CUDAGraphRunner`:

1. eagerly, at batch size n (the number of prompts);
2. by replay of a graph captured for batch size n: the same kernels at the same shapes, so the logits must be
   equal bit for bit;
3. by replay of the graph of the next larger bucket (n real rows, the rest padding slots whose K/V go to a scratch
   block): the GEMMs run at another M and cuBLAS may pick other tiles, so only closeness is expected.

Each run writes the K/V of every sequence's next position before reading it and reads nothing else it wrote (the
padding slots touch only the scratch block), so the three runs see the same cache and need no restore in between;
the sequences are not advanced, so the K/V left at that position is never read.
"""
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class ReplayDiff:
    """One graph replay against the eager step."""
    batch: int                              # real sequences in the step
    bucket: int                             # the captured graph's batch size (== batch: no padding)
    captured: bool = False
    model_refused: bool = False             # the port answered support_cuda_graph = False
    reason: str | None = None            # why there is no comparison (capture or replay failed)
    fix: str | None = None
    max_abs: float | None = None         # max |replay - eager| over the step's logits
    rel_l2: float | None = None          # ||replay - eager|| / ||eager||
    bitwise: bool | None = None          # the same bits (NaN included)
    argmax_rows_differ: list[int] = field(default_factory=list)
    vocab: int = 0

    def to_data(self) -> dict:
        return asdict(self)


@dataclass
class GraphReplay:
    exact: ReplayDiff | None = None      # batch n in the batch-n graph
    padded: ReplayDiff | None = None     # batch n in the next larger bucket's graph
    error: str | None = None             # the comparison could not run at all
    seconds: float = 0.0                    # captures included


def padded_bucket(n: int) -> int:
    """The bucket the engine's default spacing would replay a batch of n in if n were not captured."""
    from lmdp.backends.cuda import default_capture_batch_sizes
    return next(b for b in default_capture_batch_sizes(4 * n + 8) if b > n)


def _sync(t: torch.Tensor):
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def _compare(replay: torch.Tensor, eager: torch.Tensor, diff: ReplayDiff):
    diff.bitwise = replay.shape == eager.shape and torch.equal(_bits(replay), _bits(eager))
    d = (replay.double() - eager.double())
    if diff.bitwise:
        diff.max_abs, diff.rel_l2 = 0.0, 0.0
    else:
        diff.max_abs = d.abs().max().item()
        norm = eager.double().norm().item()
        diff.rel_l2 = d.norm().item() / norm if norm else float('inf')
    diff.argmax_rows_differ = torch.nonzero(replay.argmax(-1) != eager.argmax(-1)).flatten().tolist()
    diff.vocab = eager.size(-1)


def _replay(runner, inputs, eager: torch.Tensor, bucket: int) -> ReplayDiff:
    from lmdp.backends.cuda.capture_errors import explain_capture_error
    diff = ReplayDiff(batch=eager.size(0), bucket=bucket)
    graphs = None
    try:
        graphs = runner.capture_cuda_graphs([bucket])
        result = graphs.results[bucket]
        if not result.captured:
            diff.model_refused = not result.supported
            diff.reason, diff.fix = result.reason, result.fix
            return diff
        diff.captured = True
        if not runner.runner.can_replay(inputs):
            diff.reason = f'the graph runner refuses this step (batch {diff.batch}, bucket {bucket})'
            return diff
        replay = runner.runner.replay(inputs).clone()     # the engine's replay path
        _sync(replay)
        _compare(replay, eager, diff)
    except Exception as e:  # noqa: BLE001 - a failure is the check's finding, not the run's end
        diff.reason, diff.fix = explain_capture_error(e)
    finally:
        del graphs
        runner.runner.graphs = None
    return diff


def replay_vs_eager(runner, seq_ids: Sequence[int], tokens: Sequence[int]) -> GraphReplay:
    """Run the next decode step of `seq_ids` (fed `tokens`) eagerly and by replay; see the module docstring."""
    start = time.perf_counter()
    replay = _replay_vs_eager(runner, seq_ids, tokens)
    replay.seconds = time.perf_counter() - start
    return replay


def _replay_vs_eager(runner, seq_ids: Sequence[int], tokens: Sequence[int]) -> GraphReplay:
    try:
        inputs = runner.decode_inputs(seq_ids, tokens)
        eager = runner.runner.logits(runner.runner.forward(inputs)).clone()
        _sync(eager)
        n = len(seq_ids)
        return GraphReplay(exact=_replay(runner, inputs, eager, n), padded=_replay(runner, inputs, eager,
                                                                                   padded_bucket(n)))
    except Exception as e:  # noqa: BLE001
        return GraphReplay(error=f'{type(e).__name__}: {e}')
