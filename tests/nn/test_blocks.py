"""lmdp.nn blocks: Attention owns its rotary step and GatedMLP its activation. Each fuses the step into the next
kernel only while the step is lmdp's own and unwatched: fused and unfused give the same numbers, a hook sees the
step's real output, and a replacement (without the fusion marker) is called."""
import pytest
import torch
from torch import nn

from lmdp.kernels.rotary import apply_rotary_pos_emb
from lmdp.model_inputs import AttentionMetadata
from lmdp.nn import ApplyRotaryEmb, Attention, GatedMLP, SiluAndMul, build_rotary_embedding
from lmdp.weight_loader import load_weight

HQ, HK, D, BLOCK = 4, 2, 16, 8


def _prefill(seqs=(5, 11), seed=0):
    """q, k, v of a packed prefill (views of one qkv, as a port has them), its metadata, empty caches, cos/sin."""
    g = torch.Generator().manual_seed(seed)
    total = sum(seqs)
    qkv = torch.randn(total, (HQ + 2 * HK) * D, generator=g)
    q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)
    q, k, v = q.unflatten(-1, (HQ, D)), k.unflatten(-1, (HK, D)), v.unflatten(-1, (HK, D))
    lens = torch.tensor(seqs, dtype=torch.int32)
    blocks = [-(-n // BLOCK) for n in seqs]
    offsets = torch.zeros(len(seqs), max(blocks), dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks):
        offsets[i, :n] = torch.arange(start, start + n)
        start += n
    meta = AttentionMetadata(is_decoding=False, block_offsets=offsets, q_start_loc=lens.cumsum(0) - lens,
                             q_seqlens=lens, kv_seqlens=lens, max_q_seqlen=max(seqs), max_kv_seqlen=max(seqs))
    caches = torch.zeros(start, BLOCK, HK, D), torch.zeros(start, BLOCK, HK, D)
    positions = torch.cat([torch.arange(n) for n in seqs])[None]
    cos, sin = build_rotary_embedding(D, base=10000.0)(q, positions)      # [1, T, D], as a port hands it on
    return (q, k, v), meta, caches, (cos, sin)


def _run(attn, seed=0):
    (q, k, v), meta, caches, rotary = _prefill(seed=seed)
    out = attn(q, k, v, *caches, meta, rotary_pos_emb=rotary)
    return out, caches


def _unfused_reference(seed=0):
    """Rotary as its own op, then plain attention over the same step."""
    (q, k, v), meta, caches, (cos, sin) = _prefill(seed=seed)
    q, k = apply_rotary_pos_emb(q, k, cos[0], sin[0])
    out = Attention(HQ, D, num_kv_heads=HK)(q, k, v, *caches, meta)
    return out, caches


def test_attention_with_rotary_equals_rotary_then_attention():
    out, (k_cache, _) = _run(Attention(HQ, D, num_kv_heads=HK))
    ref, (k_ref, _) = _unfused_reference()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=1e-6)   # the cache holds rotated keys


def test_fused_rotary_runs_in_the_cache_write(monkeypatch):
    """While nobody watches the rotary step, Attention does it inside the cache write (one launch)."""
    from lmdp import kernels
    called = []
    monkeypatch.setattr(kernels, 'apply_rotary_pos_emb', lambda *a, **kw: called.append('rotary'))
    real = kernels.rotary_fill_kv_cache
    monkeypatch.setattr(kernels, 'rotary_fill_kv_cache', lambda *a: called.append('fused') or real(*a))
    _run(Attention(HQ, D, num_kv_heads=HK))
    assert called == ['fused']


def test_a_hook_on_the_rotary_step_sees_rotated_q_and_k():
    attn = Attention(HQ, D, num_kv_heads=HK)
    seen = {}
    attn.rotary.register_forward_hook(lambda m, args, out: seen.update(q=out[0].clone(), k=out[1].clone()))
    out, _ = _run(attn)
    (q, k, _), _, _, (cos, sin) = _prefill()
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos[0], sin[0])
    torch.testing.assert_close(seen['q'], q_rot, rtol=0, atol=0)
    torch.testing.assert_close(seen['k'], k_rot, rtol=0, atol=0)
    torch.testing.assert_close(out, _unfused_reference()[0], rtol=0, atol=1e-6)


class _NegatedRotary(nn.Module):
    """A stand-in rotation (by -theta): what a port's own rotary module would be; it declares no fusion."""

    def forward(self, q, k, cos, sin, inplace=True):
        return ApplyRotaryEmb()(q, k, cos, -sin, inplace=inplace)


