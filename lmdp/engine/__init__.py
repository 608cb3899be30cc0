"""The engine: model agent, KV cache and step runner (the scheduler and pipeline grow here)."""
from .cache_engine import CacheEngine
from .model_agent import ModelAgent, build_model
from .step_runner import StepOutput, StepRunner

__all__ = ['CacheEngine', 'ModelAgent', 'StepOutput', 'StepRunner', 'build_model']
