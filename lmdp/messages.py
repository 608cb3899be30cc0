"""What a user hands the engine and what comes back: engine config, generation config, response.

Names and defaults follow lmdeploy's `PytorchEngineConfig`, `GenerationConfig` and `Response`, so a script written
for lmdeploy's `pipeline()` runs unchanged. Both configs check every field whenever it is set: a bad value is an
error at the line that wrote it, not a crash deep inside a step.
"""
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal

from . import validate

FinishReason = Literal['stop', 'length', 'abort', 'error']


#: how an architecture is served: its lmdp port, its transformers code on the paged engine, or whichever applies
MODEL_IMPLS = ('auto', 'lmdp', 'transformers')

class _Checked:
    """A dataclass whose every field is checked whenever it is set (in the constructor or later), so a bad value
    fails at the line that wrote it, and a name that is no field (a typo) is refused instead of stored."""

    _checks: dict[str, Callable[[str, object], object]] = {}

    def __setattr__(self, name, value):
        check = self._checks.get(name)
        if check is None:
            known = ', '.join(f.name for f in fields(self))
            raise AttributeError(f'{type(self).__name__} has no field {name!r}; its fields: {known}')
        super().__setattr__(name, check(f'{type(self).__name__}.{name}', value))


def _positive_or_none(name, value):
    return validate.integer(name, value, 1, optional=True)


def _power_of_two(name, value):
    value = validate.integer(name, value, 1)
    if value & (value - 1):
        raise ValueError(f'{name} must be a power of two, got {value}')
    return value


def _dtype(name, value):
    if isinstance(value, str) or type(value).__name__ == 'dtype':
        return value                    # resolved (and checked) against the checkpoint by lmdp.config.resolve_dtype
    raise TypeError(f"{name} must be 'auto', 'float32', 'float16' or 'bfloat16' (or a torch.dtype), got "
                    f'{type(value).__name__}')


def _module_map(name, value):
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f'{name} must be the path of a .py file that defines MODULE_MAP, or a dict, got '
                        f'{type(value).__name__}')
    # fail here, at the line that names the file, rather than after the tokenizer and config have loaded
    if not os.path.isfile(value):
        raise FileNotFoundError(f'custom_module_map {os.fspath(value)!r} does not exist; pass the path of a .py file '
                                'that defines MODULE_MAP')
    return value


def _optional_int_list(name, value):
    return validate.int_list(name, value, 1)


@dataclass
class PytorchEngineConfig(_Checked):
    """How the engine is built: precision, KV pool, batch limits, scheduler and device.

    session_len: longest sequence (prompt + output); default the model's max_position_embeddings.
    max_batch_size: most sequences in one step; default 256 on CUDA, 32 elsewhere.
    cache_max_entry_count: on CUDA, the fraction of the memory free after the weights load given to the KV pool.
    num_gpu_blocks: the KV pool's size in blocks; overrides cache_max_entry_count when > 0.
    max_prefill_token_num: token budget of one prefill step (longer prompts are prefilled in chunks).
    mixed_prefill: the running sequences decode in every step, and waiting prompts' chunks (up to
    max_prefill_token_num tokens) ride along in the same step, so a long prompt does not stall everyone's next token.
    Off by default: on the H200 (1B shape, 256 requests) it cost 28% of the throughput and raised p99 inter-token
    latency from 6 to 29 ms (notes/performance.md). False: a step is all-prefill or all-decode, prefill first.
    device_type: 'auto' (CUDA when there is one), 'cuda' or 'cpu'.
    tp: tensor-parallel ranks (one process each; NCCL on GPUs, gloo on the CPU). pipeline() starts them on this host;
    under torchrun (`torchrun --nproc-per-node N`, across hosts too) every process runs the script and rank 0 serves
    the pipeline (see the README).
    model_impl: 'auto' (the lmdp port when the architecture has one, else its transformers modeling code on lmdp's
    paged attention: the transformers fallback), 'lmdp' (a port or an error) or 'transformers' (the fallback).
    """
    dtype: str = 'auto'
    tp: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float = 0.8
    block_size: int = 64
    num_gpu_blocks: int = 0
    max_prefill_token_num: int = 4096
    mixed_prefill: bool = False
    eager_mode: bool = False
    custom_module_map: None | str | dict[str, object] = None
    device_type: str = 'auto'
    enable_prefix_caching: bool = False
    cudagraph_capture_batch_sizes: list[int] | None = None
    trust_remote_code: bool = False
    model_impl: str = 'auto'

    _checks = dict(
        dtype=_dtype,
        tp=lambda n, v: validate.integer(n, v, 1),
        session_len=_positive_or_none,
        max_batch_size=_positive_or_none,
        cache_max_entry_count=lambda n, v: validate.number(n, v, 0, 1, low_open=True,
                                                           rule='a fraction of free memory in (0, 1]'),
        block_size=_power_of_two,
        num_gpu_blocks=lambda n, v: validate.integer(n, v, 0),
        max_prefill_token_num=lambda n, v: validate.integer(n, v, 1),
        mixed_prefill=validate.boolean,
        eager_mode=validate.boolean,
        custom_module_map=_module_map,
        device_type=lambda n, v: validate.choice(n, v, ('auto', 'cuda', 'cpu')),
        enable_prefix_caching=validate.boolean,
        cudagraph_capture_batch_sizes=_optional_int_list,
        trust_remote_code=validate.boolean,
        model_impl=lambda n, v: validate.choice(n, v, MODEL_IMPLS),
    )

    def resolved_device(self) -> str:
        import torch
        if self.device_type == 'auto':
            return 'cuda' if torch.cuda.is_available() else 'cpu'
        if self.device_type == 'cuda' and not torch.cuda.is_available():
            raise ValueError("device_type='cuda' but torch sees no CUDA device; use device_type='cpu'")
        return self.device_type


