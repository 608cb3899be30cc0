"""The transformers fallback and progressive porting.

A checkpoint whose architecture has no lmdp port runs on its transformers modeling code with lmdp's paged KV cache
and attention plugged in through transformers' attention interface (`TransformersForCausalLM`); `hybrid` then
replaces that code's modules, by name pattern, with lmdp modules one at a time, each step checked by the parity
harness. `choose_model_class` decides which serves a checkpoint (`model_impl='auto' | 'lmdp' | 'transformers'`).
"""
from .model import TransformersForCausalLM
from .select import MODEL_IMPLS, ModelChoice, choose_model_class
from .support import cuda_graph_refusal, refusals

__all__ = ['MODEL_IMPLS', 'ModelChoice', 'TransformersForCausalLM', 'choose_model_class', 'cuda_graph_refusal',
           'refusals']
