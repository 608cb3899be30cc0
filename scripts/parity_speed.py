"""Wall time of one whole parity run on a Llama-3.2-1B-shaped random checkpoint (the issue's speed target).

    PYTHONPATH=$PWD python scripts/parity_speed.py                       # cuda, bfloat16, 1b shape; target < 60 s
    PYTHONPATH=$PWD python scripts/parity_speed.py --device cpu --shape small --dtype float32   # a quick CPU check

The checkpoint (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192, vocab 128256, untied, written in
the test dtype) is built on the device first and is not counted. The timed part is `parity.compare`: transformers
float32 and transformers in the test dtype loaded and run (each prompt alone, prefill + 4 decode steps), the lmdp
port loaded and run (prompts packed in one prefill, 4 paged decode steps), every tap captured and diffed, and the
whole-model checks. Exit status 0 when the run passes and meets the target.
"""
import argparse
import os
import sys
import tempfile
import time

_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere, no install

import torch  # noqa: E402

from parity import compare  # noqa: E402
from parity.random_checkpoint import LLAMA_1B_SHAPE, SMALL_SHAPE, build_random_llama  # noqa: E402
from parity.run import resolve_device  # noqa: E402

TARGET_S = 60.0


def _sync(device: str):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def _versions() -> str:
    import transformers
    parts = [f'torch {torch.__version__}', f'transformers {transformers.__version__}']
    try:
        import triton
        parts.append(f'triton {triton.__version__}')
    except ImportError:
        parts.append('no triton')
    return ', '.join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='auto')
    parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    parser.add_argument('--shape', default='1b', choices=['1b', 'small'])
    parser.add_argument('--dir', help='where to write the checkpoint (default: a temporary folder, removed after)')
    parser.add_argument('--prompts', type=int, default=3)
    parser.add_argument('--decode-steps', type=int, default=4)
    parser.add_argument('--report', help='also write report.json / report.html here')
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    card = torch.cuda.get_device_name(torch.device(device)) if device.startswith('cuda') else 'cpu'
    print(f'device {device} ({card}); {_versions()}', flush=True)

    with tempfile.TemporaryDirectory(prefix='parity-speed-') as tmp:
        path = args.dir or os.path.join(tmp, 'llama')
        shape = LLAMA_1B_SHAPE if args.shape == '1b' else SMALL_SHAPE
        t0 = time.perf_counter()
        if not os.path.isfile(os.path.join(path, 'config.json')):
            build_random_llama(path, device=device, dtype=args.dtype, **shape)
        _sync(device)
        if device.startswith('cuda'):
            torch.cuda.empty_cache()
        build_s = time.perf_counter() - t0
        print(f'checkpoint {path} ({args.shape} shape, {args.dtype}) ready in {build_s:.1f} s (not counted)',
              flush=True)

        t0 = time.perf_counter()
        report = compare(path, dtype=args.dtype, device=device, prompts=args.prompts,
                         decode_steps=args.decode_steps, progress=sys.stderr.isatty(), report_dir=args.report)
        _sync(device)
        wall = time.perf_counter() - t0

    print(report.summary())
    taps = len(report.taps)
    met = wall < TARGET_S
    print(f'\nparity run wall time: {wall:.1f} s for {taps} taps x models (target < {TARGET_S:.0f} s: '
          f'{"met" if met else "MISSED"}); process total {time.perf_counter() - _START:.1f} s; '
          f'{", ".join(f"{k} {v:.1f} s" for k, v in report.timings.items())}')
    if device.startswith('cuda'):
        print(f'peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB')
    return 0 if met and report.passed else 1


if __name__ == '__main__':
    sys.exit(main())
