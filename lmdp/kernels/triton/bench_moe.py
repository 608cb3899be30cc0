"""Micro-benchmark: the fused-MoE kernel on a mixture-of-experts layer shape (run on a GPU).

    python -m lmdp.kernels.triton.bench_moe                 # Qwen3-30B-A3B's layer: 128 experts of 768, top-8
    python -m lmdp.kernels.triton.bench_moe --paths         # GEMV and grouped GEMM side by side at small batches
    python -m lmdp.kernels.triton.bench_moe --sweep --tokens 64 256 4096   # 36 grouped-GEMM tilings, the best

Each figure is one layer's device time (router top-k + experts) inside a CUDA graph that runs the layer under
several different routings in turn, so the experts' weights come from HBM as in a real step. GB/s counts the
weights of the distinct experts the batch reaches (what a step must read) over that time, to be read against the
device copy bandwidth printed first; TFLOP/s counts 2 x 3 x H x I per (token, expert).
"""
import argparse
import importlib
import itertools
import json
import os

import torch

from lmdp.kernels.triton.moe_router import softmax_topk

from ... import envs

# the module itself: the package exports the function under the module's name
tmoe = importlib.import_module('lmdp.kernels.triton.fused_moe')

SHAPES = {'qwen3-30b-a3b': (128, 8, 2048, 768), 'mixtral-8x7b': (8, 2, 4096, 14336),
          'qwen1.5-moe-a2.7b': (60, 4, 2048, 1408)}
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
ROUTINGS = 6


def copy_bandwidth() -> float:
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device='cuda')
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 2 * 10 / (start.elapsed_time(end) / 1e3)


def time_layer(weights, tokens, top_k, path=None, config=None, repeats=20, op=None):
    """(seconds per layer, distinct experts per routing on average) for `tokens` tokens. `op(x, gate_up, down,
    weights, ids)` times another fused MoE (renormalising) in place of lmdp's."""
    gate_up, down = weights
    experts, _, hidden = gate_up.shape
    x = torch.randn(tokens, hidden, device='cuda', dtype=torch.bfloat16)
    logits = [torch.randn(tokens, experts, device='cuda', dtype=torch.bfloat16) for _ in range(ROUTINGS)]
    if op is None:
        op = lambda x, gu, dn, w, ids: tmoe.fused_moe(x, gu, dn, w, ids, True, path=path, config=config)  # noqa: E731

    def run():
        for lg in logits:
            w, ids = softmax_topk(lg, top_k)
            op(x, gate_up, down, w, ids)
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats / ROUTINGS
    reached = sum(softmax_topk(lg, top_k)[1].unique().numel() for lg in logits) / ROUTINGS
    return seconds, reached


def figures(weights, tokens, top_k, seconds, reached):
    _, two_inter, hidden = weights[0].shape
    expert_bytes = 3 * hidden * (two_inter // 2) * 2
    flops = 2 * 3 * hidden * (two_inter // 2) * tokens * top_k
    return dict(tokens=tokens, us=round(seconds * 1e6, 1), experts_reached=round(reached, 1),
                GBps=round(reached * expert_bytes / seconds / 1e9, 1), TFLOPs=round(flops / seconds / 1e12, 1))


def sweep_configs():
    """36 tile configs (compiled once each, reused across batches); `config` gives both GEMMs the same tiles.
    Deeper pipelines for narrow K tiles, 8 warps for the widest tiles."""
    for bm, bn, bk in itertools.product((16, 32, 64, 128), (64, 128, 256), (32, 64, 128)):
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=8 if bm * bn >= 128 * 128 else 4,
                   num_stages=3 if bk == 128 else 4)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--shape', default='qwen3-30b-a3b', choices=sorted(SHAPES))
    parser.add_argument('--tokens', type=int, nargs='*', default=TOKENS)
    parser.add_argument('--paths', action='store_true', help='time GEMV and grouped apart up to 64 tokens')
    parser.add_argument('--sweep', action='store_true', help='try every grouped-GEMM tile config per batch')
    parser.add_argument('--json', default=os.path.join(envs.OUT, 'bench_moe.json'))
    args = parser.parse_args(argv)
    experts, top_k, hidden, inter = SHAPES[args.shape]
    torch.manual_seed(0)
    weights = (torch.randn(experts, 2 * inter, hidden, device='cuda', dtype=torch.bfloat16) * 0.02,
               torch.randn(experts, hidden, inter, device='cuda', dtype=torch.bfloat16) * 0.02)
    bandwidth = copy_bandwidth()
    print(f'{torch.cuda.get_device_name(0)}: copy {bandwidth / 1e12:.2f} TB/s; {args.shape}: {experts} experts '
          f'of {inter}, top-{top_k}, hidden {hidden}', flush=True)
    rows = []
    for tokens in args.tokens:
        paths = [None]
        if args.paths and tokens <= 64:
            paths = ['gemv', 'grouped']
        for path in paths:
            seconds, reached = time_layer(weights, tokens, top_k, path)
            row = dict(figures(weights, tokens, top_k, seconds, reached), path=path or 'auto')
            if args.sweep and tokens > 1:
                best = None
                for cfg in sweep_configs():
                    try:
                        s, _ = time_layer(weights, tokens, top_k, 'grouped', cfg, repeats=5)
                    except Exception:   # noqa: BLE001 - configs that exceed the SM's resources are skipped
                        continue
                    if best is None or s < best[0]:
                        best = (s, cfg)
                if best:
                    row['sweep_best_us'], row['sweep_best'] = round(best[0] * 1e6, 1), best[1]
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = dict(device=torch.cuda.get_device_name(0), copy_TBps=round(bandwidth / 1e12, 2), shape=args.shape,
                  rows=rows)
    with open(args.json, 'w') as f:
        json.dump(result, f, indent=1)
    print('RESULT ' + json.dumps(result))


if __name__ == '__main__':
    main()
