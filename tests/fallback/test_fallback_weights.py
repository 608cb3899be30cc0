"""The fallback's checkpoint tensors go through lmdp's loader and land exactly where transformers' own loader
puts them: renamed tensors, stacked experts, tied heads; a missing or mis-shaped tensor is named."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmdp.engine import ModelAgent
from lmdp.errors import WeightLoadError
from lmdp.tiny import FALLBACK_FAMILIES


@pytest.mark.parametrize('model_type', sorted(FALLBACK_FAMILIES))
def test_every_parameter_equals_transformers_own_load(model_type, tiny_fallback):
    from transformers import AutoModelForCausalLM
    path = tiny_fallback(model_type)
    agent = ModelAgent.from_pretrained(path, dtype='float32')
    assert agent.load_report.complete, agent.load_report
    ours = agent.model.state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def _copy_without(src, dst, drop=(), change=None):
    """A copy of a single-file checkpoint with some tensors dropped or replaced."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, 'model.safetensors')
    tensors = load_file(path)
    for name in drop:
        del tensors[name]
    tensors.update(change or {})
    save_file(tensors, path, metadata={'format': 'pt'})
    return str(dst)


def test_a_missing_expert_is_named_with_its_shard(tiny_fallback, tmp_path):
    # Mixtral and Qwen2-MoE have ports now (lmdp.models): model_impl='transformers' puts them on the fallback
    src = tiny_fallback('mixtral')
    path = _copy_without(src, tmp_path / 'ckpt', drop=['model.layers.1.block_sparse_moe.experts.3.w3.weight'])
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj \[shard \(3, 1\)\]"):
        ModelAgent.from_pretrained(path, dtype='float32', model_impl='transformers')
    agent = ModelAgent.from_pretrained(path, dtype='float32', strict=False, model_impl='transformers')
    assert agent.load_report.missing == ['model.layers.1.mlp.experts.gate_up_proj [shard (3, 1)]']


def test_a_mis_shaped_expert_tensor_is_refused_by_name(tiny_fallback, tmp_path):
    name = 'model.layers.0.mlp.experts.2.down_proj.weight'
    src = tiny_fallback('qwen2_moe')
    bad = _copy_without(src, tmp_path / 'ckpt', change={name: torch.zeros(3, 3)})
    with pytest.raises(WeightLoadError, match=r"experts\.down_proj'.*\(shard \(2, 0\)\).*\(3, 3\)"):
        ModelAgent.from_pretrained(bad, dtype='float32', model_impl='transformers')


def test_a_checkpoint_tensor_that_fits_nothing_is_reported_unused(tiny_fallback, tmp_path):
    src = tiny_fallback('olmo2')
    path = _copy_without(src, tmp_path / 'ckpt', change={'model.layers.0.mlp.extra_proj.weight': torch.ones(2, 2)})
    agent = ModelAgent.from_pretrained(path, dtype='float32', strict=False)
    assert agent.load_report.unused == ['model.layers.0.mlp.extra_proj.weight'] and not agent.load_report.missing
