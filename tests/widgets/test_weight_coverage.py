"""The weight-coverage view's data: what a port's own load_weights filled, left out and mis-stacked."""
from collections.abc import Iterable

import torch

from lmdp.models.llama import LlamaForCausalLM
from lmdp.weight_loader import load_weight
from lmdp.widgets.weight_coverage import coverage_of_checkpoint
from lmdp.widgets.weight_coverage_view import render_html


class NoStacking(LlamaForCausalLM):
    """load_weights by name only: q/k/v and gate/up never reach the stacked parameters."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        params = dict(self.named_parameters())
        for name, tensor in weights:
            if name in params:
                load_weight(params[name], tensor)


class KVCrossed(LlamaForCausalLM):
    stacked_params_mapping = [('.qkv_proj', '.q_proj', 'q'), ('.qkv_proj', '.k_proj', 'v'),
                              ('.qkv_proj', '.v_proj', 'k'), ('.gate_up_proj', '.gate_proj', 0),
                              ('.gate_up_proj', '.up_proj', 1)]


def test_a_correct_port_covers_everything_and_shows_each_shards_tensor(tiny_llama):
    c = coverage_of_checkpoint(tiny_llama)
    assert c.ok and not c.missing and not c.unused
    qkv = [s for s in c.stacked if s.param == 'model.layers.1.self_attn.qkv_proj.weight']
    assert [(s.shard, s.filled_by) for s in qkv] == [
        ("'q'", ['model.layers.1.self_attn.q_proj.weight']), ("'k'", ['model.layers.1.self_attn.k_proj.weight']),
        ("'v'", ['model.layers.1.self_attn.v_proj.weight'])]
    assert len(c.stacked) == 3 * 5       # 3 layers x (q, k, v, gate, up)
    assert c.verdict().startswith('every parameter')


def test_without_stacking_the_shards_are_missing_and_the_tensors_unused(tiny_llama):
    c = coverage_of_checkpoint(tiny_llama, {'LlamaForCausalLM': NoStacking})
    assert not c.ok
    missing = {(m.param, m.shard): m.checkpoint_hint for m in c.missing}
    assert missing[('model.layers.0.self_attn.qkv_proj.weight', "'k'")] == 'model.layers.0.self_attn.k_proj.weight'
    assert missing[('model.layers.2.mlp.gate_up_proj.weight', '1')] == 'model.layers.2.mlp.up_proj.weight'
    assert len(c.missing) == 15 and len(c.unused) == 15
    assert 'model.layers.0.mlp.gate_proj.weight' in c.unused
    page = render_html(c)
    assert page.count('lmdp-missing-row') == 15 and page.count('lmdp-unused-row') == 15


def test_crossed_shards_are_caught_although_everything_loaded(tiny_llama):
    c = coverage_of_checkpoint(tiny_llama, {'LlamaForCausalLM': KVCrossed})
    assert not c.missing and not c.unused and not c.ok
    bad = [s for s in c.stacked if not s.ok]
    assert {s.shard for s in bad} == {"'k'", "'v'"} and len(bad) == 6
    assert bad[0].filled_by == ['model.layers.0.self_attn.v_proj.weight']
    assert bad[0].expected == 'model.layers.0.self_attn.k_proj.weight'
    assert '6 shard(s) filled by another tensor' in c.verdict()


def test_tied_lm_head_is_ignored_on_purpose(tmp_path):
    from lmdp.tiny import make_tiny
    path = make_tiny('llama', tmp_path / 'tied', tie_word_embeddings=True)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path / 'model.safetensors'))
    tensors['lm_head.weight'] = tensors['model.embed_tokens.weight'].clone()   # some checkpoints store it anyway
    save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})
    c = coverage_of_checkpoint(str(path))
    assert c.ok and c.ignored == ['lm_head.weight'] and 'ignored on purpose' in c.verdict()
