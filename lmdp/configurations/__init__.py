"""ConfigBuilders. Importing this package registers the built-in ones."""
from . import default, gemma, llama  # noqa: F401  (registration happens on import)
from .builder import AutoModelConfigBuilder
from .default import DefaultModelConfigBuilder

__all__ = ['AutoModelConfigBuilder', 'DefaultModelConfigBuilder']
