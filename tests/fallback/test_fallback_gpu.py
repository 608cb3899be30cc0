"""The transformers fallback on CUDA in bfloat16: parity within the noise floor, decode steps as CUDA graphs that
replay the eager step bit for bit, the fast paths in place; the engine captures its graphs."""
import pytest
import torch

from lmdp.fallback import TransformersForCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]

# (family, architecture): a Llama and a Gemma 2 forced onto the fallback (sliding windows, softcaps, a query scale),
# unported ones with partial rotary, post-norms, an interleaved rotary, multipliers, and mixtures of experts
FAMILIES = [('llama', 'LlamaForCausalLM'), ('gemma2', 'Gemma2ForCausalLM'), ('olmo2', 'Olmo2ForCausalLM'),
            ('gpt_neox', 'GPTNeoXForCausalLM'), ('cohere', 'CohereForCausalLM'), ('granite', 'GraniteForCausalLM'),
            ('mixtral', 'MixtralForCausalLM'), ('qwen2_moe', 'Qwen2MoeForCausalLM')]


@pytest.mark.parametrize('model_type, arch', FAMILIES)
def test_bf16_parity_and_cuda_graph_replay(model_type, arch, tiny_fallback):
    import parity
    report = parity.compare(tiny_fallback(model_type), dtype='bfloat16', device='cuda', prompts=3,
                            custom_module_map={arch: TransformersForCausalLM})
    assert report.passed, report.summary()
    assert report.check('cuda_graph').status == 'passed', report.check('cuda_graph').detail


def test_the_engine_captures_fallback_decode_graphs(tiny_fallback):
    from lmdp import GenerationConfig, PytorchEngineConfig, pipeline
    config = PytorchEngineConfig(dtype='bfloat16', device_type='cuda', max_batch_size=8, session_len=256,
                                 cudagraph_capture_batch_sizes=[1, 2, 4, 8], model_impl='transformers')
    pipe = pipeline(tiny_fallback('llama'), backend_config=config)
    results = pipe.engine.runner.graphs.results
    assert all(r.captured for r in results.values()), {b: r.reason for b, r in results.items()}
    assert any('rotary' in line for line in pipe.engine.agent.model.fast_paths)
    eager = pipeline(tiny_fallback('llama'), backend_config=PytorchEngineConfig(
        dtype='bfloat16', device_type='cuda', max_batch_size=8, session_len=256, eager_mode=True,
        model_impl='transformers'))
    prompts = [[1, 40, 41, 300, 7], [1, 22, 8, 9, 10, 11, 12]]
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    assert [r.token_ids for r in pipe(prompts, gen)] == [r.token_ids for r in eager(prompts, gen)]
