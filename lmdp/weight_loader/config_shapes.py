"""Checkpoint tensor shapes against the config that describes them, read from the safetensors headers.

A config.json that leaves out `num_key_value_heads` or `intermediate_size` gets transformers' defaults, which
rarely match the weights; loading then fails on one mis-shaped parameter, naming the parameter but not the field.
This check names the field, the value the weights imply, and the tensor that says so, before any weight is read.
It looks only at the tensor names HF's decoder families share (embed_tokens, q/k/v/o_proj, gate/up/down_proj,
lm_head); a checkpoint without them, or a quantised one, is not judged here.
"""
import re

from ..errors import ConfigError
from .checkpoint import CheckpointManifest

_LAYER = re.compile(r'^(?:model\.)?layers\.(\d+)\.')


def check_config_against_weights(model_config, manifest: CheckpointManifest, raw_config: dict,
                                 where: str = 'config.json'):
    """ConfigError for the first config field the checkpoint's tensor shapes contradict."""
    hf = model_config.hf_config
    if not manifest.headers_read or getattr(hf, 'quantization_config', None):
        return
    shapes = {name: info.shape for name, info in manifest.tensors.items()}
    hidden, heads, kv = model_config.hidden_size, model_config.num_attention_heads, model_config.num_key_value_heads
    head_dim, v_head_dim, vocab = model_config.head_dim, model_config.v_head_dim, model_config.vocab_size
    inter = getattr(hf, 'intermediate_size', None)

    def find(suffix: str) -> str | None:
        for name in (f'model.{suffix}', suffix, f'model.layers.0.{suffix}', f'layers.0.{suffix}'):
            if name in shapes:
                return name
        return None

    def fail(field: str, value, tensor: str, implied, why: str):
        default = '' if field in raw_config else ' (transformers\' default: config.json does not set it)'
        raise ConfigError(f'{where} does not match the weights: {field} is {value}{default}, but {tensor} in '
                          f'{manifest.file_of[tensor]} has shape {list(shapes[tensor])}, {why}. Set "{field}": '
                          f'{implied} in config.json')

    embed = find('embed_tokens.weight')
    if embed and len(shapes[embed]) == 2:
        rows, cols = shapes[embed]
        if cols != hidden:
            fail('hidden_size', hidden, embed, cols, f'which means hidden_size {cols}')
        if rows != vocab:
            fail('vocab_size', vocab, embed, rows, f'which means {rows} tokens')
    q = find('self_attn.q_proj.weight')
    if q and len(shapes[q]) == 2 and shapes[q][0] != heads * head_dim and shapes[q][0] % head_dim == 0:
        fail('num_attention_heads', heads, q, shapes[q][0] // head_dim,
             f'which is {shapes[q][0] // head_dim} heads of head_dim {head_dim}')
    k = find('self_attn.k_proj.weight')
    if k and len(shapes[k]) == 2 and shapes[k][0] != kv * head_dim and shapes[k][0] % head_dim == 0:
        fail('num_key_value_heads', kv, k, shapes[k][0] // head_dim,
             f'which is {shapes[k][0] // head_dim} kv heads of head_dim {head_dim}')
    v = find('self_attn.v_proj.weight')
    if v and len(shapes[v]) == 2 and shapes[v][0] != kv * v_head_dim and shapes[v][0] % v_head_dim == 0:
        fail('num_key_value_heads', kv, v, shapes[v][0] // v_head_dim,
             f'which is {shapes[v][0] // v_head_dim} kv heads of head_dim {v_head_dim}')
    if isinstance(inter, int):
        for suffix, dim in (('mlp.down_proj.weight', 1), ('mlp.gate_proj.weight', 0), ('mlp.up_proj.weight', 0)):
            t = find(suffix)
            if t and len(shapes[t]) == 2 and shapes[t][dim] != inter:
                fail('intermediate_size', inter, t, shapes[t][dim], f'which means intermediate_size {shapes[t][dim]}')
    layers = _layer_count(shapes)
    if layers is not None and layers < model_config.num_layers:
        first_missing = f'layers.{layers}.'
        raise ConfigError(f'{where} does not match the weights: num_hidden_layers is {model_config.num_layers} but '
                          f'the checkpoint holds {layers} layers (no tensor starts with {first_missing!r}). Set '
                          f'"num_hidden_layers": {layers} in config.json, or fetch the missing shards')


def _layer_count(shapes: dict[str, tuple]) -> int | None:
    found: list[int] = [int(m.group(1)) for name in shapes if (m := _LAYER.match(name))]
    return max(found) + 1 if found else None
