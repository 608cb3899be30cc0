"""Errors lmdp raises for bad input. Each message names what was wrong and what to do about it."""


class LmdpError(Exception):
    """Base of lmdp's own errors."""


class ConfigError(LmdpError, ValueError):
    """A checkpoint's config.json can't be read or lacks what the engine needs."""


class ArchitectureError(LmdpError, ValueError):
    """No model class is registered for a checkpoint's architecture."""


class WeightLoadError(LmdpError, ValueError):
    """A checkpoint's tensors don't fit the model: missing, mis-shaped or unreadable."""


class EnvError(LmdpError, ValueError):
    """An environment variable lmdp reads holds a value it can't parse (see `lmdp.envs`)."""


class TokenizerError(LmdpError, ValueError):
    """A checkpoint's tokenizer can't be loaded."""


class PipelineClosedError(LmdpError, RuntimeError):
    """A pipeline was used after `close()` (or after its `with` block ended)."""


class TensorParallelError(LmdpError, RuntimeError):
    """A tensor-parallel rank died, failed or hung (the message names it); every rank was shut down."""
