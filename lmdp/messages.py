"""What a user hands the engine and what comes back: engine config, generation config, response.

Names and defaults follow lmdeploy's `PytorchEngineConfig`, `GenerationConfig` and `Response`, so a script written
for lmdeploy's `pipeline()` runs unchanged. Both configs check their values when built: a bad value is an error at
the line that wrote it, not a crash deep inside a step.
"""
import json
import os
from dataclasses import dataclass, field, fields
from typing import Dict, List, Literal, Optional, Union

FinishReason = Literal['stop', 'length', 'abort', 'error']
#: how an architecture is served: its lmdp port, its transformers code on the paged engine, or whichever applies
MODEL_IMPLS = ('auto', 'lmdp', 'transformers')


def _check(ok: bool, message: str):
    if not ok:
        raise ValueError(message)


@dataclass
class PytorchEngineConfig:
    """How the engine is built: precision, KV pool, batch limits, scheduler and device.

    session_len: longest sequence (prompt + output); default the model's max_position_embeddings.
    max_batch_size: most sequences in one step; default 256 on CUDA, 32 elsewhere.
    cache_max_entry_count: on CUDA, the fraction of the memory free after the weights load given to the KV pool.
    num_gpu_blocks: the KV pool's size in blocks; overrides cache_max_entry_count when > 0.
    max_prefill_token_num: token budget of one prefill step (longer prompts are prefilled in chunks).
    device_type: 'auto' (CUDA when there is one), 'cuda' or 'cpu'.
    model_impl: 'auto' (the lmdp port when the architecture has one, else its transformers modeling code on lmdp's
    paged attention: the transformers fallback), 'lmdp' (a port or an error) or 'transformers' (the fallback).
    """
    dtype: str = 'auto'
    tp: int = 1
    session_len: Optional[int] = None
    max_batch_size: Optional[int] = None
    cache_max_entry_count: float = 0.8
    block_size: int = 64
    num_gpu_blocks: int = 0
    max_prefill_token_num: int = 4096
    eager_mode: bool = False
    custom_module_map: Union[None, str, Dict[str, object]] = None
    device_type: str = 'auto'
    enable_prefix_caching: bool = False
    cudagraph_capture_batch_sizes: Optional[List[int]] = None
    trust_remote_code: bool = False
    model_impl: str = 'auto'

    def __post_init__(self):
        _check(self.tp == 1, f'tp={self.tp}: tensor parallelism is not wired into the engine yet; use tp=1')
        _check(self.session_len is None or self.session_len > 0, f'session_len must be positive, got '
               f'{self.session_len}')
        _check(self.max_batch_size is None or self.max_batch_size > 0,
               f'max_batch_size must be positive, got {self.max_batch_size}')
        _check(0 < self.cache_max_entry_count <= 1,
               f'cache_max_entry_count is a fraction of free memory in (0, 1], got {self.cache_max_entry_count}')
        _check(self.block_size > 0 and not self.block_size & (self.block_size - 1),
               f'block_size must be a power of two, got {self.block_size}')
        _check(self.num_gpu_blocks >= 0, f'num_gpu_blocks must be >= 0 (0: size from memory), got '
               f'{self.num_gpu_blocks}')
        _check(self.max_prefill_token_num > 0,
               f'max_prefill_token_num must be positive, got {self.max_prefill_token_num}')
        _check(self.device_type in ('auto', 'cuda', 'cpu'),
               f"device_type must be 'auto', 'cuda' or 'cpu', got {self.device_type!r}")
        _check(self.model_impl in MODEL_IMPLS,
               f"model_impl must be one of {', '.join(map(repr, MODEL_IMPLS))}, got {self.model_impl!r}")
        # fail here, at the line that names the file, rather than after the tokenizer and config have loaded
        if isinstance(self.custom_module_map, (str, os.PathLike)) and not os.path.isfile(self.custom_module_map):
            raise FileNotFoundError(f'custom_module_map {os.fspath(self.custom_module_map)!r} does not exist; pass '
                                    'the path of a .py file that defines MODULE_MAP')

    def resolved_device(self) -> str:
        import torch
        if self.device_type == 'auto':
            return 'cuda' if torch.cuda.is_available() else 'cpu'
        if self.device_type == 'cuda' and not torch.cuda.is_available():
            raise ValueError("device_type='cuda' but torch sees no CUDA device; use device_type='cpu'")
        return self.device_type


@dataclass
class GenerationConfig:
    """How one request is decoded.

    do_sample=False (or temperature=0) decodes greedily. top_k=0 means no top-k limit. Stop words are
    strings matched in the output text; stop_token_ids are matched on tokens and so are the model's eos ids
    unless ignore_eos. The stop id or word that ends a request is left out of its output unless
    include_stop_str_in_output. min_new_tokens keeps every stop id from being sampled until that many tokens exist.
    random_seed makes a sampled request repeat exactly, whatever else shares its batch. logprobs=N returns, per
    output token, the log-probabilities of the N likeliest tokens and of the chosen one (raw model logits).
    """
    max_new_tokens: int = 512
    min_new_tokens: Optional[int] = None
    do_sample: bool = False
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    random_seed: Optional[int] = None
    stop_words: Optional[List[str]] = None
    stop_token_ids: Optional[List[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: Optional[int] = None

    def __post_init__(self):
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
               f'max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}')
        _check(self.min_new_tokens is None or self.min_new_tokens >= 0,
               f'min_new_tokens must be >= 0, got {self.min_new_tokens}')
        _check(self.temperature >= 0, f'temperature must be >= 0 (0 means greedy), got {self.temperature}')
        _check(0 < self.top_p <= 1, f'top_p must be in (0, 1], got {self.top_p}')
        _check(isinstance(self.top_k, int) and self.top_k >= 0, f'top_k must be an integer >= 0 (0: no limit), got '
               f'{self.top_k!r}')
        _check(0 <= self.min_p <= 1, f'min_p must be in [0, 1], got {self.min_p}')
        _check(self.repetition_penalty > 0, f'repetition_penalty must be > 0 (1: none), got '
               f'{self.repetition_penalty}')
        _check(self.logprobs is None or self.logprobs >= 0, f'logprobs must be >= 0, got {self.logprobs}')
        if isinstance(self.stop_words, str):
            self.stop_words = [self.stop_words]
        if self.stop_words is not None:
            _check(all(isinstance(w, str) and w for w in self.stop_words),
                   f'stop_words must be non-empty strings, got {self.stop_words!r}')
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = [self.stop_token_ids]

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_pretrained(cls, model_path: str, **overrides) -> 'GenerationConfig':
        """lmdp's defaults, replaced by the checkpoint's generation_config.json where it sets a value."""
        values = {}
        path = os.path.join(model_path, 'generation_config.json')
        if os.path.isfile(path):
            with open(path, encoding='utf-8') as f:
                hf = json.load(f)
            known = {f.name for f in fields(cls)} - {'stop_token_ids'}
            values = {k: v for k, v in hf.items() if k in known and v is not None}
        values.update(overrides)
        return cls(**values)


@dataclass
class Response:
    """One request's result (a batch call), or the newest piece of it (a streaming call).

    finish_reason is None while a stream goes on; 'stop' (a stop id or word), 'length' (max_new_tokens or
    session_len), 'abort', or 'error' (then `error` says what was wrong with the request).
    """
    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: Optional[FinishReason] = None
    token_ids: List[int] = field(default_factory=list)
    logprobs: Optional[List[Dict[int, float]]] = None
    index: int = 0
    error: Optional[str] = None
