"""Taps: the activations the harness compares, and which module of each model produces them.

A tap is named by where it sits in the forward pass: `embed` (the hidden state entering layer 0, so that an
embedding scale applied inside the embedding module on one side and after it on the other compares alike),
`layers.N.input_norm`, `layers.N.attn` (after o_proj), `layers.N.mlp`, `layers.N.residual` (the residual stream
leaving layer N), `final_norm`, `logits`; optionally `layers.N.q/k/v` (the projections, before rotary). Both sides
— the transformers reference and the lmdp port — find a tap's module by name: the usual HF naming
(model.layers.N.input_layernorm, .self_attn, .mlp, model.norm) is tried first, then common alternatives, so any
family that names its modules the usual way maps with no configuration. `TAP_OVERRIDES` (keyed by
`config.architectures[0]`) and the `overrides` argument cover the rest.

Logits are not hooked: both sides hand them back from the forward itself.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

QKV_KINDS = ('q', 'k', 'v')
SIDES = ('reference', 'port')


@dataclass(frozen=True)
class Tap:
    name: str                    # 'layers.3.attn'
    kind: str                    # 'attn'
    layer: Optional[int] = None  # 3; None for embed, final_norm, logits


def tap_list(num_layers: int, qkv: bool = False) -> List[Tap]:
    """Every tap in forward order."""
    taps = [Tap('embed', 'embed')]
    per_layer = ('input_norm', ) + (QKV_KINDS if qkv else ()) + ('attn', 'mlp', 'residual')
    for i in range(num_layers):
        taps += [Tap(f'layers.{i}.{kind}', kind, i) for kind in per_layer]
    return taps + [Tap('final_norm', 'final_norm'), Tap('logits', 'logits')]


# Module names tried in order; per-layer kinds are relative to the decoder layer, '' is the layer itself.
CANDIDATES: Dict[str, Sequence[str]] = {
    'layers': ('model.layers', 'model.language_model.layers', 'model.decoder.layers', 'transformer.h',
               'transformer.layers', 'gpt_neox.layers'),
    'final_norm': ('model.norm', 'model.language_model.norm', 'model.decoder.final_layer_norm', 'transformer.ln_f',
                   'transformer.norm', 'gpt_neox.final_layer_norm'),
    'input_norm': ('input_layernorm', 'ln_1', 'attention_norm', 'ln_attn'),
    'attn': ('self_attn', 'attn', 'attention', 'self_attention'),
    'mlp': ('mlp', 'feed_forward', 'block_sparse_moe', 'ffn'),
    'residual': ('', ),
    'q': ('self_attn.q_proj', 'attn.q_proj', 'attention.q_proj'),
    'k': ('self_attn.k_proj', 'attn.k_proj', 'attention.k_proj'),
    'v': ('self_attn.v_proj', 'attn.v_proj', 'attention.v_proj'),
    # fused q/k/v, cut into q, k, v by head counts when the separate projections are absent
    'qkv': ('self_attn.qkv_proj', 'self_attn.Wqkv', 'attention.query_key_value', 'attn.c_attn'),
    # a mixture of experts' router (its logits; parity/routing.py): absent from dense layers
    'router': ('mlp.gate', 'block_sparse_moe.gate', 'feed_forward.router', 'mlp.router'),
}

# Per architecture, per side: kind -> module name (per-layer kinds relative to the layer; None drops the tap).
# Keys as in CANDIDATES; 'embed' names a module whose output replaces the default (layer 0's input). Add an
# entry when a family's names are not among the candidates.
TAP_OVERRIDES: Dict[str, Dict[str, Dict[str, Optional[str]]]] = {
    # ChatGLM / GLM-4 (remote code): the decoder stack sits under transformer.encoder
    'ChatGLMModel': {'reference': {'layers': 'transformer.encoder.layers',
                                   'final_norm': 'transformer.encoder.final_layernorm'}},
}


@dataclass(frozen=True)
class Site:
    """Where a tap is read: a module's output (or, with `on_input`, its input) passed through `read`."""
    module: str
    read: Callable[[object], torch.Tensor]
    on_input: bool = False


def read_hidden_input(args, kwargs) -> torch.Tensor:
    """The hidden states a decoder layer was called with (first positional argument, or `hidden_states=`)."""
    return args[0] if args else kwargs['hidden_states']


