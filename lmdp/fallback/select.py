"""Which implementation serves a checkpoint: an lmdp port, or its transformers code on the fallback.

`model_impl='auto'` (the default) takes the registered port when the architecture has one and falls back
otherwise; 'lmdp' insists on a port; 'transformers' runs the fallback even where a port exists (to compare the two,
or to work around a port).
"""
from dataclasses import dataclass

from ..errors import ArchitectureError
from ..messages import MODEL_IMPLS


@dataclass
class ModelChoice:
    model_class: type
    impl: str          # 'lmdp' (a port), 'transformers' (the fallback) or 'hybrid' (a fallback being ported)
    reason: str        # why, in a sentence
    fell_back: bool = False   # model_impl='auto' fell back for want of a port (the engine says so in its log)


def _arch(hf_config) -> str:
    return (getattr(hf_config, 'architectures', None) or [getattr(hf_config, 'model_type', '?')])[0]


def impl_of(model_class) -> str:
    from .model import TransformersForCausalLM
    if isinstance(model_class, type) and issubclass(model_class, TransformersForCausalLM):
        return 'hybrid' if getattr(model_class, 'swaps', None) else 'transformers'
    return 'lmdp'


def check_model_impl(model_impl: str):
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {', '.join(repr(m) for m in MODEL_IMPLS)}, got {model_impl!r}")


def choose_model_class(hf_config, custom_module_map=None, model_impl: str = 'auto') -> ModelChoice:
    """The class that will serve `hf_config`, and why; ArchitectureError (saying why) when nothing can."""
    from ..models.registry import get_model_class, merged_module_map
    from .model import TransformersForCausalLM
    from .support import refusals

    check_model_impl(model_impl)
    arch = _arch(hf_config)
    archs = list(getattr(hf_config, 'architectures', None) or [])
    registered = [a for a in archs if a in merged_module_map(custom_module_map)]
    if model_impl != 'transformers' and (registered or model_impl == 'lmdp'):
        cls = get_model_class(hf_config, custom_module_map)    # raises, saying what is registered, for 'lmdp'
        if not isinstance(cls, type):
            raise ArchitectureError(f'the module map entry for {registered[0] if registered else arch!r} is '
                                    f'{cls!r:.80}, not a class; map the architecture to a model class or its dotted '
                                    'path')
        impl = impl_of(cls)
        name = f'{cls.__module__}.{cls.__qualname__}'
        what = {'lmdp': 'the lmdp port', 'hybrid': 'a partial port on the transformers fallback',
                'transformers': 'the transformers fallback'}[impl]
        return ModelChoice(cls, impl, f'{registered[0]} is registered to {what} {name}')
    why_not = refusals(hf_config)
    if why_not:
        lead = ("model_impl='transformers' asks for the transformers fallback, but it" if model_impl == 'transformers'
                else f"{arch} has no lmdp port, and the transformers fallback")
        raise ArchitectureError(f"{lead} cannot serve it: {'; '.join(why_not)}. Port it and register it in "
                                "MODULE_MAP (or pass custom_module_map=/path/to/module_map.py)")
    if model_impl == 'transformers':
        reason = f"model_impl='transformers': {arch} runs on its transformers modeling code with lmdp's paged attention"
    else:
        reason = (f"{arch} has no lmdp port: it runs on its transformers modeling code with lmdp's paged KV cache and "
                  "attention (the transformers fallback); port it for full speed, or pass model_impl='lmdp' to refuse "
                  'unported models')
    return ModelChoice(TransformersForCausalLM, 'transformers', reason, fell_back=model_impl == 'auto')
