"""What one model produced in a parity run, laid out the same way for the reference and the port.

Per phase ('prefill', 'decode'), per tap, one float32 tensor `[rows, features]` per sequence: the prompt's rows in
prefill, one row per decode step in decode. Logits are the tap 'logits'.
"""
from collections import defaultdict
from dataclasses import dataclass, field

import torch

PHASES = ('prefill', 'decode')


@dataclass
class CaptureSet:
    taps: dict[str, dict[str, list[torch.Tensor]]] = field(default_factory=dict)   # phase -> tap -> per sequence
    missing: dict[str, str] = field(default_factory=dict)                          # tap -> why it has no capture
    seconds: float = 0.0
    load_seconds: float = 0.0             # the port: loading it (weights included)
    graph_replay: object | None = None   # the port on CUDA: parity.graph_replay.GraphReplay
    sampled_tokens: list[list[int]] | None = None   # the port: the engine sampler's greedy pick at each step

    def get(self, phase: str, tap: str):
        return self.taps.get(phase, {}).get(tap)


class PhaseRows:
    """Collects rows per tap and sequence over the forward calls of one phase."""

    def __init__(self, num_seqs: int):
        self.rows = defaultdict(lambda: [[] for _ in range(num_seqs)])

    def add(self, tap: str, seq: int, rows: torch.Tensor):
        self.rows[tap][seq].append(rows)

    def done(self) -> dict[str, list[torch.Tensor]]:
        return {tap: [torch.cat(parts) for parts in per_seq] for tap, per_seq in self.rows.items()}
