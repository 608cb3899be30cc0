"""Progressive porting: replace modules of the transformers fallback, by name pattern, with lmdp modules.

    Partial = hybrid(Swap('model.layers.*.mlp', LlamaMLP),
                     Swap('model.layers.*.self_attn', LlamaAttention, kind='attention'))
    parity.compare(path, custom_module_map={'Olmo2ForCausalLM': Partial})

`hybrid(...)` is a model class: the fallback with the swaps made as it is built, whose checkpoint tensors under a
swapped module go through the new module's own loader (its parameters' `weight_loader`s, with the port's
q/k/v and gate/up stacking). `apply_swaps(model, ...)` does the same to a model already loaded, carrying each old
module's weights over. Either way the parity harness runs it as any port, and `module_impls` / `tap_impls` say
which modules (and taps) are native and which still run transformers' code.

A swap's `build` is called with the keyword arguments it names among `config`, `layer_idx`, `dtype`, `device` and
`old` (the module it replaces). kind='module' (default): the new module is called as the old one was (a norm, an
MLP). kind='attention': the new module has lmdp's attention signature, `forward(hidden_states [T, hidden],
rotary_pos_emb (cos, sin), past_key_value (k_cache, v_cache), attn_metadata)`, as a port's attention has; it gets
the layer's paged cache and the cos/sin transformers computed for the layer.
"""
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import WeightLoadError
from ..weight_loader import load_weight
from .attention import current_step

#: how checkpoint names fill lmdp's stacked parameters (as LlamaForCausalLM.stacked_params_mapping)
STACKED_PARAMS = (('.qkv_proj', '.q_proj', 'q'), ('.qkv_proj', '.k_proj', 'k'), ('.qkv_proj', '.v_proj', 'v'),
                  ('.gate_up_proj', '.gate_proj', 0), ('.gate_up_proj', '.up_proj', 1))
KINDS = ('module', 'attention')


@dataclass(frozen=True)
class Swap:
    """Replace every module whose name matches `pattern` ('*' is one name component: 'model.layers.*.mlp')."""
    pattern: str
    build: Callable
    kind: str = 'module'
    stacked_params_mapping: Sequence[tuple[str, str, object]] = field(default=STACKED_PARAMS)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Swap kind must be one of {KINDS}, got {self.kind!r}")

    def matches(self, name: str) -> bool:
        regex = '^' + '[^.]+'.join(re.escape(part) for part in self.pattern.split('*')) + '$'
        return re.match(regex, name) is not None


def _layer_idx(name: str) -> int | None:
    found = re.search(r'\.(\d+)(?:\.|$)', name)
    return int(found.group(1)) if found else None


def _call_build(build: Callable, **available):
    target = build.__init__ if isinstance(build, type) else build
    params = inspect.signature(target).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return build(**available)
    return build(**{k: v for k, v in available.items() if k in params})


class _NativeAttention(nn.Module):
    """A port's attention module called the way transformers calls attention: it takes the layer's hidden
    states `[1, T, hidden]` and its `position_embeddings`, finds its cache in the current step, and answers
    `(output, None)`. The module's own children are this one's, so parameter names stay `...self_attn.qkv_proj`."""

    def __init__(self, native: nn.Module, layer_idx: int):
        super().__init__()
        object.__setattr__(self, 'native', native)
        for name, child in native.named_children():
            self.add_module(name, child)
        for name, param in native.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, position_embeddings=None, **kwargs):
        if position_embeddings is None:
            raise RuntimeError(f'layer {self.layer_idx}: this model\'s decoder layer hands its attention no '
                               'position_embeddings (cos, sin); a native attention for it must compute its own rotary')
        step = current_step()
        cos, sin = position_embeddings
        out = self.native(hidden_states.reshape(-1, hidden_states.size(-1)),
                          (cos.reshape(-1, cos.size(-1)), sin.reshape(-1, sin.size(-1))),
                          step.kv_caches[self.layer_idx], step.attn_metadata)
        step.served.add(self.layer_idx)
        return out.reshape(hidden_states.shape[:-1] + out.shape[-1:]), None

    def extra_repr(self):
        return f'native {type(self.native).__name__}'


def load_module_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                        stacked_params_mapping: Sequence = STACKED_PARAMS):
    """Checkpoint tensors named relative to `module` into its parameters, through their weight loaders (a module
    with its own `load_weights` loads them itself)."""
    own = getattr(module, 'load_weights', None)
    if own is not None and not isinstance(module, _NativeAttention):
        return own(weights)
    params = dict(module.named_parameters())
    for name, tensor in weights:
        dotted = '.' + name
        for param_name, weight_name, shard_id in stacked_params_mapping:
            if weight_name + '.' in dotted:
                target = dotted.replace(weight_name + '.', param_name + '.', 1)[1:]
                if target in params:
                    load_weight(params[target], tensor, shard_id=shard_id)
                break
        else:
            if name in params:
                load_weight(params[name], tensor)