def read_first(output) -> torch.Tensor:
    """A module's main output: the tensor, or the first element of a tuple (HF attention: (out, weights))."""
    return output[0] if isinstance(output, (tuple, list)) else output


def read_stream(output) -> torch.Tensor:
    """The residual stream leaving a decoder layer.

    lmdp layers return `(hidden, residual)` with the add fused into the next norm, so the stream is their sum
    (added in the model dtype, as the next fused norm adds it); a plain tensor is the stream itself.
    """
    if (isinstance(output, (tuple, list)) and len(output) >= 2 and torch.is_tensor(output[0])
            and torch.is_tensor(output[1]) and output[0].shape == output[1].shape):
        return output[0] + output[1]
    return read_first(output)


def read_split(index: int, sizes: Sequence[int]) -> Callable[[object], torch.Tensor]:
    """Part `index` of a fused projection's output along the features."""
    return lambda output: read_first(output).split(list(sizes), dim=-1)[index]


def qkv_sizes(hf_config) -> List[int]:
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, 'num_key_value_heads', None) or heads
    head_dim = getattr(hf_config, 'head_dim', None) or hf_config.hidden_size // heads
    return [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]


class TapResolver:
    """Finds each tap's Site in one model (one side)."""

    def __init__(self, model: torch.nn.Module, side: str, hf_config, overrides: Optional[Dict] = None):
        if side not in SIDES:
            raise ValueError(f'side must be one of {SIDES}, got {side!r}')
        self.side, self.hf_config = side, hf_config
        self.modules = dict(model.named_modules())
        arch = (getattr(hf_config, 'architectures', None) or [''])[0]
        self.overrides = dict(TAP_OVERRIDES.get(arch, {}).get(side, {}))
        self.overrides.update((overrides or {}).get(side, {}))

    def _find(self, kind: str, prefix: str = '') -> Optional[str]:
        if kind in self.overrides:
            name = self.overrides[kind]
            if name is None:
                return None
            full = f'{prefix}.{name}'.strip('.') if prefix else name
            return full if full in self.modules else None
        for name in CANDIDATES.get(kind, ()):
            full = f'{prefix}.{name}'.strip('.') if prefix else name
            if full in self.modules:
                return full
        return None

    def _why(self, kind: str, prefix: str = '') -> str:
        tried = [self.overrides[kind]] if kind in self.overrides else list(CANDIDATES.get(kind, ()))
        where = f' under {prefix!r}' if prefix else ''
        return (f'the {self.side} has no module for tap kind {kind!r}{where} (tried {tried}); add it to '
                f"parity.taps.TAP_OVERRIDES or pass overrides={{'{self.side}': {{'{kind}': 'module.name'}}}}")

    def resolve(self, taps: Sequence[Tap]) -> Dict[str, object]:
        """tap name -> Site, or a sentence saying why the tap can't be read from this model."""
        sites: Dict[str, object] = {}
        layers = self._find('layers')
        for tap in taps:
            if tap.kind == 'logits':
                continue
            if tap.kind == 'embed' and 'embed' not in self.overrides:
                sites[tap.name] = (Site(f'{layers}.0', read_hidden_input, on_input=True) if layers is not None
                                   else self._why('layers'))
                continue
            if tap.layer is None:
                name = self._find(tap.kind)
                sites[tap.name] = Site(name, read_first) if name else self._why(tap.kind)
                continue
            if layers is None:
                sites[tap.name] = self._why('layers')
                continue
            prefix = f'{layers}.{tap.layer}'
            if tap.kind in QKV_KINDS:
                sites[tap.name] = self._qkv_site(tap.kind, prefix)
                continue
            name = self._find(tap.kind, prefix)
            if name is None:
                sites[tap.name] = self._why(tap.kind, prefix)
            else:
                # the port's decoder layer may hand back (hidden, residual); the reference's is the stream
                read = read_stream if (tap.kind == 'residual' and self.side == 'port') else read_first
                sites[tap.name] = Site(name, read)
        return sites

    def _qkv_site(self, kind: str, prefix: str):
        name = self._find(kind, prefix)
        if name is not None:
            return Site(name, read_first)
        fused = self._find('qkv', prefix)
        if fused is None:
            return self._why(kind, prefix)
        return Site(fused, read_split(QKV_KINDS.index(kind), qkv_sizes(self.hf_config)))