def test_a_replaced_rotary_is_called_not_fused_away():
    out, _ = _run(Attention(HQ, D, num_kv_heads=HK, rotary=_NegatedRotary()))
    ref, _ = _unfused_reference()
    assert (out - ref).abs().max() > 1e-2
    attn = Attention(HQ, D, num_kv_heads=HK)
    attn.rotary = _NegatedRotary()            # replacing the child after construction works the same
    torch.testing.assert_close(_run(attn)[0], out, rtol=0, atol=0)


def test_attention_takes_cos_sin_as_rows_or_with_a_batch_dim():
    (q, k, v), meta, caches, (cos, sin) = _prefill()
    ref = Attention(HQ, D, num_kv_heads=HK)(q.clone(), k.clone(), v, *caches, meta, rotary_pos_emb=(cos, sin))
    caches = tuple(torch.zeros_like(c) for c in caches)
    out = Attention(HQ, D, num_kv_heads=HK)(q.clone(), k.clone(), v, *caches, meta, rotary_pos_emb=(cos[0], sin[0]))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --- GatedMLP ---


def _mlp(act='silu', seed=0, hidden=16, inter=24):
    torch.manual_seed(seed)
    mlp = GatedMLP(hidden, inter, act=act, is_tp=False)
    for p in mlp.parameters():
        load_weight(p, torch.randn(p.shape) / p.shape[-1] ** 0.5)
    return mlp


@pytest.mark.parametrize('act', ['silu', 'gelu', 'gelu_pytorch_tanh'])
def test_gated_mlp_is_gate_up_act_down(act):
    mlp = _mlp(act)
    x = torch.randn(7, 16)
    gate, up = (x @ mlp.gate_up_proj.weight.T).chunk(2, -1)
    f = {'silu': torch.nn.functional.silu, 'gelu': torch.nn.functional.gelu,
         'gelu_pytorch_tanh': lambda t: torch.nn.functional.gelu(t, approximate='tanh')}[act]
    torch.testing.assert_close(mlp(x), (f(gate) * up) @ mlp.down_proj.weight.T)


def test_gated_mlp_fuses_its_activation_unless_watched(monkeypatch):
    from lmdp import kernels
    mlp, x = _mlp(), torch.randn(3, 16)
    calls = []
    real = kernels.act_and_mul_linear
    monkeypatch.setattr(kernels, 'act_and_mul_linear', lambda *a: calls.append('fused') or real(*a))
    fused = mlp(x)
    assert calls == ['fused']
    seen = []
    mlp.act_fn.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    watched = mlp(x)
    assert calls == ['fused'] and len(seen) == 1 and seen[0].shape == (3, 24)
    torch.testing.assert_close(watched, fused)


def test_a_replacement_activation_needs_no_fusion_name():
    """Any module taking [.., 2I] to [.., I] serves (the issue: one without `fused_name` raised AttributeError)."""

    class ReluAndMul(nn.Module):
        def forward(self, x):
            gate, up = x.chunk(2, -1)
            return torch.relu(gate) * up

    mlp, x = _mlp(), torch.randn(3, 16)
    silu_out = mlp(x)
    mlp.act_fn = ReluAndMul()
    gate, up = (x @ mlp.gate_up_proj.weight.T).chunk(2, -1)
    torch.testing.assert_close(mlp(x), (torch.relu(gate) * up) @ mlp.down_proj.weight.T)
    assert not torch.allclose(mlp(x), silu_out)


def test_gated_mlp_refuses_an_unknown_activation_name():
    with pytest.raises(ValueError, match="'swiglu_oops'.*act_fn"):
        GatedMLP(8, 8, act='swiglu_oops')


def test_silu_and_mul_keeps_lmdeploys_signature():
    assert SiluAndMul(inplace=True).fused_name == 'silu'


def test_a_subclass_overriding_forward_is_called_not_fused_away():
    """Subclassing ApplyRotaryEmb / SiluAndMul to change the math must not be skipped for the base's kernel."""

    class NegatedRotary(ApplyRotaryEmb):
        def forward(self, q, k, cos, sin, inplace=True):
            return super().forward(q, k, cos, -sin, inplace=inplace)

    torch.testing.assert_close(_run(Attention(HQ, D, num_kv_heads=HK, rotary=NegatedRotary()))[0],
                               _run(Attention(HQ, D, num_kv_heads=HK, rotary=_NegatedRotary()))[0], rtol=0, atol=0)

    class DoubledSilu(SiluAndMul):
        def forward(self, x):
            return 2 * super().forward(x)

    mlp, x = _mlp(), torch.randn(3, 16)
    plain = mlp(x)
    mlp.act_fn = DoubledSilu()
    torch.testing.assert_close(mlp(x), 2 * plain)
