"""The layer-local view's inputs: for each forward call of a run, the truth's stream at every boundary it swaps.

A run's boundaries are what enters each decoder layer ('layer.N': the truth's `embed` for layer 0, its
`layers.N-1.residual` after that), the stream after each layer's attention ('mid.N': its `layers.N.mid`) and what
enters the final norm ('final'). transformers runs each prompt alone, the port packs them, so a call's rows are the
chosen sequences' rows of the chosen phase (and decode step), concatenated.
"""
from collections.abc import Sequence

import torch

from .capture_set import CaptureSet
from .taps import Tap


def boundary_taps(taps: Sequence[Tap]) -> dict[str, str]:
    """boundary key -> the truth tap that holds its value, for the boundaries this run's taps allow."""
    names = {t.name for t in taps}
    layers = sorted({t.layer for t in taps if t.layer is not None})
    out = {}
    for i in layers:
        source = 'embed' if i == 0 else f'layers.{i - 1}.residual'
        if source in names:
            out[f'layer.{i}'] = source
        if f'layers.{i}.mid' in names:
            out[f'mid.{i}'] = f'layers.{i}.mid'
    if layers and f'layers.{layers[-1]}.residual' in names:
        out['final'] = f'layers.{layers[-1]}.residual'
    return out


def call_values(truth: CaptureSet, sources: dict[str, str], phase: str, seqs: Sequence[int],
                step: int | None = None, device=None) -> dict[str, torch.Tensor]:
    """The truth's rows for one forward call over sequences `seqs` (their prompts in 'prefill', or decode step
    `step` in 'decode'), packed in that order."""
    values = {}
    for key, tap in sources.items():
        rows: list[torch.Tensor] = truth.get(phase, tap)
        if rows is None:
            continue
        parts = [rows[i] if step is None else rows[i][step:step + 1] for i in seqs]
        values[key] = torch.cat(parts).to(device)
    return values
