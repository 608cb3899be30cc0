"""q and k as transformers' attention consumes them: after their norms and rotary.

transformers' attention modules call their attention function through
`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)`: with eager attention
(the harness's reference) that is the `eager_attention_forward` of their own modeling file, looked up when it is
called; otherwise the function registered under that name (lmdp's transformers fallback registers its paged
attention there). Swapping that function for a wrapper while a model runs shows the wrapper every query, key and
value exactly as attention uses them, with no change to the modeling code.

In a float64 reference (the truth of a float32 run) the wrapper also lifts the eager function's float32 softmax to
float64, so the truth's attention is not rounded to float32 precision, the very precision under test.
"""
import contextlib
import sys
from collections.abc import Callable

import torch


def _modeling(attn_module):
    return sys.modules.get(type(attn_module).__module__)


def _impl(attn_module) -> str:
    config = getattr(attn_module, 'config', None)
    return getattr(config, '_attn_implementation', None) or 'eager'


def has_eager_attention(attn_module) -> bool:
    """Whether this is a transformers attention module whose attention function can be wrapped."""
    if not callable(getattr(_modeling(attn_module), 'eager_attention_forward', None)):
        return False
    impl = _impl(attn_module)
    if impl == 'eager':
        return True
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return impl in ALL_ATTENTION_FUNCTIONS


@contextlib.contextmanager
def _softmax_in(dtype: torch.dtype):
    """Inside: softmax asked for float32 on a `dtype` input computes in `dtype` (only float64 lifts)."""
    if dtype != torch.float64:
        yield
        return
    original = torch.nn.functional.softmax

    def softmax(input, dim=None, _stacklevel=3, dtype=None):   # noqa: A002 - torch's own argument names
        if dtype == torch.float32 and input.dtype == torch.float64:
            dtype = torch.float64
        return original(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)

    torch.nn.functional.softmax = softmax
    try:
        yield
    finally:
        torch.nn.functional.softmax = original


@contextlib.contextmanager
def attention_probe(modules: dict[int, object], on_call: Callable):
    """While inside, `on_call(module, query, key, value)` runs whenever one of `modules` (id -> attention module)
    calls its eager attention function; query `[B, Hq, Tq, D]`, key/value `[B, Hk, S, D]` (S: cached + new)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    files, registered = {}, {}
    for module in modules.values():
        if not has_eager_attention(module):
            continue
        impl = _impl(module)
        if impl == 'eager':
            mod = _modeling(module)
            files[mod.__name__] = mod
        else:
            registered[impl] = ALL_ATTENTION_FUNCTIONS[impl]
    originals = {name: mod.eager_attention_forward for name, mod in files.items()}

    def wrap(original):
        def eager_attention_forward(module, query, key, value, *args, **kwargs):
            with _softmax_in(query.dtype):
                out = original(module, query, key, value, *args, **kwargs)
            if id(module) in modules:
                on_call(module, query, key, value)
            return out
        return eager_attention_forward

    for name, mod in files.items():
        mod.eager_attention_forward = wrap(originals[name])
    for impl, fn in registered.items():
        AttentionInterface.register(impl, wrap(fn))
    try:
        yield
    finally:
        for name, mod in files.items():
            mod.eager_attention_forward = originals[name]
        for impl, fn in registered.items():
            AttentionInterface.register(impl, fn)


def query_rows(query: torch.Tensor) -> torch.Tensor:
    """`[B=1, H, T, D]` -> `[T, H * D]`."""
    return query[0].transpose(0, 1).reshape(query.size(2), -1)


def new_key_rows(key: torch.Tensor, num_new: int) -> torch.Tensor:
    """The last `num_new` positions of a cached key `[B=1, H, S, D]` (the step's own tokens) as `[T, H * D]`."""
    return key[0, :, -num_new:].transpose(0, 1).reshape(num_new, -1)
