"""Where a batch-1 decode step's time goes: graph replay alone vs the whole engine step, and the kernels.

    PYTHONPATH=$PWD python scripts/profile_decode.py 1b [8b]

Prints, per shape: the roofline step time, the device time of one CUDA-graph replay (events over many replays),
the engine's whole step time at batch 1 (with and without min_new_tokens), and the top kernels of one eager
decode step from torch.profiler.
"""
import sys
import time

import torch

from lmdp import GenerationConfig, PytorchEngineConfig, pipeline
from lmdp.bench.checkpoint import ensure_checkpoint
from lmdp.bench.measure import copy_bandwidth, words
from lmdp.bench.shapes import SHAPES


def replay_ms(runner, inputs, n=100):
    for _ in range(5):
        runner.replay(inputs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        runner.replay(inputs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def main():
    import random
    bw = copy_bandwidth()
    for name in sys.argv[1:] or ['1b']:
        shape = SHAPES[name]
        path = ensure_checkpoint(shape)
        pipe = pipeline(path, backend_config=PytorchEngineConfig(session_len=4096, max_batch_size=256,
                                                                  cudagraph_capture_batch_sizes=[1, 2, 4, 8]))
        engine = pipe.engine
        prompt = words(128, random.Random(0))
        for label, gen in [('min_new_tokens=n', GenerationConfig(max_new_tokens=129, min_new_tokens=129,
                                                                    ignore_eos=True)),
                           ('plain greedy', GenerationConfig(max_new_tokens=129, ignore_eos=True))]:
            pipe([prompt], gen_config=gen, do_preprocess=False)
            torch.cuda.synchronize()
            t = time.perf_counter()
            pipe([prompt], gen_config=gen, do_preprocess=False)
            torch.cuda.synchronize()
            t129 = time.perf_counter() - t
            gen1 = GenerationConfig(max_new_tokens=1, ignore_eos=True)
            t = time.perf_counter()
            pipe([prompt], gen_config=gen1, do_preprocess=False)
            torch.cuda.synchronize()
            t1 = time.perf_counter() - t
            print(f'{name} engine step ({label}): {(t129 - t1) / 128 * 1e3:.3f} ms', flush=True)

        # one decode step's inputs, by hand, for replay and the profiler
        from lmdp.engine.scheduler import ScheduledBatch
        from lmdp.engine.sequence import SamplingParams, Sequence
        seq = Sequence(10**6, list(range(3, 131)), 128, SamplingParams(max_new_tokens=4))
        engine.block_manager.allocate(seq, 129)
        seq.num_cached = 128
        seq.token_ids.append(5)
        inputs = engine.runner.prepare_inputs(ScheduledBatch([seq], [1], is_decoding=True))
        roof = shape.decode_weight_bytes() / bw * 1e3
        print(f'{name} roofline step {roof:.3f} ms; graph replay {replay_ms(engine.runner, inputs):.3f} ms', flush=True)
        for _ in range(3):
            engine.runner.logits(engine.runner.forward(inputs))
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                engine.runner.logits(engine.runner.forward(inputs))
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=18, max_name_column_width=60))
        engine.block_manager.free(seq)
        pipe.close()
        del pipe, engine
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
