"""The engine with CUDA graphs against itself in eager mode (GPU only)."""
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')]


def test_graph_decode_equals_eager_decode(tmp_path):
    from lmdp import GenerationConfig, PytorchEngineConfig, pipeline
    from lmdp.tiny import make_tiny
    path = str(make_tiny('llama', tmp_path / 'tl', dtype='bfloat16'))
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 64, 30)]   # a bucket size: same kernels, same bits
    gen = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        cfg = PytorchEngineConfig(dtype='bfloat16', session_len=512, max_batch_size=8, num_gpu_blocks=64,
                                  eager_mode=eager, cudagraph_capture_batch_sizes=[1, 2, 4, 8])
        pipe = pipeline(path, backend_config=cfg)
        if not eager:
            runner = pipe.engine.runner
            assert runner.graphs is not None and all(r.captured for r in runner.graphs.results.values())
        outs[eager] = [r.token_ids for r in pipe(prompts, gen_config=gen, do_preprocess=False)]
        pipe.close()
    assert outs[False] == outs[True]
