"""Which checkpoints the transformers fallback can serve, and why not the others; whether their decode steps can
be CUDA graphs, and why not.

Everything here reads the config and the modeling source; nothing is built or loaded, so `lmdp check` can answer
in a second. What can't be seen statically (a layer that never reaches the attention function, a head count the
config misstates) is caught on the first step, with the same kind of message.
"""
import inspect
import re

#: layer kinds whose state is the KV cache; anything else (mamba, linear attention, conv) keeps state lmdp lacks
ATTENTION_LAYER_TYPES = {'full_attention', 'sliding_attention', 'attention', 'global', 'local', 'sliding'}
#: config fields that list per-layer kinds, across families
LAYER_KIND_FIELDS = ('layer_types', 'block_types', 'layers_block_type', 'hybrid_layer_types')
#: rope types whose frequencies depend on the length of the one sequence transformers' code assumes it runs; a
#: packed step of several sequences has no single length
LENGTH_DEPENDENT_ROPE = {'dynamic': 'dynamic NTK scaling', 'longrope': 'LongRoPE', 'su': 'LongRoPE'}


def hf_causal_lm_class(hf_config):
    """The transformers class `AutoModelForCausalLM` builds for this config, or None."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    except (KeyError, ValueError):
        return None


def kv_layout(hf_config) -> tuple[int, int, int]:
    """(kv heads, key head dim, value head dim) of every layer, under the names families use for them."""
    heads = hf_config.num_attention_heads
    kv_heads = None
    for name in ('num_key_value_heads', 'num_kv_heads', 'n_head_kv'):
        value = getattr(hf_config, name, None)
        if value:
            kv_heads = value
            break
    if kv_heads is None:
        kv_heads = 1 if getattr(hf_config, 'multi_query', False) else heads
    if getattr(hf_config, 'kv_lora_rank', None):    # MLA: k = [nope | rope], v its own width
        k_dim = hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim
        return kv_heads, k_dim, hf_config.v_head_dim
    head_dim = getattr(hf_config, 'head_dim', None) or hf_config.hidden_size // heads
    return kv_heads, head_dim, head_dim


def _modeling_source(cls) -> str:
    try:
        return inspect.getsource(inspect.getmodule(cls))
    except (OSError, TypeError):
        return ''


def _attention_call_kwargs(source: str) -> set:
    """Keyword names the modeling code passes to its attention function."""
    names = set()
    for call in re.finditer(r'attention_interface\((.*?)\n\s*\)', source, re.S):
        names.update(re.findall(r'(\w+)=', call.group(1)))
    return names


def _rope_types(hf_config) -> list[str]:
    params = getattr(hf_config, 'rope_parameters', None) or getattr(hf_config, 'rope_scaling', None) or {}
    groups = [v for v in params.values() if isinstance(v, dict)] or [params]
    return [str(g.get('rope_type') or g.get('type') or 'default') for g in groups]


def refusals(hf_config) -> list[str]:
    """Why the fallback can't serve this config, one sentence each (empty: it can)."""
    from .attention import UNSUPPORTED_KWARGS
    why = []
    arch = (getattr(hf_config, 'architectures', None) or [getattr(hf_config, 'model_type', '?')])[0]
    if getattr(hf_config, 'quantization_config', None) is not None:
        why.append('the checkpoint is quantised; the fallback loads unquantised weights only')
    if getattr(hf_config, 'is_encoder_decoder', False):
        why.append(f'{arch} is an encoder-decoder model; the paged cache serves decoder-only models')
    text = hf_config.get_text_config() if hasattr(hf_config, 'get_text_config') else hf_config
    if text is not hf_config:
        why.append(f'{arch} is multimodal (its config nests a text_config); the fallback serves text-only models')
    cls = hf_causal_lm_class(hf_config)
    if cls is None:
        why.append(f'transformers ships no causal-LM class for model_type {hf_config.model_type!r} (remote code or '
                   'not a decoder), so there is no modeling code to fall back on')
        return why
    if getattr(cls, '_is_stateful', False):
        why.append(f'{cls.__name__} keeps recurrent state between steps, which lmdp\'s KV cache does not hold')
    for name in LAYER_KIND_FIELDS:
        kinds = getattr(hf_config, name, None)
        if isinstance(kinds, (list, tuple)):
            other = sorted({str(k) for k in kinds} - ATTENTION_LAYER_TYPES)
            if other:
                why.append(f'{name} has layers of kind {other}, which carry a recurrent state from step to step; '
                           'only attention layers keep their state in lmdp\'s paged KV cache')
    source = _modeling_source(cls)
    if 'ALL_ATTENTION_FUNCTIONS' not in source and 'AttentionInterface' not in source:
        why.append(f'{cls.__name__} computes attention in its own code, not through transformers\' attention '
                   'interface, so lmdp\'s paged attention cannot be plugged in; port it (see notebooks/)')
    for name in sorted(_attention_call_kwargs(source) & set(UNSUPPORTED_KWARGS)):
        why.append(f'{cls.__name__} asks attention for {UNSUPPORTED_KWARGS[name]} ({name}=), which lmdp\'s paged '
                   'kernels do not compute')
    for rope in _rope_types(hf_config):
        if rope in LENGTH_DEPENDENT_ROPE:
            why.append(f'its rotary embedding ({LENGTH_DEPENDENT_ROPE[rope]}, rope_type {rope!r}) picks frequencies '
                       'from the length of the one sequence transformers\' code assumes; a packed step holds '
                       'several, so port the model with lmdp.nn\'s rotary embedding, which handles them per sequence')
    if getattr(hf_config, 'attention_chunk_size', None):
        why.append('chunked local attention (attention_chunk_size) is not computed by lmdp\'s paged kernels')
    if getattr(hf_config, 'num_kv_shared_layers', 0):
        why.append('layers share KV caches (num_kv_shared_layers); lmdp gives every layer its own')
    try:
        kv_layout(hf_config)
    except (AttributeError, TypeError) as e:
        why.append(f'the config does not say how many key/value heads of what size each layer has ({e})')
    return why


def cuda_graph_refusal(hf_config) -> str | None:
    """Why decode steps of this model can't be captured as CUDA graphs (None: they can)."""
    cls = hf_causal_lm_class(hf_config)
    if cls is None:
        return 'no transformers class'
    if not getattr(cls, '_can_compile_fullgraph', False):
        return (f'transformers marks {cls.__name__} as not capturable in one graph (_can_compile_fullgraph is '
                'False): its code synchronises with the host or makes data-dependent shapes, so decode runs eagerly')
    return None
