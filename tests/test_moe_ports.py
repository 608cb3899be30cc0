"""The Mixtral, Qwen2-MoE and Qwen3-MoE ports against transformers (float32, CPU), on their tiny presets: parity
of every tap and whole-model check, the harness's planted bugs mixed into each port and one bug per family quirk,
the routers' choices, weight coverage per expert, and both checkpoint layouts of the experts."""
import pytest
import torch
from test_ports_parity import GENERIC

import parity
from lmdp.models import get_model_class
from lmdp.models.mixtral import MixtralForCausalLM
from lmdp.models.qwen2_moe import Qwen2MoeForCausalLM
from lmdp.models.qwen3_moe import Qwen3MoeForCausalLM
from parity.routing import routing_parity

PORTS = {'mixtral': MixtralForCausalLM, 'qwen2_moe': Qwen2MoeForCausalLM, 'qwen3_moe': Qwen3MoeForCausalLM}
FAMILIES = {family: port.__name__ for family, port in PORTS.items()}


@pytest.fixture(scope='module')
def tiny_moe(tmp_path_factory):
    from lmdp.tiny import make_tiny
    root = tmp_path_factory.mktemp('tiny_moe')
    return {family: str(make_tiny(family, root / family)) for family in FAMILIES}


@pytest.fixture(scope='module')
def references(tiny_moe):
    """family -> transformers' float32 run on the default prompts (5, 17 and 64 tokens: past Mixtral's 32-token
    window), 3 decode steps; computed once, shared by every port and planted bug of the family."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = parity.run_references(tiny_moe[family], device='cpu', decode_steps=3)
        return cache[family]
    return get


def _compare(tiny_moe, references, family, port=None):
    return parity.compare(tiny_moe[family], references=references(family),
                          custom_module_map={FAMILIES[family]: port} if port else None)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_moe_port_passes_parity(tiny_moe, references, family):
    report = _compare(tiny_moe, references, family)
    assert report.passed, report.summary()
    assert report.port_class.endswith(FAMILIES[family])
    assert get_model_class(report_config(tiny_moe[family])).__name__ == FAMILIES[family]


def report_config(path):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path)


@pytest.mark.parametrize('family,bug,phase,layer', [
    pytest.param(family, bug, phase, layer, id=f'{family}-{name}')
    for family in sorted(FAMILIES) for name, bug, phase, layer in GENERIC])
def test_the_harness_planted_bugs_are_named_in_each_moe_port(tiny_moe, references, family, bug, phase, layer):
    port = type(f'{bug.__name__}{FAMILIES[family]}', (bug, PORTS[family]), {})
    report = _compare(tiny_moe, references, family, port)
    first = report.first_divergence
    assert not report.passed and first is not None, report.summary()
    assert (first.phase, first.layer) == (phase, layer), report.summary()


def _planted(monkeypatch, family):
    """Break one quirk of the family's port; returns the tap that must fail first."""
    if family == 'qwen3_moe':      # ignore norm_topk_prob
        from lmdp.models import qwen3_moe
        init = qwen3_moe.Qwen3MoeSparseMoeBlock.__init__

        def no_renorm(self, *a, **kw):
            init(self, *a, **kw)
            self.experts.renormalize = False
        monkeypatch.setattr(qwen3_moe.Qwen3MoeSparseMoeBlock, '__init__', no_renorm)
    elif family == 'qwen2_moe':    # drop the shared expert's sigmoid gate
        from lmdp.nn import moe
        monkeypatch.setattr(moe.SharedExpertGate, 'forward', lambda self, x, shared: shared)
    else:                          # Mixtral's w1 (gate) and w3 (up) read the other way round
        from lmdp.models import mixtral
        monkeypatch.setattr(mixtral.MixtralForCausalLM, 'expert_checkpoint_names', ('w3', 'w1', 'w2'))
    return 'layers.0.mlp'


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_planted_bug_in_a_quirk_fails_at_the_first_moe_layer(tiny_moe, references, family, monkeypatch):
    tap = _planted(monkeypatch, family)
    report = _compare(tiny_moe, references, family)
    assert not report.passed
    assert report.first_divergence.tap == tap, report.summary()


