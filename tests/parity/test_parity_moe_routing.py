"""A mixture of experts in bfloat16 against transformers: a correct port whose routers flip near ties passes (the
whole-model checks forgive the positions after such a flip, saying so), and planted router and expert bugs still
fail. On the CPU in CI (the port's torch references); the same on CUDA (Triton fused-MoE) in tests marked gpu."""
import pytest
import torch

import parity
from lmdp.models.qwen3_moe import Qwen3MoeForCausalLM

# The tiny qwen3_moe preset, one 5-token prompt (seed 0) in bfloat16: transformers' float32 routes prompt 0's
# token 2 to another expert of layer 1 than lmdp's bfloat16 does, by a margin far inside bfloat16's rounding, and
# that one token alone puts the prefill KL over its bound (3.5e-3 nats against 1.1e-3) before routing was
# accounted for. If a change of torch's rounding ever moves that tie, `_near_tie_seed` below says so.
SEED, PROMPTS, DECODE_STEPS = 0, 1, 2
SPARSE_LAYER = 1


def _with_layer(port, name, edit):
    """A subclass of `port` whose load_weights ends by editing one sparse layer's MoE block: a planted bug."""

    def load_weights(self, weights):
        port.load_weights(self, weights)
        with torch.no_grad():
            edit(self.model.layers[SPARSE_LAYER].mlp)
    return type(name, (port, ), {'load_weights': load_weights})


def _roll_router(mlp):          # the router's rows read in another expert order (a mis-mapped checkpoint)
    mlp.gate.weight.copy_(mlp.gate.weight.roll(1, dims=0))


def _scale_router_row(mlp):     # one expert's router row 1.5x (a stray scale on one row)
    mlp.gate.weight[0].mul_(1.5)


def _scale_experts(mlp):        # every expert's down projection 1.02x: the experts, not the router
    mlp.experts.down.weight.mul_(1.02)


# bugs that change the MoE block's output at layer 1 without relabelling experts: the local MLP tap names them
MLP_BUGS = {'router_row_scaled': _scale_router_row, 'experts_scaled': _scale_experts}


@pytest.fixture(scope='module')
def tiny_qwen3_moe(tmp_path_factory):
    from lmdp.tiny import make_tiny
    return str(make_tiny('qwen3_moe', tmp_path_factory.mktemp('moe') / 'qwen3_moe'))


@pytest.fixture(scope='module')
def moe_references():
    cache = {}

    def get(path, device):
        if device not in cache:
            cache[device] = parity.run_references(path, dtype='bfloat16', device=device, prompts=PROMPTS,
                                                  decode_steps=DECODE_STEPS, seed=SEED)
        return cache[device]
    return get


def _devices():
    return ['cpu', pytest.param('cuda', marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason='needs CUDA')])]


def _compare(path, refs, port=None):
    return parity.compare(path, references=refs, custom_module_map={'Qwen3MoeForCausalLM': port} if port else None)


def _routing_forgiven(report):
    return [c for c in report.checks if c.data.get('routing_forgiven') or any(
        'router flip near a tie' in n and 'NOT' not in n for n in c.data.get('notes', []))]


@pytest.mark.parametrize('device', _devices())
def test_a_correct_port_with_near_tie_router_flips_passes(tiny_qwen3_moe, moe_references, device):
    report = _compare(tiny_qwen3_moe, moe_references(tiny_qwen3_moe, device))
    assert report.passed, report.summary()
    assert report.check('routing', 'prefill').passed and report.check('routing', 'decode').passed
    if device != 'cpu':
        return       # which tokens tie depends on the kernels: on the GPU, passing is the claim
    forgiven = _routing_forgiven(report)
    kl = report.check('logprob_kl', 'prefill')
    assert kl in forgiven, _near_tie_seed(report)
    # the false failure this guards against: over all positions the KL is over its bound
    assert kl.data['mean_kl'] > kl.data['bound_all_positions'], report.summary()
    assert 'router flip near a tie' in kl.detail and 'forgiven' in kl.detail


def _near_tie_seed(report) -> str:
    return ('this seed no longer has a near-tie router flip that breaks a whole-model check; find one with '
            "parity.compare(tiny qwen3_moe, dtype='bfloat16', device='cpu', prompts=1, seed=N) and update SEED\n"
            + report.summary())


@pytest.mark.parametrize('device', _devices())
def test_a_wrong_router_still_fails_as_hard_flips(tiny_qwen3_moe, moe_references, device):
    port = _with_layer(Qwen3MoeForCausalLM, 'RolledRouterPort', _roll_router)
    report = _compare(tiny_qwen3_moe, moe_references(tiny_qwen3_moe, device), port)
    assert not report.passed
    routing = report.check('routing', 'prefill')
    assert routing.status == 'failed' and routing.data['first_hard']['layer'] == SPARSE_LAYER, report.summary()
    assert f'HARD flip(s), first at layer {SPARSE_LAYER}' in routing.detail
    assert report.first_divergence.tap == f'layers.{SPARSE_LAYER}.mlp', report.summary()


@pytest.mark.parametrize('bug', sorted(MLP_BUGS))
@pytest.mark.parametrize('device', _devices())
def test_a_wrong_router_row_or_expert_still_fails_at_its_mlp(tiny_qwen3_moe, moe_references, device, bug):
    """Routing forgiveness never touches the taps: a scaled router row (the same experts, other weights on this
    prompt) or scaled experts fail at the layer's local MLP tap."""
    port = _with_layer(Qwen3MoeForCausalLM, f'{bug}_port', MLP_BUGS[bug])
    report = _compare(tiny_qwen3_moe, moe_references(tiny_qwen3_moe, device), port)
    assert not report.passed
    assert report.first_divergence.tap == f'layers.{SPARSE_LAYER}.mlp', report.summary()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('prompts', [1, 3])
@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('family', ['mixtral', 'qwen2_moe', 'qwen3_moe'])
def test_moe_ports_pass_in_bfloat16_over_seeds(tmp_path_factory, family, seed, prompts):
    """No false failures from routing on the Triton fused-MoE path: every MoE port, three prompt seeds."""
    from lmdp.tiny import make_tiny
    path = make_tiny(family, tmp_path_factory.mktemp(f'{family}-{seed}-{prompts}') / family)
    report = parity.compare(str(path), dtype='bfloat16', device='cuda', prompts=prompts, seed=seed)
    assert report.passed, report.summary()
