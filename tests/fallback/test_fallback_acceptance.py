"""Acceptance of the transformers fallback: decoder families transformers ships, none through an lmdp port.

Each family's tiny random checkpoint (written by transformers itself, `lmdp.tiny`) is served by `pipeline()` on its
transformers modeling code with lmdp's paged attention: prompts packed in one step, blocks handed out shuffled,
a prompt longer than the prefill budget (chunked prefill), a pool too small for all requests (preemption and
recompute), prompts that share a prefix (prefix caching). Greedy outputs must equal transformers' `generate`, and
the parity harness must pass in float32 on the CPU. Families that do have a port run with model_impl='transformers'.
Architectures the fallback cannot serve are refused, with the reason, by `lmdp check` and `pipeline()`.
"""
import json
import os

import pytest
import torch

from lmdp import GenerationConfig, PytorchEngineConfig, pipeline
from lmdp.errors import ArchitectureError
from lmdp.fallback import TransformersForCausalLM, choose_model_class
from lmdp.models.module_map import MODULE_MAP
from lmdp.paging import BlockManager
from lmdp.tiny import FALLBACK_FAMILIES

# the unported families, then ported ones run on the fallback (per-layer sliding windows, softcaps, query scale,
# Qwen2-MoE's shared expert)
FAMILIES = sorted(FALLBACK_FAMILIES) + ['gemma2', 'qwen2', 'llama', 'mixtral', 'qwen2_moe']
MOE = {'olmoe', 'granitemoe'}
BLOCK, NEW = 8, 6


@pytest.fixture(scope='module')
def checkpoints(tiny_fallback):
    return {mt: tiny_fallback(mt) for mt in FAMILIES}


def _arch(path):
    with open(os.path.join(path, 'config.json')) as f:
        return json.load(f)['architectures'][0]


def _prompts():
    """Token-id prompts: three share a 20-token head (prefix caching), one is longer than the prefill budget."""
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(7, 500, (n,), generator=g).tolist()  # noqa: E731 (no special ids)
    head = rand(20)
    return [head + rand(5), rand(3), head + rand(11), rand(40), head + rand(2), rand(13)]


@torch.no_grad()
def _generate(path, prompts, n):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation='eager').eval()
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
        out.append(gen[0, len(p):].tolist())
    return out


def _shuffle_blocks(pipe, seed=0):
    """Hand the engine's blocks out in a shuffled order (block tables are then never contiguous)."""
    engine = pipe.engine
    old = engine.block_manager
    engine.block_manager = engine.scheduler.block_manager = BlockManager(
        old.num_blocks, old.block_size, old.enable_prefix_caching, shuffle_seed=seed)


@pytest.mark.parametrize('model_type', FAMILIES)
def test_pipeline_greedy_equals_transformers_generate(model_type, checkpoints):
    path = checkpoints[model_type]
    prompts = _prompts()
    need = sum(-(-(len(p) + NEW) // BLOCK) for p in prompts)
    config = PytorchEngineConfig(device_type='cpu', dtype='float32', block_size=BLOCK, num_gpu_blocks=need // 2,
                                 session_len=64, max_prefill_token_num=16, enable_prefix_caching=True,
                                 model_impl='transformers')
    pipe = pipeline(path, backend_config=config)
    assert isinstance(pipe.engine.agent.model, TransformersForCausalLM)
    _shuffle_blocks(pipe)
    got = pipe(prompts, GenerationConfig(max_new_tokens=NEW, min_new_tokens=NEW))
    expected = _generate(path, prompts, NEW)
    assert [r.token_ids for r in got] == expected
    engine = pipe.engine
    assert engine.scheduler.num_preemptions > 0, 'the pool was not tight enough to preempt'
    assert engine.block_manager.stats.hit_blocks > 0, 'no prefix-cache hit'
    assert engine.stats.prefill_steps > 2, 'prompts were not packed and chunked over several steps'
    assert engine.block_manager.num_used == 0


@pytest.mark.parametrize('model_type', FAMILIES)
def test_parity_passes_in_float32(model_type, checkpoints):
    import parity
    path = checkpoints[model_type]
    report = parity.compare(path, dtype='float32', device='cpu', prompts=3, decode_steps=3,
                            custom_module_map={_arch(path): TransformersForCausalLM})
    assert report.passed, report.summary()
    assert report.check('weight_coverage').status == 'passed'
    # the taps were read from the fallback's own modules, not skipped
    assert all(t.port is not None for t in report.main_taps)


def test_unported_families_fall_back_under_auto_and_say_so(checkpoints, caplog):
    from lmdp.hf_config import load_hf_config
    unported = [mt for mt in FALLBACK_FAMILIES if _arch(checkpoints[mt]) not in MODULE_MAP]
    assert len(unported) >= 8 and MOE <= set(unported)
    for mt in unported:
        choice = choose_model_class(load_hf_config(checkpoints[mt]))
        assert choice.impl == 'transformers' and 'no lmdp port' in choice.reason
    with caplog.at_level('WARNING', logger='lmdp'):
        pipe = pipeline(checkpoints['olmo2'], backend_config=PytorchEngineConfig(device_type='cpu', dtype='float32'))
    assert isinstance(pipe.engine.agent.model, TransformersForCausalLM)
    assert any('Olmo2ForCausalLM has no lmdp port' in r.getMessage() for r in caplog.records)
    with pytest.raises(ArchitectureError, match='not registered'):
        pipeline(checkpoints['olmo2'], backend_config=PytorchEngineConfig(device_type='cpu', model_impl='lmdp'))


# -- refusals ----------------------------------------------------------------------------------------------------

REFUSED = {
    # model_type: (config overrides, words the reason must contain)
    'mamba': (dict(hidden_size=32, num_hidden_layers=2, vocab_size=512), 'recurrent state'),
    'gpt_oss': (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     num_local_experts=4, vocab_size=512), 'attention sinks'),
    'bloom': (dict(hidden_size=32, n_layer=2, n_head=4, vocab_size=512), "not through transformers' attention"),
    # LongRoPE without a port (Phi-3 has one now: lmdp.models.phi3)
    'phimoe': (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                    rope_scaling={'rope_type': 'longrope', 'short_factor': [1.0] * 4, 'long_factor': [2.0] * 4,
                                  'short_mscale': 1.0, 'long_mscale': 1.0, 'original_max_position_embeddings': 64}),
               'LongRoPE'),
}


@pytest.fixture(scope='module')
def refused(tmp_path_factory):
    from transformers import AutoConfig

    from lmdp import tiny_tokenizer
    out = {}
    for mt, (overrides, _) in REFUSED.items():
        d = tmp_path_factory.mktemp(mt)
        cfg = AutoConfig.for_model(mt, **overrides)
        cfg.architectures = [f'{type(cfg).__name__.replace("Config", "")}ForCausalLM']
        cfg.save_pretrained(d)
        tiny_tokenizer.save_tokenizer(d)
        out[mt] = str(d)
    return out


@pytest.mark.parametrize('model_type', sorted(REFUSED))
def test_unservable_architectures_are_refused_with_the_reason(model_type, refused):
    from lmdp.check_env import check_model
    from lmdp.cli import main
    words = REFUSED[model_type][1]
    report = check_model(refused[model_type])
    assert not report.ok and report.model_impl is None
    assert any('transformers fallback cannot serve' in p and words in p for p in report.problems), report.problems
    with pytest.raises(ArchitectureError, match=words):
        pipeline(refused[model_type], backend_config=PytorchEngineConfig(device_type='cpu'))
    assert main(['check', refused[model_type]]) == 1
