"""Taps: the activations the harness compares, and which module of each model produces them.

A tap is named by where it sits in the forward pass. Per decoder layer, in forward order:

    input_norm                   the layer's input norm
    q, k, v                      the projections (a fused qkv output is cut by head counts)
    q_norm, k_norm               per-head q/k norms (Qwen3, Gemma 3, OLMo 2), where the reference has them
    q_rot, k_rot                 q and k as attention sees them: after their norms and rotary
    attn_core                    the attention output before o_proj (o_proj's input)
    attn                         o_proj's output (the attention block's output)
    attn_post_norm               the norm on the attention output (Gemma 2/3 sandwich norms)
    mid                          the residual stream once attention has joined it (the attention -> MLP boundary)
    mlp_norm                     the norm in front of the MLP
    mlp                          the MLP's output
    mlp_post_norm                the norm on the MLP output (sandwich norms)
    residual                     the residual stream leaving the layer

plus `embed` (what enters layer 0, embedding scale included), `final_norm` and `logits`. Which per-layer taps a run
has follows the reference: a tap whose module the transformers model lacks is left out; one the reference has and
the port lacks is a failure that names it.

Both sides find a tap's module by name: the usual HF naming (model.layers.N.input_layernorm, .self_attn, .mlp,
model.norm, ...) is tried first, then common alternatives, so a family that names its modules the usual way maps
with no configuration. `TAP_OVERRIDES` (keyed by `config.architectures[0]`) and the `overrides` argument cover the
rest -- the one documented place to map taps for ports whose module names differ. q_rot/k_rot are read, on the
reference, from the arguments of transformers' eager attention function (parity/attention_probe.py), and on the
port from the query/key arguments of its `lmdp.nn.Attention` after it ran (the cache-write kernel rotates them in
place). Logits are not hooked: both sides hand them back from the forward itself.
"""
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

QKV_KINDS = ('q', 'k', 'v')
PER_LAYER = ('input_norm', 'q', 'k', 'v', 'q_norm', 'k_norm', 'q_rot', 'k_rot', 'attn_core', 'attn',
             'attn_post_norm', 'mid', 'mlp_norm', 'mlp', 'mlp_post_norm', 'residual')
# per-layer kinds a run has only where the reference model has their module
OPTIONAL = ('input_norm', 'q', 'k', 'v', 'q_norm', 'k_norm', 'q_rot', 'k_rot', 'attn_core', 'attn_post_norm', 'mid',
            'mlp_norm', 'mlp_post_norm')
SIDES = ('reference', 'port')


@dataclass(frozen=True)
class Tap:
    name: str                    # 'layers.3.attn'
    kind: str                    # 'attn'
    layer: int | None = None  # 3; None for embed, final_norm, logits


def tap_list(num_layers: int, kinds: Sequence[str] = ('input_norm', 'attn', 'mlp', 'residual'),
             qkv: bool = False) -> list[Tap]:
    """Every tap in forward order, for layers that all have `kinds` (`qkv` adds q, k, v)."""
    kinds = set(kinds) | (set(QKV_KINDS) if qkv else set())
    per_layer = [k for k in PER_LAYER if k in kinds]
    taps = [Tap('embed', 'embed')]
    for i in range(num_layers):
        taps += [Tap(f'layers.{i}.{kind}', kind, i) for kind in per_layer]
    return taps + [Tap('final_norm', 'final_norm'), Tap('logits', 'logits')]


# Module names tried in order; per-layer kinds are relative to the decoder layer, '' is the layer itself.
CANDIDATES: dict[str, Sequence[str]] = {
    'layers': ('model.layers', 'model.language_model.layers', 'model.decoder.layers', 'transformer.h',
               'transformer.layers', 'gpt_neox.layers'),
    'final_norm': ('model.norm', 'model.language_model.norm', 'model.decoder.final_layer_norm', 'transformer.ln_f',
                   'transformer.norm', 'gpt_neox.final_layer_norm', 'model.final_layernorm'),
    'input_norm': ('input_layernorm', 'ln_1', 'attention_norm', 'ln_attn'),
    'attn': ('self_attn', 'attn', 'attention', 'self_attention'),
    # the norm in front of the MLP (see TapResolver._find for layers that norm their blocks' outputs)
    'mlp_norm': ('pre_feedforward_layernorm', 'post_attention_layernorm', 'ln_2', 'ffn_norm'),
    'attn_post_norm': ('post_attention_layernorm', ),     # only where pre_feedforward_layernorm exists
    'mlp_post_norm': ('post_feedforward_layernorm', ),
    'mlp': ('mlp', 'feed_forward', 'block_sparse_moe', 'ffn'),
    'residual': ('', ),
    'q': ('self_attn.q_proj', 'attn.q_proj', 'attention.q_proj'),
    'k': ('self_attn.k_proj', 'attn.k_proj', 'attention.k_proj'),
    'v': ('self_attn.v_proj', 'attn.v_proj', 'attention.v_proj'),
    # fused q/k/v, cut into q, k, v by head counts when the separate projections are absent
    'qkv': ('self_attn.qkv_proj', 'self_attn.Wqkv', 'attention.query_key_value', 'attn.c_attn'),
    'q_norm': ('self_attn.q_norm', 'self_attn.q_layernorm', 'attention.q_norm'),
    'k_norm': ('self_attn.k_norm', 'self_attn.k_layernorm', 'attention.k_norm'),
    'o_proj': ('self_attn.o_proj', 'self_attn.dense', 'attention.dense', 'attn.c_proj', 'attention.o_proj'),
    # a mixture of experts' router (its logits; parity/routing.py): absent from dense layers
    'router': ('mlp.gate', 'block_sparse_moe.gate', 'feed_forward.router', 'mlp.router'),
}

