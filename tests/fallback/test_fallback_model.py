"""The fallback model's contract pieces: the attention function's refusals, the KV-layout probe, the head, the
CUDA-graph verdict, and how model_impl picks the implementation."""
import pytest
import torch

from lmdp import PytorchEngineConfig
from lmdp.engine import ModelAgent, StepRunner
from lmdp.errors import ArchitectureError
from lmdp.fallback import TransformersForCausalLM, choose_model_class, cuda_graph_refusal
from lmdp.fallback.attention import PagedStep, paged_attention_forward, paged_step
from lmdp.fallback.support import kv_layout
from lmdp.hf_config import load_hf_config


class _Attn(torch.nn.Module):
    layer_idx = 0


def _qkv(heads=4, kv=2, t=3, d=8):
    return torch.randn(1, heads, t, d), torch.randn(1, kv, t, d), torch.randn(1, kv, t, d)


@pytest.mark.parametrize('kwarg, words', [('s_aux', 'attention sinks'), ('position_bias', 'position bias'),
                                          ('indices', 'sparse attention')])
def test_attention_refuses_what_the_kernels_do_not_compute(kwarg, words):
    q, k, v = _qkv()
    with paged_step(PagedStep([], None)), pytest.raises(NotImplementedError, match=f'{words}.*{kwarg}='):
        paged_attention_forward(_Attn(), q, k, v, None, scaling=0.1, **{kwarg: torch.zeros(4)})
    with paged_step(PagedStep([], None)), pytest.raises(NotImplementedError, match='bidirectional'):
        paged_attention_forward(_Attn(), q, k, v, None, scaling=0.1, is_causal=False)
    with pytest.raises(RuntimeError, match='outside an lmdp step'):
        paged_attention_forward(_Attn(), q, k, v, None, scaling=0.1)


def test_the_probe_sizes_the_cache_by_what_attention_produces(tiny_fallback):
    # transformers keeps a num_key_value_heads the GPT-NeoX code never reads: the config says 2, attention makes 4
    path = tiny_fallback('gpt_neox')
    assert kv_layout(load_hf_config(path))[0] == 2
    agent = ModelAgent.from_pretrained(path, dtype='float32')
    assert agent.model_config.num_key_value_heads == 4
    runner = StepRunner(agent, num_blocks=16, block_size=8)
    tokens, _ = runner.generate_greedy([[5, 9, 11, 40, 7]], 3)
    assert len(tokens[0]) == 3


def test_a_layer_whose_attention_skips_the_interface_is_refused(tiny_fallback):
    path = tiny_fallback('olmo2')
    agent = ModelAgent.from_pretrained(path, dtype='float32')
    model = agent.model
    attn = model.model.layers[1].self_attn
    attn.forward = lambda hidden_states, *a, **k: (hidden_states, None)   # attention computed "by itself"
    with pytest.raises(ArchitectureError, match=r'layer\(s\) \[1\] does not go through'):
        model._probe_kv_layout(model.hf_model.config)
    runner = StepRunner(agent, num_blocks=16, block_size=8)
    with pytest.raises(RuntimeError, match=r'layer\(s\) \[1\] never reached'):
        runner.prefill([[5, 9, 11]])


def test_logits_come_from_the_causal_lm_forward_and_leave_it_untouched(tiny_fallback):
    from transformers import AutoModelForCausalLM
    path = tiny_fallback('granite')     # logits_scaling divides the head's output
    agent = ModelAgent.from_pretrained(path, dtype='float32')
    hidden = torch.randn(5, agent.model_config.hidden_size)
    logits = agent.get_logits(hidden)
    head = agent.model.hf_model.get_output_embeddings()
    scaling = agent.model.hf_model.config.logits_scaling
    assert scaling != 1 and torch.allclose(logits, head(hidden) / scaling)
    assert 'forward' not in vars(agent.model.base_model)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 11, 40]])
    runner = StepRunner(agent, num_blocks=8, block_size=8)
    with torch.no_grad():
        assert torch.allclose(runner.prefill([ids[0].tolist()], all_logits=True).all_logits[0], ref(ids).logits[0],
                              atol=1e-5)


def test_cuda_graph_verdict_follows_transformers_own_flag(tiny_fallback, monkeypatch):
    from transformers import OlmoeForCausalLM
    path = tiny_fallback('olmoe')
    config = load_hf_config(path)
    assert cuda_graph_refusal(config) is None
    monkeypatch.setattr(OlmoeForCausalLM, '_can_compile_fullgraph', False)
    why = cuda_graph_refusal(config)
    assert 'OlmoeForCausalLM' in why and '_can_compile_fullgraph' in why
    agent = ModelAgent.from_pretrained(path, dtype='float32')
    assert agent.model.support_cuda_graph is False and agent.model.cuda_graph_refusal == why
    from lmdp.widgets.graph_eligibility import graph_eligibility
    view = graph_eligibility(agent, batch_sizes=(1, 2))
    assert [r.reason for r in view.buckets] == [why, why] and not view.eligible


def test_model_impl_chooses_and_says_why(tiny_llama, tiny_fallback):
    from lmdp.check_env import check_model
    llama = load_hf_config(tiny_llama)
    assert choose_model_class(llama).impl == 'lmdp'
    forced = choose_model_class(llama, model_impl='transformers')
    assert forced.model_class is TransformersForCausalLM and "model_impl='transformers'" in forced.reason
    report = check_model(tiny_fallback('cohere'))
    assert report.ok and report.model_impl == 'transformers' and 'CohereForCausalLM has no lmdp port' in str(report)
    assert 'runs as        transformers fallback' in str(report)
    assert check_model(tiny_llama).model_impl == 'lmdp'
    assert check_model(tiny_llama, model_impl='transformers').model_impl == 'transformers'
    with pytest.raises(ValueError, match="model_impl must be one of 'auto', 'lmdp', 'transformers'"):
        PytorchEngineConfig(model_impl='hf')


def test_inputs_embeds_give_what_the_token_ids_give(tiny_fallback):
    from lmdp.engine import CacheEngine
    from lmdp.model_inputs import ModelInputs
    agent = ModelAgent.from_pretrained(tiny_fallback('phi'), dtype='float32')
    cache = CacheEngine(agent.model_config, num_blocks=4, block_size=8)
    other = ModelInputs.make([[6, 1, 12, 41, 8], [4, 9]], [0, 0], [[0], [1]], is_decoding=False)
    by_ids = agent.forward(other, cache.kv_caches)
    # the step's token ids say one thing, its embeddings another: the embeddings win
    inputs = ModelInputs.make([[5, 9, 11, 40, 7], [3, 8]], [0, 0], [[0], [1]], is_decoding=False)
    inputs.inputs_embeds = agent.model.get_input_embeddings()(other.input_ids)
    by_embeds = agent.forward(inputs, cache.kv_caches)
    assert torch.allclose(by_embeds, by_ids, atol=1e-6)
