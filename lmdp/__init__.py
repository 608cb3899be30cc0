"""lmdp: a model-porting workbench for a paged-attention LLM inference engine.

`from lmdp import pipeline, PytorchEngineConfig, GenerationConfig` serves a checkpoint. Those names load on first
use, so `import lmdp` stays quick and pulls in neither torch nor transformers.
"""

__version__ = '0.1.0'

from ._lazy import lazy_getattr

_LAZY = {
    'pipeline': 'lmdp.api',
    'Pipeline': 'lmdp.api',
    'PytorchEngineConfig': 'lmdp.messages',
    'GenerationConfig': 'lmdp.messages',
    'Response': 'lmdp.messages',
}

__all__ = ['__version__', *_LAZY]


__getattr__ = lazy_getattr(globals(), _LAZY)
