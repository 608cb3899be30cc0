"""The parity harness: runs a transformers reference and the lmdp port of the same checkpoint and diffs them."""
from .logits import LogitsReport, compare_logits

__all__ = ['LogitsReport', 'compare_logits']