@dataclass
class GenerationConfig(_Checked):
    """How one request is decoded.

    do_sample=False (or temperature=0) decodes greedily. top_k=0 means no top-k limit. Stop words are
    strings matched in the output text; stop_token_ids are matched on tokens and so are the model's eos ids
    unless ignore_eos. The stop id or word that ends a request is left out of its output unless
    include_stop_str_in_output. min_new_tokens keeps every stop id from being sampled until that many tokens exist.
    random_seed makes a sampled request repeat exactly, whatever else shares its batch. logprobs=N returns, per
    output token, the log-probabilities of the N likeliest tokens and of the chosen one (raw model logits).

    Every field is checked when it is set, at construction or later: a wrong type is a TypeError and a value out
    of range a ValueError, each naming the field. Values that depend on the model (stop ids against its
    vocabulary) are checked when a request is submitted.
    """
    max_new_tokens: int = 512
    min_new_tokens: int | None = None
    do_sample: bool = False
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    random_seed: int | None = None
    stop_words: list[str] | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None

    _checks = dict(
        max_new_tokens=lambda n, v: validate.integer(n, v, 0),
        min_new_tokens=lambda n, v: validate.integer(n, v, 0, optional=True),
        do_sample=validate.boolean,
        temperature=lambda n, v: validate.number(n, v, 0, rule='>= 0 (0 means greedy)'),
        top_k=lambda n, v: validate.integer(n, v, 0),
        top_p=lambda n, v: validate.number(n, v, 0, 1, low_open=True),
        min_p=lambda n, v: validate.number(n, v, 0, 1),
        repetition_penalty=lambda n, v: validate.number(n, v, 0, low_open=True, rule='> 0 (1: none)'),
        ignore_eos=validate.boolean,
        random_seed=lambda n, v: validate.integer(n, v, optional=True),
        stop_words=validate.str_list,
        stop_token_ids=lambda n, v: validate.int_list(n, v, 0),
        skip_special_tokens=validate.boolean,
        include_stop_str_in_output=validate.boolean,
        logprobs=lambda n, v: validate.integer(n, v, 0, optional=True),
    )

    def validate(self) -> 'GenerationConfig':
        """Check every field again (a list field may have been changed in place); returns self."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name))
        return self

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_pretrained(cls, model_path: str, **overrides) -> 'GenerationConfig':
        """lmdp's defaults, replaced by the checkpoint's generation_config.json where it sets a value."""
        from .hf_config import read_generation_config
        values = read_generation_config(model_path)
        hf = {k: v for k, v in values.items() if k in cls._checks and k != 'stop_token_ids' and v is not None}
        for name, value in hf.items():
            try:
                cls._checks[name](name, value)
            except (TypeError, ValueError) as e:
                from .errors import ConfigError
                raise ConfigError(f'generation_config.json in {model_path!r}: {e}; fix or remove "{name}"') from None
        return cls(**dict(hf, **overrides))


@dataclass
class Response:
    """One request's result (a batch call), or the newest piece of it (a streaming call).

    finish_reason is None while a stream goes on; 'stop' (a stop id or word), 'length' (max_new_tokens or
    session_len), 'abort', or 'error' (then `error` says what was wrong with the request).
    """
    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    index: int = 0
    error: str | None = None