def apply_swaps(model, swaps: Sequence[Swap], carry_weights: bool = True) -> list[str]:
    """Replace the modules of a TransformersForCausalLM the swaps match; with carry_weights each new module is
    loaded from the one it replaces (through its own loader), and a parameter left unfilled is an error.
    Returns the names replaced."""
    from ..weight_loader.tracker import tracking
    hf_config = model.hf_model.config
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    done = []
    for swap in swaps:
        names = [n for n, _ in model.named_modules() if n and swap.matches(n)]
        if not names:
            raise ValueError(f'Swap({swap.pattern!r}) matches no module of {model.hf_class}; module names look like '
                             f'{_examples(model)}')
        for name in names:
            old = model.get_submodule(name)
            layer_idx = _layer_idx(name)
            new = _call_build(swap.build, config=hf_config, layer_idx=layer_idx, dtype=dtype, device=device, old=old)
            new = new.to(device=device)
            if swap.kind == 'attention':
                if layer_idx is None:
                    raise ValueError(f'{name}: an attention swap needs a layer index in the module name')
                new = _NativeAttention(new, layer_idx)
            if carry_weights:
                with tracking(new) as tracker:
                    load_module_weights(new, tracker.watch(old.state_dict().items()), swap.stacked_params_mapping)
                missing = tracker.missing()
                if missing:
                    raise WeightLoadError(f'swapping {name}: the weights of the {type(old).__name__} it replaces '
                                          f'leave {missing} of the new {type(new).__name__} unfilled; give the Swap '
                                          'a stacked_params_mapping (or the module a load_weights) that fills them')
            new.eval()
            _replace(model, name, new)
            model.swapped[name] = swap
            done.append(name)
    return done


def _replace(model, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition('.')
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    if not parent_name:      # a top-level child is the transformers model's child too
        setattr(model.hf_model, child, new)


def _examples(model, n: int = 6) -> list[str]:
    return [name for name, _ in model.named_modules() if name][:n]


def hybrid(*swaps: Swap, name: str | None = None) -> type:
    """A model class: the transformers fallback with `swaps` applied as it is built (register it in a module
    map, or pass it as `custom_module_map={arch: cls}`)."""
    from .model import TransformersForCausalLM
    for swap in swaps:
        if not isinstance(swap, Swap):
            raise TypeError(f'hybrid() takes Swap(...) arguments, got {type(swap).__name__}')
    label = name or 'Hybrid[' + ', '.join(s.pattern for s in swaps) + ']'
    return type(name or 'HybridForCausalLM', (TransformersForCausalLM, ),
                {'swaps': tuple(swaps), '__doc__': f'{label}: the transformers fallback with native modules.'})


# -- which modules are native ------------------------------------------------------------------------------------

def module_impls(model) -> dict[str, str] | None:
    """Swapped module name -> 'native' for a fallback model (None for a port, which is native throughout)."""
    swapped = getattr(model, 'swapped', None)
    if swapped is None:
        return None
    return {name: 'native' for name in swapped}


def impl_of(model, module_name: str | None) -> str | None:
    """'native' (the module or one around it was swapped), 'mixed' (some module inside it was), 'fallback'."""
    impls = module_impls(model)
    if impls is None or module_name is None:
        return None
    for swapped in impls:
        if module_name == swapped or module_name.startswith(swapped + '.'):
            return 'native'
    if any(s.startswith(module_name + '.') for s in impls) or module_name == '':
        return 'mixed'
    return 'fallback'


def tap_impls(model, hf_config, taps, overrides=None) -> dict[str, str] | None:
    """Per parity tap name: whether the port module behind it is native, mixed or fallback (None for a port)."""
    if module_impls(model) is None:
        return None
    from parity.taps import Site, TapResolver
    sites = TapResolver(model, 'port', hf_config, overrides).resolve(taps)
    out = {}
    modules = {m: n for n, m in model.named_modules()}
    for tap in taps:
        if tap.kind == 'logits':
            out[tap.name] = impl_of(model, modules.get(model.hf_model.get_output_embeddings()))
        elif tap.kind == 'embed':
            out[tap.name] = impl_of(model, modules.get(model.hf_model.get_input_embeddings()))
        else:
            site = sites.get(tap.name)
            out[tap.name] = impl_of(model, site.module) if isinstance(site, Site) else None
    return out
