"""Hooks that record every tap of one forward call and, for the layer-local view, feed each layer the truth's input.

Each tap is copied the moment its module runs: fused kernels work in place, so a tensor a module returned may be
overwritten by the next op (lmdp's fused add + RMSNorm writes into its inputs). Copies keep float64 (the truth of a
float32 run) and turn everything else into float32. A tap is one row per token of the call: per-head outputs
(`[T, H, D]`, or `[1, T, H, D]` in transformers) are flattened to `[T, H * D]`.

The local view (`LocalInputs`) replaces, in every forward call, what enters each decoder layer and the final norm
with the truth's value there (cast to the model dtype), and what the attention branch adds to the stream with
`truth mid - layer input`, so the MLP half of each layer starts from the truth's stream too. Taps are read before
any replacement: a layer's taps then show that layer's own error, not what came before it.
"""
import inspect
from dataclasses import dataclass

import torch

from .attention_probe import attention_probe, new_key_rows, query_rows
from .taps import Site


def as_rows(tensor: torch.Tensor, num_tokens: int | None, tap: str) -> torch.Tensor:
    """`tensor` as `[num_tokens, features]`: the leading dims that make up the step's tokens are merged."""
    tensor = tensor.detach()
    if (num_tokens is not None and tensor.dim() == 4 and tensor.size(0) == 1 and tensor.size(2) == num_tokens
            and tensor.size(1) != num_tokens):
        tensor = tensor.transpose(1, 2)     # transformers' heads-first [1, H, T, D] (StableLM's per-head norms)
    if num_tokens is None:
        rows = tensor.reshape(-1, tensor.shape[-1])
    else:
        lead, shape = 1, list(tensor.shape)
        for i, n in enumerate(shape):
            lead *= n
            if lead == num_tokens:
                rows = tensor.reshape(num_tokens, -1)
                break
            if lead > num_tokens:
                raise RuntimeError(f'tap {tap}: a module output of shape {tuple(shape)} is not one row per token of '
                                   f'a step of {num_tokens} packed tokens')
        else:
            raise RuntimeError(f'tap {tap}: a module output of shape {tuple(shape)} is not one row per token of a '
                               f'step of {num_tokens} packed tokens')
    keep = torch.float64 if rows.dtype == torch.float64 else torch.float32
    return rows.to(keep, copy=True)


@dataclass
class Boundary:
    """Where the local view substitutes in one decoder layer: the layer, and the module whose output joins the
    stream after attention (None: the layer has no attention -> MLP boundary)."""
    layer: str
    branch_end: str | None


class LocalInputs:
    """The truth's values to feed for the current call: 'layer.N' (stream entering layer N), 'mid.N' (the stream
    after layer N's attention) and 'final' (the stream entering the final norm), each `[T, hidden]`."""

    def __init__(self):
        self.current: dict[str, torch.Tensor] = {}

    def set(self, values: dict[str, torch.Tensor]):
        self.current = values

    def get(self, key: str) -> torch.Tensor | None:
        return self.current.get(key)


_SIGNATURES: dict[type, inspect.Signature] = {}


def _forward_signature(module) -> inspect.Signature:
    """The signature of the first `forward` in the class's MRO that names its arguments (a subclass that passes
    `*args, **kwargs` through says nothing about them)."""
    cls = type(module)
    if cls not in _SIGNATURES:
        found = inspect.signature(module.forward)
        for klass in cls.__mro__:
            fn = klass.__dict__.get('forward')
            if fn is None:
                continue
            sig = inspect.signature(fn.__get__(module, klass))
            first = next(iter(sig.parameters.values()), None)
            if first is not None and first.kind in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
                found = sig
                break
        _SIGNATURES[cls] = found
    return _SIGNATURES[cls]


def _bind(module, args, kwargs):
    sig = _forward_signature(module)
    bound = sig.bind_partial(*args, **kwargs)
    return bound, next(iter(sig.parameters))