# Per architecture, per side: kind -> module name (per-layer kinds relative to the layer; None drops the tap).
# Keys as in CANDIDATES; 'embed' names a module whose output replaces the default (layer 0's input). Add an
# entry when a family's names are not among the candidates.
TAP_OVERRIDES: dict[str, dict[str, dict[str, str | None]]] = {
    # ChatGLM / GLM-4 (remote code): the decoder stack sits under transformer.encoder
    'ChatGLMModel': {'reference': {'layers': 'transformer.encoder.layers',
                                   'final_norm': 'transformer.encoder.final_layernorm'}},
}


@dataclass(frozen=True)
class Site:
    """Where a tap is read. `how`: 'output' (the module's output through `read`), 'input' (its call arguments,
    `read(args, kwargs)`, before it runs), 'input_after' (its arguments after it ran: in-place results),
    'attention' (transformers' eager attention function called by this module: query/key after rotary),
    'mid' (the stream entering the layer `layer_module` plus this module's output)."""
    module: str
    read: Callable
    how: str = 'output'
    layer_module: str | None = None

    @property
    def on_input(self) -> bool:
        return self.how == 'input'


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


def read_arg(index: int, name: str) -> Callable:
    return lambda args, kwargs: args[index] if len(args) > index else kwargs[name]


def qkv_sizes(hf_config) -> list[int]:
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, 'num_key_value_heads', None) or heads
    head_dim = getattr(hf_config, 'head_dim', None) or hf_config.hidden_size // heads
    return [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]


def _is_lmdp_attention(module) -> bool:
    from lmdp.nn.attention import Attention
    return isinstance(module, Attention)