def test_routing_agrees_and_a_wrong_router_is_a_hard_flip(tiny_moe, monkeypatch):
    reports = routing_parity(tiny_moe['qwen3_moe'], prompts=2, decode_steps=2)
    for phase, report in reports.items():
        assert report.passed and set(report.agreement().values()) == {1.0}, report.summary()
    # layer 1's router reads its experts in another order: its choices flip with clear margins
    from lmdp.models import sparse_moe
    load = sparse_moe.MoeWeightsMixin.load_weights

    def permuted_router(self, weights):
        load(self, weights)
        gate = self.model.layers[1].mlp.gate.weight
        with torch.no_grad():
            gate.copy_(gate.roll(1, dims=0))
    monkeypatch.setattr(sparse_moe.MoeWeightsMixin, 'load_weights', permuted_router)
    report = routing_parity(tiny_moe['qwen3_moe'], prompts=2, decode_steps=0)['prefill']
    assert not report.passed
    assert report.agreement()[0] == 1.0 and report.agreement()[1] < 0.5
    assert report.first_hard_flip()[0] == 1


def test_transformers5_all_experts_layout_loads_the_same(tiny_moe, tmp_path):
    """A checkpoint holding each layer's experts in one `[E, 2I, H]` / `[E, H, I]` tensor (transformers 5's own
    parameters) loads into the same stacked weights as the per-expert one."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lmdp.engine import ModelAgent
    src = tiny_moe['qwen3_moe']
    tensors = load_file(f'{src}/model.safetensors')
    fused = {k: v for k, v in tensors.items() if '.experts.' not in k}
    config = report_config(src)
    for layer in range(config.num_hidden_layers):
        p = f'model.layers.{layer}.mlp.experts'
        n = config.num_experts
        fused[f'{p}.gate_up_proj'] = torch.stack([torch.cat([tensors[f'{p}.{e}.gate_proj.weight'],
                                                             tensors[f'{p}.{e}.up_proj.weight']]) for e in range(n)])
        fused[f'{p}.down_proj'] = torch.stack([tensors[f'{p}.{e}.down_proj.weight'] for e in range(n)])
    dst = tmp_path / 'fused'
    shutil.copytree(src, dst)
    save_file(fused, str(dst / 'model.safetensors'), metadata={'format': 'pt'})
    a = ModelAgent.from_pretrained(src, dtype='float32')
    b = ModelAgent.from_pretrained(str(dst), dtype='float32')
    assert b.load_report.complete
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_weight_coverage_accounts_for_every_expert_shard(tiny_moe, family):
    from lmdp.widgets.weight_coverage import coverage_of_checkpoint
    coverage = coverage_of_checkpoint(tiny_moe[family])
    assert coverage.ok, coverage.verdict()
    config = report_config(tiny_moe[family])
    experts = getattr(config, 'num_local_experts', None) or config.num_experts
    sparse = 2 if family == 'qwen2_moe' else 3            # qwen2_moe's preset keeps layer 2 dense
    assert sum('.experts.' in s.param for s in coverage.stacked) == sparse * experts * 3


def test_a_missing_expert_names_its_checkpoint_tensor(tiny_moe, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from lmdp.engine import ModelAgent
    from lmdp.errors import WeightLoadError
    dst = tmp_path / 'mixtral'
    shutil.copytree(tiny_moe['mixtral'], dst)
    tensors = load_file(str(dst / 'model.safetensors'))
    del tensors['model.layers.1.block_sparse_moe.experts.2.w3.weight']
    save_file(tensors, str(dst / 'model.safetensors'), metadata={'format': 'pt'})
    with pytest.raises(WeightLoadError) as err:
        ModelAgent.from_pretrained(str(dst), dtype='float32')
    text = str(err.value)
    assert "model.layers.1.mlp.experts.gate_up.weight [shard (2, 'up')]" in text
    assert "checkpoint tensor 'model.layers.1.block_sparse_moe.experts.2.w3.weight'" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('prompts', [1, 3])
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_bf16_parity_on_cuda(tiny_moe, family, prompts):
    """bfloat16 on the Triton kernels (one prompt: batch-1 decode on the MoE GEMV path; three: the grouped GEMM in
    prefill), CUDA-graph replay against eager included; the routers agree with transformers up to near ties."""
    report = parity.compare(tiny_moe[family], dtype='bfloat16', device='cuda', prompts=prompts)
    assert report.passed, report.summary()
    assert report.check('cuda_graph').passed, report.summary()
    for phase, routing in routing_parity(tiny_moe[family], dtype='bfloat16', device='cuda', prompts=prompts).items():
        assert routing.passed, routing.summary()
