"""lmdp's fused MoE beside lmdeploy's on one layer shape, timed the same way (`lmdp.kernels.triton.bench_moe`:
a CUDA graph of several routings, weights from HBM). Needs lmdeploy importable (on the GPU machine: source
.carry/lmdeploy/install.sh first, keeping the repo on PYTHONPATH).

    python scripts/bench_moe_lmdeploy.py [--shape qwen3-30b-a3b] [--tokens 1 16 64 256 1024 4096]
"""
import argparse
import json

import torch

from lmdp.kernels.triton import bench_moe


def lmdeploy_op(top_k):
    from lmdeploy.pytorch.kernels.cuda.moe.fused_moe import fused_moe
    return lambda x, gu, dn, w, ids: fused_moe(x, gu, dn, w, ids, top_k, renormalize=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--shape', default='qwen3-30b-a3b', choices=sorted(bench_moe.SHAPES))
    parser.add_argument('--tokens', type=int, nargs='*', default=[1, 16, 64, 128, 256, 512, 1024, 2048, 4096])
    args = parser.parse_args(argv)
    experts, top_k, hidden, inter = bench_moe.SHAPES[args.shape]
    torch.manual_seed(0)
    weights = (torch.randn(experts, 2 * inter, hidden, device='cuda', dtype=torch.bfloat16) * 0.02,
               torch.randn(experts, hidden, inter, device='cuda', dtype=torch.bfloat16) * 0.02)
    bandwidth = bench_moe.copy_bandwidth()
    print(f'{torch.cuda.get_device_name(0)}: copy {bandwidth / 1e12:.2f} TB/s; {args.shape}', flush=True)
    theirs = lmdeploy_op(top_k)
    print('| tokens | lmdp us | lmdeploy us | lmdp/lmdeploy time | lmdp GB/s | lmdp TFLOP/s | lmdeploy TFLOP/s |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    rows = []
    for tokens in args.tokens:
        ours = bench_moe.figures(weights, tokens, top_k, *bench_moe.time_layer(weights, tokens, top_k))
        other = bench_moe.figures(weights, tokens, top_k, *bench_moe.time_layer(weights, tokens, top_k, op=theirs))
        rows.append(dict(tokens=tokens, lmdp=ours, lmdeploy=other))
        print(f"| {tokens} | {ours['us']} | {other['us']} | {ours['us'] / other['us']:.2f} | {ours['GBps']} | "
              f"{ours['TFLOPs']} | {other['TFLOPs']} |", flush=True)
    print('RESULT ' + json.dumps(dict(device=torch.cuda.get_device_name(0), shape=args.shape, rows=rows)))


if __name__ == '__main__':
    main()