class TapResolver:
    """Finds each tap's Site in one model (one side)."""

    def __init__(self, model: torch.nn.Module, side: str, hf_config, overrides: dict | None = None):
        if side not in SIDES:
            raise ValueError(f'side must be one of {SIDES}, got {side!r}')
        self.side, self.hf_config = side, getattr(hf_config, 'text_config', None) or hf_config
        self.modules = dict(model.named_modules())
        arch = (getattr(hf_config, 'architectures', None) or [''])[0]
        self.overrides = dict(TAP_OVERRIDES.get(arch, {}).get(side, {}))
        self.overrides.update((overrides or {}).get(side, {}))

    def _find(self, kind: str, prefix: str = '') -> str | None:
        if kind in self.overrides:
            name = self.overrides[kind]
            if name is None:
                return None
            full = f'{prefix}.{name}'.strip('.') if prefix else name
            return full if full in self.modules else None
        names = CANDIDATES.get(kind, ())
        # Where a layer norms its blocks' outputs (post_feedforward_layernorm: Gemma 2/3's sandwich, OLMo 2's
        # post-norm), post_attention_layernorm norms the attention output, and only pre_feedforward_layernorm (if
        # any) is the MLP's input norm; otherwise post_attention_layernorm is the MLP's input norm.
        post_norms = f'{prefix}.post_feedforward_layernorm' in self.modules
        if kind == 'attn_post_norm' and not post_norms:
            return None
        if kind == 'mlp_norm' and post_norms:
            names = ('pre_feedforward_layernorm', )
        for name in names:
            full = f'{prefix}.{name}'.strip('.') if prefix else name
            if full in self.modules:
                return full
        return None

    def _why(self, kind: str, prefix: str = '') -> str:
        tried = [self.overrides[kind]] if kind in self.overrides else list(CANDIDATES.get(kind, ()))
        where = f' under {prefix!r}' if prefix else ''
        return (f'the {self.side} has no module for tap kind {kind!r}{where} (tried {tried}); add it to '
                f"parity.taps.TAP_OVERRIDES or pass overrides={{'{self.side}': {{'{kind}': 'module.name'}}}}")

    def layers(self) -> str | None:
        return self._find('layers')

    def num_layers(self) -> int:
        layers = self.layers()
        return 0 if layers is None else len(self.modules[layers])

    def branch_end(self, prefix: str) -> str | None:
        """The module whose output joins the residual stream after attention (its norm, with sandwich norms)."""
        return self._find('attn_post_norm', prefix) or self._find('attn', prefix)

    def present_kinds(self, layer: int) -> list[str]:
        """The per-layer tap kinds this model can give at `layer` (the reference's decide a run's tap list)."""
        prefix = f'{self.layers()}.{layer}'
        kinds = []
        for kind in PER_LAYER:
            site = self._site(kind, prefix)
            if not isinstance(site, str):
                kinds.append(kind)
        return kinds

    def resolve(self, taps: Sequence[Tap]) -> dict[str, object]:
        """tap name -> Site, or a sentence saying why the tap can't be read from this model."""
        sites: dict[str, object] = {}
        layers = self.layers()
        for tap in taps:
            if tap.kind == 'logits':
                continue
            if tap.kind == 'embed' and 'embed' not in self.overrides:
                sites[tap.name] = (Site(f'{layers}.0', read_hidden_input, how='input') if layers is not None
                                   else self._why('layers'))
                continue
            if tap.layer is None:
                name = self._find(tap.kind)
                sites[tap.name] = Site(name, read_first) if name else self._why(tap.kind)
                continue
            if layers is None:
                sites[tap.name] = self._why('layers')
                continue
            sites[tap.name] = self._site(tap.kind, f'{layers}.{tap.layer}')
        return sites

    def _site(self, kind: str, prefix: str):
        if kind in QKV_KINDS:
            return self._qkv_site(kind, prefix)
        if kind in ('q_rot', 'k_rot'):
            return self._rot_site(kind, prefix)
        if kind == 'attn_core':
            name = self._find('o_proj', prefix)
            return Site(name, read_hidden_input, how='input') if name else self._why('o_proj', prefix)
        if kind == 'mid':
            end = self.branch_end(prefix)
            if end is None:
                return self._why('attn', prefix)
            return Site(end, read_first, how='mid', layer_module=prefix)
        name = self._find(kind, prefix)
        if name is None:
            return self._why(kind, prefix)
        # the port's decoder layer may hand back (hidden, residual); the reference's is the stream
        read = read_stream if (kind == 'residual' and self.side == 'port') else read_first
        return Site(name, read)

    def _rot_site(self, kind: str, prefix: str):
        attn = self._find('attn', prefix)
        if attn is None:
            return self._why('attn', prefix)
        from .attention_probe import has_eager_attention
        inner = [n for n, m in self.modules.items() if n.startswith(attn + '.') and _is_lmdp_attention(m)]
        if self.side == 'reference' or (not inner and has_eager_attention(self.modules[attn])):
            # a transformers attention module (the reference, or a port on the transformers fallback)
            if not has_eager_attention(self.modules[attn]):
                return (f"the {self.side}'s attention module {attn} does not call transformers' attention "
                        'functions, so q/k after rotary cannot be read from it')
            return Site(attn, read_first, how='attention')
        if len(inner) != 1:
            return (f'the port has {len(inner)} lmdp.nn.Attention modules under {attn} (want one): q/k after '
                    "rotary are read from its query/key arguments; map 'q_rot'/'k_rot' with TAP_OVERRIDES")
        index = 0 if kind == 'q_rot' else 1
        return Site(inner[0], read_arg(index, ('query', 'key')[index]), how='input_after')

    def _qkv_site(self, kind: str, prefix: str):
        name = self._find(kind, prefix)
        if name is not None:
            return Site(name, read_first)
        # a fused projection is cut only where its layout is known: lmdp's qkv_proj is [q | k | v]; transformers'
        # fused ones differ by family (GPT-NeoX interleaves per head), so a reference with one has no q/k/v taps
        fused = self._find('qkv', prefix)
        if fused is None or not hasattr(self.modules[fused], 'split_qkv'):
            return self._why(kind, prefix)
        module, index = self.modules[fused], QKV_KINDS.index(kind)
        if hasattr(module, 'split'):   # lmdp's own split: this rank's q/k/v sizes under tensor parallelism
            return Site(fused, lambda output: module.split(read_first(output))[index])
        return Site(fused, read_split(index, qkv_sizes(self.hf_config)))


def reference_taps(model: torch.nn.Module, hf_config, overrides: dict | None = None) -> list[Tap]:
    """The taps of a run: every tap the reference model can give, in forward order."""
    resolver = TapResolver(model, 'reference', hf_config, overrides)
    taps = [Tap('embed', 'embed')]
    for i in range(resolver.num_layers()):
        kinds = resolver.present_kinds(i)
        taps += [Tap(f'layers.{i}.{k}', k, i) for k in PER_LAYER if k in kinds or k not in OPTIONAL]
    return taps + [Tap('final_norm', 'final_norm'), Tap('logits', 'logits')]
