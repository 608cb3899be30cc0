"""`lmdp.nn.moe`: the router and fused experts against transformers' own MoE blocks, loading per-expert checkpoint
tensors into stacked parameters with coverage per (expert, shard), tensor-parallel slices, and the builder's
refusals."""
import pytest
import torch

from lmdp.errors import WeightLoadError
from lmdp.kernels import moe as ref
from lmdp.nn import FusedMoE, SharedExpertGate, SoftmaxTopK, build_fused_moe
from lmdp.nn.moe import expert_params_mapping
from lmdp.weight_loader import load_model_weights, load_weight

H, INTER, E, K = 16, 12, 6, 2


def _hf_block(model_type, **cfg):
    from transformers import AutoConfig
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.qwen2_moe import modeling_qwen2_moe
    from transformers.models.qwen3_moe import modeling_qwen3_moe
    config = AutoConfig.for_model(model_type, hidden_size=H, moe_intermediate_size=INTER, intermediate_size=INTER,
                                  num_experts=E, num_local_experts=E, num_experts_per_tok=K,
                                  shared_expert_intermediate_size=20, **cfg)
    cls = {'mixtral': modeling_mixtral.MixtralSparseMoeBlock, 'qwen2_moe': modeling_qwen2_moe.Qwen2MoeSparseMoeBlock,
           'qwen3_moe': modeling_qwen3_moe.Qwen3MoeSparseMoeBlock}[model_type]
    block = cls(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return block


class _Block(torch.nn.Module):
    """The MoE block a port writes, loading transformers' per-expert names."""

    def __init__(self, renormalize, shared=False):
        super().__init__()
        from lmdp.nn import build_merged_colwise_linear, build_rowwise_linear
        self.gate = build_rowwise_linear(H, E, bias=False, is_tp=False)
        self.softmax_topk = SoftmaxTopK(K)
        self.experts = build_fused_moe(H, INTER, E, K, renormalize=renormalize, all_reduce=False)
        self.expert_params_mapping = expert_params_mapping(E)
        if shared:
            self.shared_gate_up = build_merged_colwise_linear(H, [20, 20], bias=False)
            self.shared_down = build_rowwise_linear(20, H, bias=False)
            self.shared_expert_gate = SharedExpertGate(H)

    def forward(self, x):
        weights, ids = self.softmax_topk(self.gate(x))
        out = self.experts(x, weights, ids)
        if hasattr(self, 'shared_expert_gate'):
            out = out + self.shared_expert_gate(x, self.shared_down(self.shared_gate_up(x), act='silu'))
        return out

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        renames = [('.shared_expert.gate_proj', '.shared_gate_up', 0), ('.shared_expert.up_proj', '.shared_gate_up', 1),
                   ('.shared_expert.down_proj', '.shared_down', None)]
        for name, tensor in weights:
            name = '.' + name
            for param_part, ckpt_part, expert_id, shard_id in self.expert_params_mapping:
                if ckpt_part + '.' in name:
                    load_weight(params[name.replace(ckpt_part, param_part)[1:]], tensor, expert_id=expert_id,
                                shard_id=shard_id)
                    break
            else:
                for ckpt_part, param_part, shard_id in renames:
                    if ckpt_part in name:
                        kw = {} if shard_id is None else dict(shard_id=shard_id)
                        load_weight(params[name.replace(ckpt_part, param_part)[1:]], tensor, **kw)
                        break
                else:
                    load_weight(params[name[1:]], tensor)


def _per_expert_state(block):
    """transformers' checkpoint names (per expert, as save_pretrained writes them) for one MoE block."""
    state = {}
    for name, p in block.named_parameters():
        if name == 'experts.gate_up_proj':
            for e in range(E):
                state[f'experts.{e}.gate_proj.weight'] = p[e, :INTER].clone()
                state[f'experts.{e}.up_proj.weight'] = p[e, INTER:].clone()
        elif name == 'experts.down_proj':
            for e in range(E):
                state[f'experts.{e}.down_proj.weight'] = p[e].clone()
        else:
            state[name if name.endswith('weight') else name + '.weight'] = p.detach().clone()
    return state


@pytest.mark.parametrize('model_type,cfg,renormalize,shared', [
    ('qwen3_moe', dict(norm_topk_prob=True), True, False),
    ('qwen3_moe', dict(norm_topk_prob=False), False, False),
    ('mixtral', {}, True, False),
    ('qwen2_moe', dict(norm_topk_prob=False), False, True),
])
def test_block_matches_transformers(model_type, cfg, renormalize, shared):
    hf = _hf_block(model_type, **cfg)
    block = _Block(renormalize, shared)
    load_model_weights(block, weights=list(_per_expert_state(hf).items()))
    x = torch.randn(1, 9, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(x)
        want = want[0] if isinstance(want, tuple) else want
        got = block(x[0])
    torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)
    # the flag is what makes Qwen3 and Mixtral differ: the other setting must not pass
    block.experts.renormalize = not renormalize
    assert not torch.allclose(block(x[0]), want[0], atol=1e-3)


def _expert_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {e: dict(gate_proj=torch.randn(INTER, H, generator=g), up_proj=torch.randn(INTER, H, generator=g),
                    down_proj=torch.randn(H, INTER, generator=g)) for e in range(E)}


class _Experts(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.experts = FusedMoE(H, INTER, E, K, **kw)
        self.expert_params_mapping = expert_params_mapping(E)

    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, tensor in weights:
            for param_part, ckpt_part, expert_id, shard_id in self.expert_params_mapping:
                if ckpt_part + '.' in '.' + name:
                    load_weight(params[('.' + name).replace(ckpt_part, param_part)[1:]], tensor, expert_id=expert_id,
                                shard_id=shard_id)
                    break


def _names(tensors, drop=()):
    return [(f'experts.{e}.{k}.weight', t) for e, d in tensors.items() for k, t in d.items() if (e, k) not in drop]


def test_per_expert_tensors_land_in_their_rows():
    tensors = _expert_tensors()
    m = _Experts()
    load_model_weights(m, weights=_names(tensors))
    for e, d in tensors.items():
        assert torch.equal(m.experts.gate_up.weight[e, :INTER], d['gate_proj'])
        assert torch.equal(m.experts.gate_up.weight[e, INTER:], d['up_proj'])
        assert torch.equal(m.experts.down.weight[e], d['down_proj'])


def test_all_experts_tensor_loads_like_the_per_expert_ones():
    tensors = _expert_tensors()
    m = _Experts()
    gate_up = torch.stack([torch.cat([d['gate_proj'], d['up_proj']]) for d in tensors.values()])
    down = torch.stack([d['down_proj'] for d in tensors.values()])

    class Fused(_Experts):
        def load_weights(self, weights):
            for name, tensor in weights:
                param = self.experts.gate_up.weight if 'gate_up' in name else self.experts.down.weight
                load_weight(param, tensor, expert_id=None, shard_id='gate_up' if 'gate_up' in name else 'down')
    f = Fused()
    load_model_weights(f, weights=[('experts.gate_up_proj', gate_up), ('experts.down_proj', down)])
    load_model_weights(m, weights=_names(tensors))
    assert torch.equal(f.experts.gate_up.weight, m.experts.gate_up.weight)
    assert torch.equal(f.experts.down.weight, m.experts.down.weight)


def test_missing_expert_shards_are_named_by_expert():
    m = _Experts()
    with pytest.raises(WeightLoadError) as err:
        load_model_weights(m, weights=_names(_expert_tensors(), drop={(3, 'up_proj'), (4, 'up_proj'),
                                                                      (1, 'down_proj')}))
    text = str(err.value)
    assert "experts.gate_up.weight [shard 'up' of 2 experts: 3-4]" in text
    assert "experts.down.weight [shard (1, 'down')]" in text
    assert "'gate'" not in text


def test_loader_errors_name_the_parameter_expert_and_shard():
    m = _Experts()
    param = m.experts.gate_up.weight
    with pytest.raises(WeightLoadError, match=r"expects shape \(12, 16\).*\(11, 16\)"):
        load_model_weights(m, weights=[('experts.2.gate_proj.weight', torch.randn(INTER - 1, H))], strict=False)
    with pytest.raises(WeightLoadError, match=r"expert_id 6 is not one of its 6 experts"):
        load_weight(param, torch.randn(INTER, H), expert_id=6, shard_id='gate')
    with pytest.raises(WeightLoadError, match=r"unknown shard 'down'.*\['gate', 'up', 'gate_up'\]"):
        load_weight(param, torch.randn(INTER, H), expert_id=0, shard_id='down')


def test_forward_is_the_reference_op_and_checks_top_k():
    m = _Experts(renormalize=True)
    load_model_weights(m, weights=_names(_expert_tensors()))
    x = torch.randn(7, H)
    weights, ids = ref.softmax_topk(torch.randn(7, E), K)
    want = ref.fused_moe(x, m.experts.gate_up.weight, m.experts.down.weight, weights, ids, renormalize=True)
    torch.testing.assert_close(m.experts(x, weights, ids), want)
    with pytest.raises(ValueError, match='built for top_k=2 but got 3'):
        m.experts(x, *ref.softmax_topk(torch.randn(7, E), 3))


def test_tensor_parallel_ranks_sum_to_the_whole(monkeypatch):
    """Each of two ranks holds half of every expert's intermediate size; their partial outputs sum to the
    unsplit layer's."""
    import lmdp.nn.moe as nn_moe
    tensors = _expert_tensors()
    whole = _Experts()
    load_model_weights(whole, weights=_names(tensors))
    x = torch.randn(5, H)
    weights, ids = ref.softmax_topk(torch.randn(5, E), K)
    parts = []
    for rank in range(2):
        monkeypatch.setattr(nn_moe, 'get_tp_world_rank', lambda rank=rank: (2, rank))
        m = _Experts(all_reduce=False)
        assert m.experts.gate_up.weight.shape == (E, INTER, H) and m.experts.down.weight.shape == (E, H, INTER // 2)
        load_model_weights(m, weights=_names(tensors))
        assert torch.equal(m.experts.gate_up.weight[1, :INTER // 2], tensors[1]['gate_proj'][rank * 6:(rank + 1) * 6])
        parts.append(m.experts(x, weights, ids))
    torch.testing.assert_close(parts[0] + parts[1], whole.experts(x, weights, ids), atol=1e-5, rtol=1e-5)


def test_builder_refuses_what_it_cannot_build():
    from lmdp.errors import ConfigError
    with pytest.raises(ConfigError, match='per-tensor FP8'):     # FP8 without block scales
        build_fused_moe(H, INTER, E, K, quant_config={'quant_method': 'fp8'})
    fp8 = build_fused_moe(H, INTER, E, K, quant_config={'quant_method': 'fp8', 'weight_block_size': [128, 128]})
    assert fp8.gate_up.weight.dtype == torch.float8_e4m3fn and fp8.down.weight_scale_inv.dtype == torch.float32
    with pytest.raises(NotImplementedError, match='expert parallelism'):
        build_fused_moe(H, INTER, E, K, enable_ep=True)
    with pytest.raises(TypeError, match='hidden_act name'):
        build_fused_moe(H, INTER, E, K, act_func=torch.nn.functional.silu)
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        build_fused_moe(H, INTER, E, K, act='relu')
    with pytest.raises(TypeError, match='renormalise'):
        build_fused_moe(H, INTER, E, K, renormalise=True)     # a misspelt keyword is not swallowed
    with pytest.raises(NotImplementedError, match='group-limited'):
        SoftmaxTopK(2, n_groups=8)
    assert build_fused_moe(H, INTER, E, K, act_func='gelu_pytorch_tanh').act == 'gelu_tanh'


def test_shared_expert_gate_is_a_sigmoid_scalar_per_token():
    gate = SharedExpertGate(H)
    with torch.no_grad():
        gate.weight.normal_()
    x, y = torch.randn(4, H), torch.randn(4, H)
    torch.testing.assert_close(gate(x, y), torch.sigmoid(x @ gate.weight.t()) * y)
