"""Rotary position embedding: cos/sin tables built from an HF config, and the op applying them.

``RotaryEmbedding.forward(x, position_ids, attn_metadata=None)`` returns ``(cos, sin)``, ``[T, R]`` for
``[T]`` positions or ``[1, T, R]`` for ``[1, T]`` (R = rotary dim). The inverse frequencies come from
``rope_frequencies`` (bit for bit transformers'); the types whose scaling depends on the sequence's length
(dynamic NTK, LongRoPE) choose it per sequence from the step's ``attn_metadata``.
"""

import enum
import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from .rope_frequencies import (  # noqa: F401
    Llama3Parameters,
    LongRoPEScalingParameters,
    YarnParameters,
    _default_inv_freq,
    _llama3_inv_freq,
    _longrope_inv_freq,
    _rope_exponents,
    _yarn_attention_factor,
    _yarn_inv_freq,
)


class RopeType(str, enum.Enum):
    """Supported rope types; the values are HF's ``rope_type`` names."""
    Default = 'default'
    LinearScaling = 'linear'
    DynamicNTKScaling = 'dynamic'
    Llama3 = 'llama3'
    Yarn = 'yarn'
    LongRoPEScaling = 'longrope'


SUPPORTED_ROPE_TYPES = tuple(t.value for t in RopeType)

# Legacy names found in older checkpoints. 'su' is Phi-3's name for longrope.
# 'mrope' (Qwen2-VL) equals default rope when positions are 1-D (text only);
# real multimodal 3-D positions need an mrope wrapper, which this is not.
_ROPE_TYPE_ALIASES = {'su': 'longrope', 'mrope': 'default'}


def _parse_rope_type(rope_type: Any) -> RopeType:
    name = rope_type.value if isinstance(rope_type, RopeType) else str(rope_type)
    name = _ROPE_TYPE_ALIASES.get(name, name)
    try:
        return RopeType(name)
    except ValueError:
        raise ValueError(f'Unsupported rope type {name!r}; supported rope types: '
                         f'{", ".join(SUPPORTED_ROPE_TYPES)}') from None


# --- modules ---


def as_rows(table: Tensor) -> Tensor:
    """A cos/sin table as ``[T, R]``: ports may hand on ``[1, T, R]`` (what ``rotary_emb(x, position_ids [1, T])``
    returns) or ``[T, R]`` (what lmdeploy's ports make of it with ``cos[0]``)."""
    return table if table.dim() == 2 else table.reshape(-1, table.size(-1))


