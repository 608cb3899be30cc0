"""Issue 16 on the GPU, after the kernel tests: a random 1B-shape Llama (bf16) quantised by `lmdp quantize` to FP8
(128x128 block) and AWQ (4-bit, group 128); bf16 parity of each quantised checkpoint against transformers on its
dequantised weights; batch-1 decode of bf16, FP8 and AWQ, each against its roofline (bytes of weights and scales
read per decode step / measured copy bandwidth). Prints a table last and writes issue16.json under $OUT.

    PYTHONPATH=$PWD python scripts/issue16_gpu.py [--workdir /tmp] [--no-parity]
"""
import argparse
import json
import os
import time

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--workdir', default='/tmp')
    parser.add_argument('--no-parity', action='store_true')
    parser.add_argument('--no-bench', action='store_true')
    args = parser.parse_args()
    from lmdp.bench.checkpoint import ensure_checkpoint, step_bytes
    from lmdp.bench.measure import copy_bandwidth, lmdp_figures
    from lmdp.bench.shapes import SHAPES
    from lmdp.quantize import quantize_checkpoint

    out_dir = os.environ.get('OUT', '/tmp')
    t0 = time.perf_counter()
    bf16 = ensure_checkpoint(SHAPES['1b'], args.workdir)
    paths = {'bf16': bf16}
    for method, name in (('fp8-block', 'fp8'), ('awq', 'awq')):
        dst = os.path.join(args.workdir, f'lmd_random_llama_1b_{name}')
        if not os.path.isfile(os.path.join(dst, 'config.json')):
            quantize_checkpoint(bf16, dst, method, group_size=128, device='cuda')
        paths[name] = dst
    print(f'checkpoints ready in {time.perf_counter() - t0:.0f} s: {paths}', flush=True)
    results = {name: {'path': p} for name, p in paths.items()}

    if not args.no_parity:
        import parity
        for name in ('fp8', 'awq'):
            t = time.perf_counter()
            report = parity.compare(paths[name], device='cuda', dtype='bfloat16', decode_steps=4)
            print(report.summary(), flush=True)
            results[name]['parity_bf16'] = 'PASS' if report.passed else 'FAIL'
            results[name]['parity_s'] = round(time.perf_counter() - t, 1)
            del report
            torch.cuda.empty_cache()

    if not args.no_bench:
        bw = copy_bandwidth()
        for name, path in paths.items():
            fig = lmdp_figures(path, throughput=False)
            nbytes = step_bytes(path)
            roof = bw / nbytes
            results[name].update(bs1_decode_tok_s=fig['bs1_decode_tok_s'], step_bytes=nbytes,
                                 roofline_tok_s=round(roof, 1),
                                 roofline_frac=round(fig['bs1_decode_tok_s'] / roof, 3))
            print(name, results[name], flush=True)
        results['copy_bandwidth_GBps'] = round(bw / 1e9, 1)

    with open(os.path.join(out_dir, 'issue16.json'), 'w') as f:
        json.dump(results, f, indent=1)
    base = results['bf16'].get('bs1_decode_tok_s')
    print(f"\n{'format':<6} {'parity bf16':>11} {'bs1 tok/s':>10} {'x bf16':>7} {'step MB':>8} {'roofline':>9} "
          f"{'of roof':>8}")
    for name in ('bf16', 'fp8', 'awq'):
        r = results[name]
        tok = r.get('bs1_decode_tok_s')
        ratio = f'{tok / base:.2f}' if tok and base else '-'
        print(f"{name:<6} {r.get('parity_bf16', '-'):>11} {tok or '-':>10} {ratio:>7} "
              f"{r.get('step_bytes', 0) / 1e6:>8.0f} {r.get('roofline_tok_s', '-'):>9} "
              f"{r.get('roofline_frac', '-'):>8}")


if __name__ == '__main__':
    main()
