"""Greedy outputs of pipeline(tp=N) on GPUs (bfloat16, CUDA graphs) against tp=1: `python scripts/tp_greedy.py
CHECKPOINT N`. Prints how many of 16 prompts agree token for token. In bfloat16 the ranks' partial sums round
differently from one GPU's, so a prompt may part ways after a near-tie; the float32 equality is the CPU tests'."""
import sys
import time

import torch

from lmdp import GenerationConfig, PytorchEngineConfig, pipeline


def main(path: str, tp: int) -> int:
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(7, 500, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 200, (16,), generator=g)]
    gen = GenerationConfig(max_new_tokens=32, ignore_eos=True)
    outputs = {}
    for n in (1, tp):
        start = time.perf_counter()
        with pipeline(path, backend_config=PytorchEngineConfig(tp=n, dtype='bfloat16')) as pipe:
            outputs[n] = [r.token_ids for r in pipe(prompts, gen)]
        print(f'tp={n}: {time.perf_counter() - start:.1f} s (start-up, graph capture and generation)')
    same = sum(a == b for a, b in zip(outputs[1], outputs[tp]))
    print(f'{same}/{len(prompts)} prompts give the same greedy tokens at tp={tp} as at tp=1')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