def token_seq_lens(attn_metadata: Any, num_tokens: int) -> Tensor:
    """Per packed token, the length of its own sequence in this step (history + new tokens): what transformers
    calls ``seq_len`` (``max(position_ids) + 1``) when it runs that sequence alone. No host sync."""
    kv_seqlens = attn_metadata.kv_seqlens
    if attn_metadata.is_decoding and kv_seqlens.numel() == num_tokens:
        return kv_seqlens  # one token per sequence
    return torch.repeat_interleave(kv_seqlens, attn_metadata.q_seqlens, output_size=num_tokens)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for packed tokens: ``forward(x, position_ids, attn_metadata=None) -> (cos, sin)``.

    Static rope types (default, linear, llama3, yarn) use one fixed ``inv_freq``. forward has no host sync, so it
    can be captured in a CUDA graph.
    """

    #: whether the frequencies depend on the sequence's length (dynamic NTK, LongRoPE)
    depends_on_length = False

    def __init__(self, inv_freq: Tensor, attention_scaling: float = 1.0, rope_type: RopeType = RopeType.Default):
        super().__init__()
        # non-persistent: derived from the config, so absent from checkpoints; still follows .to(device).
        self.register_buffer('inv_freq', inv_freq.float(), persistent=False)
        self.attention_scaling = float(attention_scaling)
        self.rope_type = _parse_rope_type(rope_type)

    @property
    def rotary_dim(self) -> int:
        """R: the number of leading head channels that are rotated."""
        return 2 * self.inv_freq.numel()

    def _inv_freq_for(self, seq_lens: Tensor) -> Tensor:
        """``[T, R // 2]`` frequencies for tokens whose sequences have these lengths (length-dependent types)."""
        raise NotImplementedError

    def forward(self, x: Tensor, position_ids: Tensor, attn_metadata: Any = None) -> tuple[Tensor, Tensor]:
        """position_ids ``[1, T]`` or ``[T]`` -> cos, sin ``[1, T, R]`` or ``[T, R]`` in x's dtype.

        For the length-dependent types, pass the step's ``attn_metadata``: each token then gets the frequencies of
        its own sequence's length, whatever else is packed in the step. Without it, all positions are taken as one
        sequence (transformers' behaviour for one call).
        """
        shape = position_ids.shape
        positions = position_ids.reshape(-1)
        inv_freq = self.inv_freq
        if self.depends_on_length and positions.numel():
            if attn_metadata is not None:
                seq_lens = token_seq_lens(attn_metadata, positions.numel())
            else:
                seq_lens = (positions.max() + 1).expand(positions.shape)
            inv_freq = self._inv_freq_for(seq_lens)
        inv_freq = inv_freq.to(device=positions.device, dtype=torch.float)
        # float32 throughout, same expression as HF's LlamaRotaryEmbedding.forward.
        freqs = positions[:, None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype=x.dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype=x.dtype)
        return cos.view(*shape, -1), sin.view(*shape, -1)

    def extra_repr(self) -> str:
        return f'rope_type={self.rope_type.value}, rotary_dim={self.rotary_dim}, ' \
               f'attention_scaling={self.attention_scaling}'


class DynamicNTKRotaryEmbedding(RotaryEmbedding):
    """Dynamic NTK: the base grows with the sequence's length, per sequence.

    A token's frequencies come from its own sequence's length (history + new tokens) when that exceeds
    max_position_embeddings, the original ones otherwise, so a sequence rotates the same whatever it is packed
    beside. transformers, running one sequence, recomputes from ``max(position_ids) + 1`` as the sequence grows,
    which is the same; but its module keeps grown frequencies across calls until a call falls back within
    max_position_embeddings, so after a longer sequence it may use larger-base frequencies than this (stateless)
    module. As in transformers, keys already in the KV cache keep the rotation they were written with.
    """

    depends_on_length = True

    def __init__(self, dim: int, base: float, scaling_factor: float, max_position_embeddings: int):
        super().__init__(_default_inv_freq(dim, base), 1.0, RopeType.DynamicNTKScaling)
        self.register_buffer('exponents', _rope_exponents(dim), persistent=False)
        self.dim = dim
        self.base = base
        self.scaling_factor = scaling_factor
        self.max_position_embeddings = max_position_embeddings

    def _inv_freq_for(self, seq_lens: Tensor) -> Tensor:
        mpe = self.max_position_embeddings
        seq_lens = seq_lens.long()
        # As HF's tensor path does; it also keeps the branch that torch.where drops below finite.
        clamped = torch.clamp(seq_lens, min=mpe)
        factor = self.scaling_factor
        # The growth in float64, rounded once: a vectorised and a scalar float32 pow differ in the last bit, which
        # would make a token's frequencies depend on where it sits in the packed step.
        growth = ((factor * clamped.double() / mpe) - (factor - 1))**(self.dim / (self.dim - 2))
        base = (self.base * growth).float()
        grown = 1.0 / (base[:, None]**self.exponents)
        # Within the trained length HF uses the original frequencies unchanged.
        return torch.where((seq_lens > mpe)[:, None], grown, self.inv_freq)


class LongRoPERotaryEmbedding(RotaryEmbedding):
    """LongRoPE: short or long factors, picked per sequence.

    A token uses the long set when its own sequence's length (history + new tokens) exceeds
    ``original_max_position_embeddings``, as transformers does for a sequence run alone; the choice is a
    ``torch.where`` between two precomputed tables, so there is no host sync.
    """

    depends_on_length = True

    def __init__(self, short_inv_freq: Tensor, long_inv_freq: Tensor, original_max_position_embeddings: int,
                 attention_scaling: float):
        super().__init__(short_inv_freq, attention_scaling, RopeType.LongRoPEScaling)
        self.register_buffer('long_inv_freq', long_inv_freq.float(), persistent=False)
        self.original_max_position_embeddings = original_max_position_embeddings

    def _inv_freq_for(self, seq_lens: Tensor) -> Tensor:
        is_long = (seq_lens > self.original_max_position_embeddings)[:, None]
        return torch.where(is_long, self.long_inv_freq, self.inv_freq)


def build_rotary_embedding(dim: int,
                           max_position_embeddings: int = 2048,
                           base: float = 10000,
                           scaling_factor: float | None = 1.0,
                           yarn_params: YarnParameters | None = None,
                           longrope_params: LongRoPEScalingParameters | None = None,
                           llama3_params: Llama3Parameters | None = None,
                           emb_type: Any = RopeType.Default,
                           partial_rotary_factor: float | None = None,
                           device: torch.device | None = None) -> RotaryEmbedding:
    """Build a rotary embedding module.

    ``dim`` is the head dim; the rotary dim is ``int(dim * partial_rotary_factor)``.
    ``emb_type`` is a ``RopeType`` or its name. For yarn/longrope a ``None``
    scaling_factor means ``max_position_embeddings / original_max_position_embeddings``.
    """
    emb_type = _parse_rope_type(emb_type)
    if partial_rotary_factor is not None:
        dim = int(dim * partial_rotary_factor)

    if emb_type == RopeType.Default:
        rope = RotaryEmbedding(_default_inv_freq(dim, base))
    elif emb_type == RopeType.LinearScaling:
        # Scaling inv_freq (not positions) is HF's choice; the results are bit-identical to it.
        rope = RotaryEmbedding(_default_inv_freq(dim, base) / scaling_factor, rope_type=emb_type)
    elif emb_type == RopeType.DynamicNTKScaling:
        rope = DynamicNTKRotaryEmbedding(dim, base, scaling_factor, max_position_embeddings)
    elif emb_type == RopeType.Llama3:
        params = llama3_params or Llama3Parameters()
        rope = RotaryEmbedding(_llama3_inv_freq(dim, base, scaling_factor, params), rope_type=emb_type)
    elif emb_type == RopeType.Yarn:
        params = yarn_params or YarnParameters()
        original = params.original_max_position_embeddings or max_position_embeddings
        factor = scaling_factor if scaling_factor is not None else max_position_embeddings / original
        rope = RotaryEmbedding(_yarn_inv_freq(dim, base, factor, original, params),
                               _yarn_attention_factor(factor, params), emb_type)
    else:  # LongRoPE
        if longrope_params is None:
            raise ValueError('longrope needs longrope_params (short_factor / long_factor)')
        params = longrope_params
        original = params.original_max_position_embeddings or max_position_embeddings
        factor = scaling_factor if scaling_factor is not None else max_position_embeddings / original
        if params.attention_factor is not None:
            attention = float(params.attention_factor)
        elif factor <= 1.0:
            attention = 1.0
        else:
            attention = math.sqrt(1 + math.log(factor) / math.log(original))
        rope = LongRoPERotaryEmbedding(_longrope_inv_freq(dim, base, params.short_factor),
                                       _longrope_inv_freq(dim, base, params.long_factor), original, attention)

    if device is not None:
        rope = rope.to(device)
    return rope


# --- reading HF configs ---


def get_rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """The rope settings dict of an HF config, copied.

    transformers 5.x keeps them in ``config.rope_parameters`` (per layer type for
    models such as gemma3: pass ``layer_type``); 4.x in ``config.rope_scaling``
    (with ``rope_theta`` / ``partial_rotary_factor`` as config attributes).
    """
    params = getattr(hf_config, 'rope_parameters', None)
    if params is None:
        params = getattr(hf_config, 'rope_scaling', None)
    params = dict(params or {})

    # Nested form: {layer_type: {...} or None}; rope fields themselves are never dicts.
    if any(isinstance(v, dict) for v in params.values()):
        if layer_type is None:
            raise ValueError(f'rope parameters are given per layer type {sorted(params)}; pass layer_type=')
        if layer_type not in params:
            raise ValueError(f'no rope parameters for layer type {layer_type!r}; have {sorted(params)}')
        if params[layer_type] is None:
            raise ValueError(f'layer type {layer_type!r} uses no rotary embedding (rope parameters are None)')
        params = dict(params[layer_type])
    return params


def _require(params: dict[str, Any], key: str, rope_type: RopeType) -> Any:
    if params.get(key) is None:
        raise ValueError(f'rope type {rope_type.value!r} needs {key!r} in the rope parameters, got {params}')
    return params[key]


def build_rotary_params(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """Keyword arguments of ``build_rotary_embedding`` read from an HF config (4.x or 5.x)."""
    params = get_rope_parameters(hf_config, layer_type)
    emb_type = _parse_rope_type(params.get('rope_type') or params.get('type') or 'default')

    head_dim = getattr(hf_config, 'head_dim', None) or hf_config.hidden_size // hf_config.num_attention_heads
    max_pos = hf_config.max_position_embeddings
    # 5.x moves rope_theta / partial_rotary_factor into the dict; 4.x keeps them on the config.
    base = params.get('rope_theta') or getattr(hf_config, 'rope_theta', None) or 10000.0
    partial = params.get('partial_rotary_factor') or getattr(hf_config, 'partial_rotary_factor', None)
    # A config-level original_max_position_embeddings wins over the dict one (Phi-3), as in 5.x.
    original = (getattr(hf_config, 'original_max_position_embeddings', None)
                or params.get('original_max_position_embeddings') or max_pos)

    kwargs = dict(dim=head_dim,
                  max_position_embeddings=max_pos,
                  base=base,
                  emb_type=emb_type,
                  partial_rotary_factor=partial,
                  scaling_factor=1.0)
    if emb_type in (RopeType.LinearScaling, RopeType.DynamicNTKScaling):
        kwargs['scaling_factor'] = _require(params, 'factor', emb_type)
    elif emb_type == RopeType.Llama3:
        kwargs['scaling_factor'] = _require(params, 'factor', emb_type)
        kwargs['llama3_params'] = Llama3Parameters(low_freq_factor=_require(params, 'low_freq_factor', emb_type),
                                                   high_freq_factor=_require(params, 'high_freq_factor', emb_type),
                                                   original_max_position_embeddings=original)
    elif emb_type == RopeType.Yarn:
        kwargs['scaling_factor'] = params.get('factor')
        kwargs['yarn_params'] = YarnParameters(attention_factor=params.get('attention_factor'),
                                               beta_fast=params.get('beta_fast') or 32,
                                               beta_slow=params.get('beta_slow') or 1,
                                               mscale=params.get('mscale'),
                                               mscale_all_dim=params.get('mscale_all_dim'),
                                               truncate=params.get('truncate', True),
                                               original_max_position_embeddings=original)
    elif emb_type == RopeType.LongRoPEScaling:
        kwargs['scaling_factor'] = params.get('factor')
        kwargs['longrope_params'] = LongRoPEScalingParameters(
            short_factor=_require(params, 'short_factor', emb_type),
            long_factor=_require(params, 'long_factor', emb_type),
            original_max_position_embeddings=original,
            attention_factor=params.get('attention_factor'))
    return kwargs


def build_rotary_embedding_from_config(hf_config: Any,
                                       device: torch.device | None = None,
                                       layer_type: str | None = None) -> RotaryEmbedding:
    """Build the rotary embedding an HF config describes (``layer_type`` for per-layer-type rope)."""
    return build_rotary_embedding(**build_rotary_params(hf_config, layer_type), device=device)


class LayerTypeRotaryEmbedding(nn.ModuleDict):
    """One rotary embedding per layer type, for configs whose rope settings differ by layer type (Gemma 3's local
    and global layers): ``forward(x, position_ids, attn_metadata=None) -> {layer_type: (cos, sin)}``."""

    def __init__(self, hf_config: Any, device: torch.device | None = None):
        layer_types = sorted(set(hf_config.layer_types))
        super().__init__({t: build_rotary_embedding_from_config(hf_config, device=device, layer_type=t)
                          for t in layer_types})

    def forward(self, x: Tensor, position_ids: Tensor, attn_metadata: Any = None) -> dict[str, tuple[Tensor, Tensor]]:
        return {layer_type: rope(x, position_ids, attn_metadata) for layer_type, rope in self.items()}


# --- applying ---


class ApplyRotaryEmb(nn.Module):
    """Rotate packed query ``[T, Hq, D]`` and key ``[T, Hk, D]`` by cos/sin ``[T, R]`` (or ``[1, T, R]``).

    ``fuses_into_cache_write``: ``Attention`` may compute this inside the kernel that writes the KV cache instead
    of calling it (see ``lmdp.nn.fusion``); a replacement module without the flag is always called.
    """

    fuses_into_cache_write = True

    def forward(self, query: Tensor, key: Tensor, cos: Tensor, sin: Tensor,
                inplace: bool = True) -> tuple[Tensor, Tensor]:
        """Returns the rotated (query, key); with ``inplace`` they are written into the inputs."""
        cos, sin = as_rows(cos), as_rows(sin)
        if inplace:
            return kernels.apply_rotary_pos_emb(query, key, cos, sin, q_out=query, k_out=key)
        return kernels.apply_rotary_pos_emb(query, key, cos, sin)
