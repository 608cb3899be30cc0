"""Streaming checkpoints into load_weights: coverage errors, shape errors, sharding and order."""
import json
import logging
import os
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmdp.config import ModelConfig
from lmdp.engine import build_model
from lmdp.errors import WeightLoadError
from lmdp.weight_loader import checkpoint_files, iter_checkpoint, load_model_weights


def _rewrite(tiny_llama, tmp_path, edit):
    """A copy of the checkpoint whose tensors went through `edit(dict) -> dict`."""
    dst = tmp_path / 'ckpt'
    dst.mkdir()
    for f in os.listdir(tiny_llama):
        if not f.endswith('.safetensors'):
            (dst / f).write_bytes(open(os.path.join(tiny_llama, f), 'rb').read())
    tensors = {}
    for f in checkpoint_files(tiny_llama):
        tensors.update(load_file(f))
    save_file(edit(tensors), str(dst / 'model.safetensors'), metadata={'format': 'pt'})
    return str(dst)


def _model(path):
    cfg = ModelConfig.from_pretrained(path)
    return build_model(cfg, path, load_weights=False)[0]


def test_missing_tensor_is_named(tiny_llama, tmp_path):
    def drop(t):
        t.pop('model.layers.1.self_attn.k_proj.weight')
        t.pop('model.norm.weight')
        return t
    path = _rewrite(tiny_llama, tmp_path, drop)
    with pytest.raises(WeightLoadError) as err:
        load_model_weights(_model(path), path)
    text = str(err.value)
    assert '2 parameter(s) were never loaded' in text
    assert "model.layers.1.self_attn.qkv_proj.weight [shard 'k']" in text
    assert "checkpoint tensor 'model.layers.1.self_attn.k_proj.weight'" in text
    assert 'model.norm.weight' in text
    assert 'layers.0' not in text


def test_misshaped_tensor_names_param_and_both_shapes(tiny_llama, tmp_path):
    def shrink(t):
        t['model.layers.0.mlp.down_proj.weight'] = t['model.layers.0.mlp.down_proj.weight'][:, :-3].clone()
        return t
    path = _rewrite(tiny_llama, tmp_path, shrink)
    model = _model(path)
    expected = tuple(model.model.layers[0].mlp.down_proj.weight.shape)
    with pytest.raises(WeightLoadError) as err:
        load_model_weights(model, path)
    text = str(err.value)
    assert "parameter 'model.layers.0.mlp.down_proj.weight'" in text
    assert f'expects shape {expected}' in text
    assert f'has shape {(expected[0], expected[1] - 3)}' in text


def test_misshaped_shard_of_stacked_param(tiny_llama, tmp_path):
    def shrink(t):
        t['model.layers.0.self_attn.v_proj.weight'] = t['model.layers.0.self_attn.v_proj.weight'][:-1].clone()
        return t
    path = _rewrite(tiny_llama, tmp_path, shrink)
    with pytest.raises(WeightLoadError, match=r"qkv_proj.weight'.*\(shard 'v'\) expects shape"):
        load_model_weights(_model(path), path)


def test_unused_tensor_gives_a_warning_naming_it(tiny_llama, tmp_path, caplog):
    def extra(t):
        t['model.layers.0.mlp.extra_proj.weight'] = torch.zeros(2, 2)
        t['model.rotary_emb.inv_freq'] = torch.zeros(4)       # known leftovers stay quiet
        return t
    path = _rewrite(tiny_llama, tmp_path, extra)
    with caplog.at_level(logging.WARNING, logger='lmdp'):
        tracker = load_model_weights(_model(path), path)
    assert tracker.unused == ['model.layers.0.mlp.extra_proj.weight']
    assert 'model.layers.0.mlp.extra_proj.weight' in caplog.text and 'inv_freq' not in caplog.text


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sharded_and_shuffled_loads_give_the_same_model(tmp_path):
    from lmdp.tiny import make_tiny
    whole = str(make_tiny('llama', tmp_path / 'whole', seed=3))
    sharded = str(make_tiny('llama', tmp_path / 'sharded', seed=3, max_shard_size='40KB'))
    files = checkpoint_files(sharded)
    assert len(files) >= 3 and os.path.isfile(os.path.join(sharded, 'model.safetensors.index.json'))

    reference = _model(whole)
    load_model_weights(reference, whole)
    expected = _state(reference)

    in_order = _model(sharded)
    load_model_weights(in_order, sharded)
    rng = random.Random(0)
    for trial in range(3):
        shuffled_files = files[:]
        rng.shuffle(shuffled_files)
        pairs = list(iter_checkpoint(sharded, files=shuffled_files))
        rng.shuffle(pairs)                                     # any order, across shards too
        model = _model(sharded)
        load_model_weights(model, sharded, weights=iter(pairs))
        got = _state(model)
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), k
    for k, v in _state(in_order).items():
        assert torch.equal(v, expected[k]), k


def test_index_naming_a_missing_shard(tmp_path):
    from lmdp.tiny import make_tiny
    path = make_tiny('llama', tmp_path / 's', max_shard_size='40KB')
    index = json.loads((path / 'model.safetensors.index.json').read_text())
    victim = sorted(set(index['weight_map'].values()))[1]
    (path / victim).unlink()
    with pytest.raises(WeightLoadError, match=f'not there: {victim}'):
        checkpoint_files(str(path))


def test_weights_cast_to_the_model_dtype(tiny_llama):
    cfg = ModelConfig.from_pretrained(tiny_llama, dtype='bfloat16')
    model, _ = build_model(cfg, tiny_llama)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    raw = dict(iter_checkpoint(tiny_llama))
    assert torch.equal(model.model.embed_tokens.weight, raw['model.embed_tokens.weight'].bfloat16())
