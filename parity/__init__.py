"""The parity harness: runs a transformers reference and the lmdp port of the same checkpoint and diffs them,
tap by tap (embeddings, every layer's input norm / attention / MLP / residual stream, final norm, logits), in a
packed prefill and in paged decode steps.

    report = parity.compare('./llama', dtype='bfloat16')
    print(report.summary()); report.first_divergence; report.save('out/')

The same run is a pytest suite: `pytest parity --model ./llama` (see parity/plugin.py).
"""
# Loaded on first use: the pytest plugin (parity.plugin, a pytest11 entry point, so imported by every pytest run
# wherever lmdp is installed) must not pull torch into test sessions that never run the harness.
from lmdp._lazy import lazy_getattr

_LAZY = {
    'LogitsReport': 'parity.logits', 'compare_logits': 'parity.logits',
    'Metrics': 'parity.metrics',
    'CheckResult': 'parity.report', 'ParityReport': 'parity.report', 'TapResult': 'parity.report',
    'References': 'parity.run', 'compare': 'parity.run', 'run_references': 'parity.run',
    'TAP_OVERRIDES': 'parity.taps', 'Tap': 'parity.taps', 'tap_list': 'parity.taps',
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(globals(), _LAZY)
