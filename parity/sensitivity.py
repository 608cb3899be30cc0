"""Planted scale errors: one module of one layer of a port made (1 + delta) times too large, to measure the
smallest error the harness catches and check that it names the module where it was planted.

`planted_scale(base_cls, 'o_proj', layer=1, delta=5e-3)` is a subclass of a port class that scales that module's
output by forward hooks (the port's code is untouched), handed to lmdp as a custom module map entry. Used by
`scripts/parity_sensitivity.py`, `scripts/parity_calibrate.py` and tests/parity.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .taps import QKV_KINDS, qkv_sizes


@dataclass(frozen=True)
class ModuleKind:
    name: str                  # what the table calls it
    tap: str                   # the tap kind the harness must name
    per_layer: bool = True


MODULE_KINDS: dict[str, ModuleKind] = {k.name: k for k in (
    ModuleKind('input_norm', 'input_norm'), ModuleKind('q_proj', 'q'), ModuleKind('k_proj', 'k'),
    ModuleKind('v_proj', 'v'), ModuleKind('q_norm', 'q_norm'), ModuleKind('k_norm', 'k_norm'),
    ModuleKind('rotary', 'q_rot', per_layer=False), ModuleKind('attn_core', 'attn_core'), ModuleKind('o_proj', 'attn'),
    ModuleKind('mlp_norm', 'mlp_norm'), ModuleKind('mlp', 'mlp'), ModuleKind('final_norm', 'final_norm', False),
    ModuleKind('lm_head', 'logits', per_layer=False),
)}


def _scale_first(factor: float) -> Callable:
    """A forward hook scaling a module's output (the first element of a tuple: lmdp's fused norms return
    (normed, residual), and only the normed part is the norm's output)."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] * factor, *output[1:])
        return output * factor
    return hook


def _scale_all(output, factor: float):
    """Every tensor in `output` scaled (a rotary module returns (cos, sin), or a dict of such pairs by layer type)."""
    if isinstance(output, dict):
        return {k: _scale_all(v, factor) for k, v in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(_scale_all(x, factor) for x in output)
    return output * factor if isinstance(output, torch.Tensor) else output


# where a scale error in q/k/v shows first when the reference has no tap of its own for it (transformers' fused
# qkv projection, as in Phi-3, is not cut): the next tap downstream that the reference has
DOWNSTREAM = {'q': ('q_norm', 'q_rot'), 'k': ('k_norm', 'k_rot'), 'v': ('attn_core',)}


def expected_tap(kind: str, tap_kinds) -> str:
    """The tap kind a planted (1 + delta) scale in `kind` must be named at, given the kinds the run has."""
    tap = MODULE_KINDS[kind].tap
    if tap in tap_kinds:
        return tap
    return next((t for t in DOWNSTREAM.get(tap, ()) if t in tap_kinds), tap)


def _scale_part(factor: float, index: int, sizes) -> Callable:
    """Scale one of q/k/v in a fused qkv projection's output."""
    def hook(module, args, output):
        out = output.clone()
        start = sum(sizes[:index])
        out[..., start:start + sizes[index]] *= factor
        return out
    return hook


def _find(model, names) -> torch.nn.Module | None:
    modules = dict(model.named_modules())
    return next((modules[n] for n in names if n in modules), None)


def plant(model: torch.nn.Module, kind: str, layer: int, delta: float, hf_config) -> list:
    """Register the hooks that make `kind` (MODULE_KINDS) of `layer` (1 + delta) times too large; their handles."""
    factor = 1.0 + delta
    base = f'model.layers.{layer}'
    attn = f'{base}.self_attn'
    if kind in ('q_proj', 'k_proj', 'v_proj'):
        own = _find(model, [f'{attn}.{kind}'])
        if own is not None:
            return [own.register_forward_hook(_scale_first(factor))]
        fused = _find(model, [f'{attn}.qkv_proj'])
        index = QKV_KINDS.index(kind[0])
        return [fused.register_forward_hook(_scale_part(factor, index, qkv_sizes(hf_config)))]
    if kind == 'rotary':
        rotary = _find(model, ['model.rotary_emb'])
        return [rotary.register_forward_hook(lambda m, a, out: _scale_all(out, factor))]
    if kind == 'attn_core':
        from lmdp.nn.attention import Attention
        inner = [m for n, m in model.named_modules() if n.startswith(attn + '.') and isinstance(m, Attention)]
        return [inner[0].register_forward_hook(_scale_first(factor))]
    names = {'input_norm': [f'{base}.input_layernorm'], 'q_norm': [f'{attn}.q_norm'], 'k_norm': [f'{attn}.k_norm'],
             'o_proj': [f'{attn}.o_proj'], 'mlp': [f'{base}.mlp'],
             'mlp_norm': [f'{base}.pre_feedforward_layernorm', f'{base}.post_attention_layernorm'],
             'final_norm': ['model.norm'], 'lm_head': ['lm_head']}[kind]
    module = _find(model, names)
    if module is None:
        raise ValueError(f'this port has no {kind} module (looked for {names})')
    return [module.register_forward_hook(_scale_first(factor))]


def has_module(model_or_names, kind: str) -> bool:
    names = set(n for n, _ in model_or_names.named_modules())
    needs = {'q_norm': 'model.layers.0.self_attn.q_norm', 'k_norm': 'model.layers.0.self_attn.k_norm'}
    return needs.get(kind, 'model') in names


_CLASSES: dict[tuple, type] = {}


def planted_scale(base_cls: type, kind: str, layer: int, delta: float) -> type:
    """A subclass of `base_cls` whose `kind` module of `layer` is (1 + delta) times too large."""
    key = (base_cls, kind, layer, delta)
    if key not in _CLASSES:
        def __init__(self, config, ctx_mgr, dtype=None, device=None):
            base_cls.__init__(self, config, ctx_mgr, dtype=dtype, device=device)
            self._planted = plant(self, kind, layer, delta, config)

        _CLASSES[key] = type(f'{base_cls.__name__}_{kind}{layer}x{1 + delta:g}', (base_cls, ),
                             {'__init__': __init__, '__doc__': f'{kind} of layer {layer} scaled by {1 + delta:g}'})
    return _CLASSES[key]


def planted_eps(base_cls: type, norm: str, layer: int, eps: float) -> type:
    """A subclass of `base_cls` whose `norm` ('input_norm', 'mlp_norm', 'q_norm', 'k_norm', 'final_norm') of
    `layer` uses `eps` instead of the config's (a hard-coded default, a wrong config field)."""
    names = {'input_norm': ['model.layers.{i}.input_layernorm'],
             'mlp_norm': ['model.layers.{i}.pre_feedforward_layernorm', 'model.layers.{i}.post_attention_layernorm'],
             'q_norm': ['model.layers.{i}.self_attn.q_norm'], 'k_norm': ['model.layers.{i}.self_attn.k_norm'],
             'final_norm': ['model.norm']}[norm]

    def __init__(self, config, ctx_mgr, dtype=None, device=None):
        base_cls.__init__(self, config, ctx_mgr, dtype=dtype, device=device)
        module = _find(self, [n.format(i=layer) for n in names])
        if module is None:
            raise ValueError(f'this port has no {norm} module in layer {layer}')
        module.eps = eps

    return type(f'{base_cls.__name__}_{norm}{layer}_eps{eps:g}', (base_cls, ),
                {'__init__': __init__, '__doc__': f'{norm} of layer {layer} with eps {eps:g}'})
