"""Where a decode step's time goes: the engine's whole step, one CUDA-graph replay, and the kernels.

    PYTHONPATH=$PWD python scripts/profile_decode.py 1b [8b] [moe:8] [--batch 1 64 256] [--context 850]

Per shape (`moe:8`: the moe shape with 8 layers): the batch-1 roofline step time and the engine's whole batch-1
step (with and without min_new_tokens); then per batch size, for that many sequences of `--context` cached tokens
each: the device time of one graph replay of the decode step (events over many replays) and the top kernels of
one eager step from torch.profiler. Set against the 256-request run's mean decode step (`lmdp bench`'s step
split), the replay time says whether a step waits on the device or on the host.
"""
import argparse
import random
import time

import torch

from lmdp import GenerationConfig, PytorchEngineConfig, pipeline
from lmdp.bench.checkpoint import ensure_checkpoint
from lmdp.bench.measure import copy_bandwidth, words
from lmdp.bench.shapes import SHAPES, with_layers


def replay_ms(runner, inputs, n=50):
    for _ in range(5):
        runner.replay(inputs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        runner.replay(inputs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def engine_step_ms(pipe):
    prompt = words(128, random.Random(0))
    for label, gen in [('min_new_tokens=n', GenerationConfig(max_new_tokens=129, min_new_tokens=129,
                                                                ignore_eos=True)),
                       ('plain greedy', GenerationConfig(max_new_tokens=129, ignore_eos=True))]:
        pipe([prompt], gen_config=gen, do_preprocess=False)
        times = []
        for n in (129, 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            pipe([prompt], gen_config=GenerationConfig(max_new_tokens=n, ignore_eos=True,
                                                       min_new_tokens=n if 'min' in label else 0),
                 do_preprocess=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        yield label, (times[0] - times[1]) / 128 * 1e3


def decode_inputs(engine, batch: int, context: int):
    """A decode step of `batch` sequences with `context` cached tokens each, by hand (blocks taken from the pool)."""
    from lmdp.engine.scheduler import ScheduledBatch
    from lmdp.engine.sequence import SamplingParams, Sequence
    seqs = []
    for i in range(batch):
        seq = Sequence(10**6 + i, [3 + (i + j) % 3000 for j in range(context)], context,
                       SamplingParams(max_new_tokens=4))
        if not engine.block_manager.allocate(seq, context + 1):
            raise SystemExit(f'the KV pool cannot hold {batch} x {context + 1} tokens')
        seq.num_cached = context
        seq.token_ids.append(5)
        seqs.append(seq)
    return seqs, engine.runner.prepare_inputs(ScheduledBatch(seqs, [1] * batch, is_decoding=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('shapes', nargs='*', default=['1b'])
    parser.add_argument('--batch', type=int, nargs='+', default=[1])
    parser.add_argument('--context', type=int, default=850, help='cached tokens of each sequence (batches > 1)')
    parser.add_argument('--kernels', type=int, default=18, help='rows of the kernel table')
    args = parser.parse_args()
    bw = copy_bandwidth()
    for spec in args.shapes:
        name, _, layers = spec.partition(':')
        shape = with_layers(SHAPES[name], int(layers) if layers else None)
        path = ensure_checkpoint(shape)
        pipe = pipeline(path, backend_config=PytorchEngineConfig(
            session_len=4096, max_batch_size=max(256, *args.batch),
            cudagraph_capture_batch_sizes=sorted({1, 2, 4, 8, *args.batch})))
        engine = pipe.engine
        for label, ms in engine_step_ms(pipe):
            print(f'{shape.name} engine step at batch 1 ({label}): {ms:.3f} ms', flush=True)
        print(f'{shape.name} batch-1 roofline step {shape.decode_weight_bytes() / bw * 1e3:.3f} ms', flush=True)
        from torch.profiler import ProfilerActivity, profile
        for batch in args.batch:
            context = 128 if batch == 1 else args.context
            seqs, inputs = decode_inputs(engine, batch, context)
            print(f'{shape.name} batch {batch}, context {context}: graph replay '
                  f'{replay_ms(engine.runner, inputs):.3f} ms', flush=True)
            for _ in range(3):
                engine.runner.logits(engine.runner.forward(inputs))
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    engine.runner.logits(engine.runner.forward(inputs))
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=args.kernels,
                                            max_name_column_width=60), flush=True)
            for seq in seqs:
                engine.block_manager.free(seq)
        pipe.close()
        del pipe, engine
        torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
