"""Host work per decode step, with the model stubbed out: what the engine, scheduler, sampler and pipeline cost on
the CPU per step, at batch 1, 64 and 256 (the run-ahead hides it behind the GPU only while it is shorter than the
device's step).

    python scripts/host_overhead.py [--vocab 16] [--profile BATCH]
"""
import argparse
import cProfile
import pstats
import tempfile
import time

import torch

from lmdp import GenerationConfig, PytorchEngineConfig, pipeline
from lmdp.tiny import make_tiny


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--vocab', type=int, default=16, help='logits width of the stub (sampling cost grows with it)')
    parser.add_argument('--profile', type=int, default=0, metavar='BATCH', help='cProfile a run at this batch')
    args = parser.parse_args()
    path = str(make_tiny('llama', tempfile.mkdtemp()))
    pipe = pipeline(path, backend_config=PytorchEngineConfig(device_type='cpu', dtype='float32', max_batch_size=256))
    runner = pipe.engine.runner
    logits = torch.zeros(256, args.vocab)
    runner.forward = lambda inputs: torch.zeros(inputs.input_ids.numel(), 8)
    runner.logits = lambda hidden, rows=None: logits[:len(rows) if rows is not None else hidden.shape[0]]

    def run(batch, n):
        gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, ignore_eos=True, do_sample=False)
        start = time.perf_counter()
        pipe([[1, 5, 6, 7]] * batch, gen_config=gen, do_preprocess=False)
        return time.perf_counter() - start
    run(1, 8)
    for batch in (1, 64, 256):
        t1, tn = run(batch, 1), run(batch, 129)
        print(f'batch {batch}: {(tn - t1) / 128 * 1e6:.0f} us of host work per decode step', flush=True)
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(run, args.profile, 65)
        pstats.Stats(profile).sort_stats('tottime').print_stats(25)
    pipe.close()


if __name__ == '__main__':
    main()
