"""The parity harness: runs a transformers reference and the lmdp port of the same checkpoint and diffs them,
tap by tap (embeddings, every layer's input norm / attention / MLP / residual stream, final norm, logits), in a
packed prefill and in paged decode steps.

    report = parity.compare('./llama', dtype='bfloat16')
    print(report.summary()); report.first_divergence; report.save('out/')

The same run is a pytest suite: `pytest parity --model ./llama` (see parity/plugin.py).
"""
from .logits import LogitsReport, compare_logits
from .metrics import Metrics
from .report import CheckResult, ParityReport, TapResult
from .run import References, compare, run_references
from .taps import TAP_OVERRIDES, Tap, tap_list

__all__ = ['CheckResult', 'LogitsReport', 'Metrics', 'ParityReport', 'References', 'TAP_OVERRIDES', 'Tap',
           'TapResult', 'compare', 'compare_logits', 'run_references', 'tap_list']
