"""Micro-benchmark: the GEMV kernel against cuBLAS on the linear layers of a decode step (run on a GPU).

    python -m lmdp.kernels.triton.bench_gemv                 # 8B and 1B layer shapes, M = 1, 2, 4, 8
    python -m lmdp.kernels.triton.bench_gemv --sweep         # also try every tile config, print the best

Each figure is one product's device time inside a CUDA graph that runs the product over several distinct copies
of the weight, so W comes from HBM as it does in a real step (a 32 MB o_proj would otherwise sit in the 50 MB L2).
GB/s is W's bytes over that time, to be read against the device copy bandwidth printed first. The down projection
is timed with its gated activation: cuBLAS = activation kernel + GEMM, GEMV = one fused launch.
"""
import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F

from lmdp import envs
from lmdp.kernels.triton.activation import silu_and_mul
from lmdp.kernels.triton.gemv import _config, gemv

SHAPES = {
    '8b': [('qkv', 6144, 4096, None), ('o_proj', 4096, 4096, None), ('gate_up', 28672, 4096, None),
           ('down+act', 4096, 14336, 'silu'), ('lm_head', 128256, 4096, None)],
    '1b': [('qkv', 3072, 2048, None), ('o_proj', 2048, 2048, None), ('gate_up', 16384, 2048, None),
           ('down+act', 2048, 8192, 'silu'), ('lm_head', 128256, 2048, None)],
}


def sweep_configs(m: int):
    block_m = 1 << (m - 1).bit_length()
    out = []
    for bn, bk, w in itertools.product((4, 8, 16), (256, 512, 1024), (4, 8)):
        if block_m * bn * bk <= 64 * 32 * w:
            out.append((0, bn, bk, w, 1))
    for bn, bk, w in itertools.product((4, 8, 16, 32), (128, 256, 512), (4, 8)):
        if block_m * bn * bk <= 128 * 32 * w:
            out.append((1, bn, bk, w, 1))
    for bn, bk, s in itertools.product((16, 32, 64), (128, 256), (3, 5)):
        out.append((2, bn, bk, 4, s))
    return out


def graph_us(fn, copies: int, replays: int = 20) -> float:
    """Device time of one call of `fn`'s product (fn runs it once per weight copy), from a CUDA-graph replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * copies)


def bench_shape(n, k, act, m, configs, min_bytes=768 << 20):
    dtype = torch.bfloat16
    w_bytes = n * k * 2
    copies = max(2, -(-min_bytes // w_bytes))
    weights = [torch.randn(n, k, device='cuda', dtype=dtype) * 0.02 for _ in range(copies)]
    x = torch.randn(m, 2 * k if act else k, device='cuda', dtype=dtype)

    def cublas():
        for w in weights:
            F.linear(silu_and_mul(x) if act else x, w)

    ref = F.linear(silu_and_mul(x) if act else x, weights[0]).float()
    row = {'cublas_us': graph_us(cublas, copies)}
    timings = []
    for cfg in configs:
        try:
            y = gemv(x, weights[0], None, act=act, config=cfg).float()
            err = ((y - ref).norm() / ref.norm()).item()
            if err > 1e-2:
                print(f'    config {cfg}: wrong result (rel err {err:.2e})', flush=True)
                continue
            us = graph_us(lambda: [gemv(x, w, None, act=act, config=cfg) for w in weights], copies)
        except Exception as e:  # noqa: BLE001 - a sweep: report and go on
            print(f'    config {cfg}: {type(e).__name__}: {str(e)[:120]}', flush=True)
            continue
        timings.append((us, cfg))
    timings.sort()
    best = timings[0]
    row.update(gemv_us=best[0], config=list(best[1]), top3=[[round(us, 2), list(c)] for us, c in timings[:3]],
               GBps_cublas=w_bytes / row['cublas_us'] / 1e3,
               GBps_gemv=w_bytes / best[0] / 1e3)
    weights.clear()      # frees the copies (the closures above hold the list)
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('shapes', nargs='*', default=['8b', '1b'], choices=sorted(SHAPES))
    parser.add_argument('--rows', default='1,2,4,8')
    parser.add_argument('--sweep', action='store_true')
    parser.add_argument('--json', default=os.path.join(envs.OUT, 'bench_gemv.json'))
    args = parser.parse_args()
    from lmdp.bench.measure import copy_bandwidth
    bw = copy_bandwidth()
    print(f'{torch.cuda.get_device_name(0)}: device copy {bw / 1e12:.2f} TB/s', flush=True)
    results = []
    for shape in args.shapes:
        for name, n, k, act in SHAPES[shape]:
            for m in map(int, args.rows.split(',')):
                configs = sweep_configs(m) if args.sweep else [_config(m, n, k, act is not None)]
                row = dict(shape=shape, layer=name, m=m, n=n, k=k, **bench_shape(n, k, act, m, configs))
                results.append(row)
                print(f"{shape:>3} {name:>9} M={m}: cuBLAS {row['cublas_us']:8.1f} us {row['GBps_cublas']:6.0f} GB/s"
                      f" | GEMV {row['gemv_us']:8.1f} us {row['GBps_gemv']:6.0f} GB/s {tuple(row['config'])}"
                      f" | x{row['cublas_us'] / row['gemv_us']:.3f}", flush=True)
                if args.sweep:
                    print('      top 3:', row['top3'], flush=True)
    with open(args.json, 'w') as f:
        json.dump({'device': torch.cuda.get_device_name(0), 'copy_TBps': bw / 1e12, 'rows': results}, f, indent=1)
    print(f"\n{'shape':>5} {'layer':>9} {'M':>2} {'cuBLAS us':>9} {'GEMV us':>8} {'speedup':>7} "
          f"{'GEMV/copy BW':>12}  config")
    for r in results:
        print(f"{r['shape']:>5} {r['layer']:>9} {r['m']:>2} {r['cublas_us']:>9.1f} {r['gemv_us']:>8.1f} "
              f"{r['cublas_us'] / r['gemv_us']:>7.3f} {r['GBps_gemv'] * 1e9 / bw:>12.1%}  {tuple(r['config'])}")


if __name__ == '__main__':
    main()