class Recorder:
    """`take()` after a forward gives tap name -> `[rows, features]`, one row per token of the call; call
    `expect(num_tokens)` before each forward so per-head outputs are cut into token rows."""

    def __init__(self, model: torch.nn.Module, sites: dict[str, Site], boundaries: list[Boundary] = (),
                 final_norm: str | None = None, local: LocalInputs | None = None):
        self.modules = dict(model.named_modules())
        self._got: dict[str, torch.Tensor] = {}
        self._handles = []
        self._num_tokens: int | None = None
        self._stream_in: dict[str, torch.Tensor] = {}     # layer module -> the stream it was handed (after any swap)
        self._attention: dict[int, list] = {}             # id(attention module) -> [(tap, 'q'|'k')]
        self.local = local
        # order matters: readers of inputs, then the swaps, then what reads the swapped inputs, then outputs
        for tap, site in sites.items():
            if site.how == 'input':
                self._hook_pre(site.module, self._pre_reader(tap, site))
        if local is not None:
            for i, b in enumerate(boundaries):
                self._hook_pre(b.layer, self._layer_swap(f'layer.{i}'))
            if final_norm is not None:
                self._hook_pre(final_norm, self._layer_swap('final'))
        for b in boundaries:
            self._hook_pre(b.layer, self._stream_tracker(b.layer))
        for tap, site in sites.items():
            if site.how == 'output':
                self._handles.append(self.modules[site.module].register_forward_hook(self._out_reader(tap, site)))
            elif site.how == 'input_after':
                self._handles.append(self.modules[site.module].register_forward_hook(
                    self._after_reader(tap, site), with_kwargs=True))
            elif site.how == 'mid':
                self._handles.append(self.modules[site.module].register_forward_hook(self._mid_reader(tap, site)))
            elif site.how == 'attention':
                self._attention.setdefault(id(self.modules[site.module]), []).append(
                    (tap, 'q' if tap.endswith('q_rot') else 'k'))
        if local is not None:
            for i, b in enumerate(boundaries):
                if b.branch_end is not None:
                    self._handles.append(self.modules[b.branch_end].register_forward_hook(
                        self._branch_swap(f'mid.{i}', b.layer)))
        self._probe = None
        if self._attention:
            attn = {k: m for m in self.modules.values() if (k := id(m)) in self._attention}
            self._probe = attention_probe(attn, self._on_attention)
            self._probe.__enter__()

    # -- hooks --------------------------------------------------------------------------------------------------

    def _hook_pre(self, name: str, fn):
        self._handles.append(self.modules[name].register_forward_pre_hook(fn, with_kwargs=True))

    def _keep(self, tap: str, tensor: torch.Tensor):
        # a module called twice in one forward (weight sharing) keeps its last call
        self._got[tap] = as_rows(tensor, self._num_tokens, tap)

    def _pre_reader(self, tap: str, site: Site):
        def hook(module, args, kwargs):
            self._keep(tap, site.read(args, kwargs))
        return hook

    def _out_reader(self, tap: str, site: Site):
        return lambda module, args, output: self._keep(tap, site.read(output))

    def _after_reader(self, tap: str, site: Site):
        return lambda module, args, kwargs, output: self._keep(tap, site.read(args, kwargs))

    def _stream_tracker(self, layer: str):
        def hook(module, args, kwargs):
            bound, first = _bind(module, args, kwargs)
            hidden, residual = bound.arguments[first], bound.arguments.get('residual')
            # lmdp layers get (hidden, residual) with the add fused into their first norm: the stream is the sum
            fused = torch.is_tensor(residual) and residual.shape == hidden.shape
            self._stream_in[layer] = hidden + residual if fused else hidden
        return hook

    def _mid_reader(self, tap: str, site: Site):
        def hook(module, args, output):
            h_in = self._stream_in.get(site.layer_module)
            out = site.read(output)
            if h_in is not None:
                self._keep(tap, h_in.reshape(out.shape) + out)   # the add, in the model dtype, as the model does it
        return hook

    def _on_attention(self, module, query, key, value):
        for tap, which in self._attention.get(id(module), ()):
            n = query.size(2)
            rows = query_rows(query) if which == 'q' else new_key_rows(key, n)
            self._got[tap] = as_rows(rows, self._num_tokens, tap)

    def _layer_swap(self, key: str):
        def hook(module, args, kwargs):
            truth = self.local.get(key)
            if truth is None:
                return None
            bound, first = _bind(module, args, kwargs)
            hidden = bound.arguments[first]
            bound.arguments[first] = truth.reshape(hidden.shape).to(hidden.dtype)
            residual = bound.arguments.get('residual')
            if torch.is_tensor(residual):       # lmdp's fused residual: the stream is hidden + 0
                bound.arguments['residual'] = torch.zeros_like(residual)
            return bound.args, bound.kwargs
        return hook

    def _branch_swap(self, key: str, layer: str):
        def hook(module, args, output):
            truth, h_in = self.local.get(key), self._stream_in.get(layer)
            if truth is None or h_in is None:
                return None
            out = output[0] if isinstance(output, (tuple, list)) else output
            # the layer adds this to its own residual, h_in: the sum lands on the truth's stream (to rounding)
            delta = (truth.double().reshape(out.shape) - h_in.double().reshape(out.shape)).to(out.dtype)
            if isinstance(output, (tuple, list)):
                return type(output)([delta, *output[1:]])
            return delta
        return hook

    # -- use ----------------------------------------------------------------------------------------------------

    def expect(self, num_tokens: int):
        """The next forward call packs `num_tokens` tokens."""
        self._num_tokens = num_tokens

    def take(self) -> dict[str, torch.Tensor]:
        got, self._got = self._got, {}
        self._stream_in = {}
        return got

    def close(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._probe is not None:
            self._probe.__exit__(None, None, None)
            self._probe = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
