"""The engine: model agent, KV cache, model runner, scheduler, sampler, and the step runner it grew from."""
from .cache_engine import CacheEngine
from .engine import Engine, EngineOutput, EngineStats
from .model_agent import ModelAgent, build_model
from .model_runner import ModelRunner
from .sampler import Sampler
from .scheduler import ScheduledBatch, Scheduler
from .sequence import SamplingParams, Sequence, SequenceStatus
from .step_runner import StepOutput, StepRunner

__all__ = ['CacheEngine', 'Engine', 'EngineOutput', 'EngineStats', 'ModelAgent', 'ModelRunner', 'Sampler',
           'SamplingParams', 'ScheduledBatch', 'Scheduler', 'Sequence', 'SequenceStatus', 'StepOutput', 'StepRunner',
           'build_model']
