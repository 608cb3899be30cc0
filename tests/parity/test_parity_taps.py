"""Finding each tap's module on both sides, overrides, and taps that cannot be read."""
import torch
from torch import nn

from parity import compare
from parity.taps import TapResolver, read_stream, tap_list


def test_tap_list_is_in_forward_order():
    names = [t.name for t in tap_list(2)]
    assert names == ['embed', 'layers.0.input_norm', 'layers.0.attn', 'layers.0.mlp', 'layers.0.residual',
                     'layers.1.input_norm', 'layers.1.attn', 'layers.1.mlp', 'layers.1.residual', 'final_norm',
                     'logits']
    assert [t.name for t in tap_list(1, qkv=True)][2:5] == ['layers.0.q', 'layers.0.k', 'layers.0.v']


def test_usual_hf_names_resolve_on_both_sides(hf_llama):
    sites = TapResolver(hf_llama, 'reference', hf_llama.config).resolve(tap_list(3, qkv=True))
    assert (sites['embed'].module, sites['embed'].on_input) == ('model.layers.0', True)   # what enters layer 0
    assert sites['layers.2.attn'].module == 'model.layers.2.self_attn'
    assert sites['layers.2.residual'].module == 'model.layers.2'
    assert sites['layers.1.k'].module == 'model.layers.1.self_attn.k_proj'
    assert sites['final_norm'].module == 'model.norm'
    assert 'logits' not in sites   # logits come from the forward's output


def test_fused_qkv_is_cut_by_head_counts(hf_llama):
    class FusedAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv_proj = nn.Linear(4, 4 * 16 + 2 * 2 * 16)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Module()])
            self.model.layers[0].self_attn = FusedAttn()

    sites = TapResolver(Model(), 'port', hf_llama.config).resolve(tap_list(1, qkv=True))
    out = torch.arange(128.0)[None]
    q, k, v = (sites[f'layers.0.{n}'].read(out) for n in 'qkv')
    assert (q.shape[-1], k.shape[-1], v.shape[-1]) == (64, 32, 32)
    assert k[0, 0] == 64 and v[0, 0] == 96


def test_other_families_names_and_overrides():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.mlp = nn.LayerNorm(4), nn.Identity(), nn.Identity()

    class GPT2Like(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.Module()
            self.transformer.wte = nn.Embedding(10, 4)
            self.transformer.h = nn.ModuleList([Block()])
            self.transformer.ln_f = nn.LayerNorm(4)

    config = type('Cfg', (), {'architectures': ['GPT2LMHeadModel']})()
    sites = TapResolver(GPT2Like(), 'reference', config).resolve(tap_list(1))
    assert [sites[n].module for n in ('embed', 'layers.0.input_norm', 'layers.0.attn', 'final_norm')] == [
        'transformer.h.0', 'transformer.h.0.ln_1', 'transformer.h.0.attn', 'transformer.ln_f']
    overridden = TapResolver(GPT2Like(), 'reference', config,
                             {'reference': {'attn': 'mlp', 'mlp': None, 'embed': 'transformer.wte'}}
                             ).resolve(tap_list(1))
    assert overridden['layers.0.attn'].module == 'transformer.h.0.mlp'
    assert (overridden['embed'].module, overridden['embed'].on_input) == ('transformer.wte', False)
    assert isinstance(overridden['layers.0.mlp'], str) and 'TAP_OVERRIDES' in overridden['layers.0.mlp']


def test_port_residual_is_the_sum_of_the_pair():
    h, r = torch.ones(1, 2, 3), torch.full((1, 2, 3), 2.0)
    assert torch.equal(read_stream((h, r)), torch.full((1, 2, 3), 3.0))
    assert torch.equal(read_stream(h), h)
    assert torch.equal(read_stream((h, None)), h)


def test_a_tap_that_cannot_be_read_fails_with_the_reason(tiny_llama, references):
    report = compare(tiny_llama, references=references('float32'), tap_overrides={'port': {'mlp': None}})
    broken = [t for t in report.taps if t.error]
    assert {t.tap for t in broken} == {f'layers.{i}.mlp' for i in range(3)}
    assert all(not t.passed and 'the port has no module' in t.error for t in broken)
    assert not report.passed
    # a module the reference runs and the port lacks is where the two part: it is named as the divergence
    assert report.first_divergence.tap == 'layers.0.mlp' and report.first_divergence.error
    assert report.divergence_line().startswith('first divergence: layer 0, mlp (prefill: the port has no module')


def test_another_family_maps_with_no_configuration(tmp_path):
    """Gemma 2 (sandwich norms, embedding scaled inside HF's embedding module but after lmdp's) needs no overrides."""
    from lmdp.tiny import make_tiny
    path = make_tiny('gemma2', tmp_path / 'gemma2')
    report = compare(str(path), prompts=2, decode_steps=2)
    assert report.passed, report.summary()
    assert not any(t.error for t in report.taps)
    assert report.architecture == 'Gemma2ForCausalLM'
