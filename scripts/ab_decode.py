"""A/B of split-KV decode attention's two merge paths, each launch captured in a CUDA graph (as decode runs):
the merge in the split kernel (fused_reduce=True) against the separate reduce kernel.

    PYTHONPATH=$PWD python scripts/ab_decode.py
"""
import torch
import triton.testing

from lmdp.kernels.triton.bench_kernels import make_cache
from lmdp.kernels.triton.decode_attention import choose_num_splits, decode_attention_fwd


def main():
    print(f'{torch.cuda.get_device_name(0)}: decode attention, Hq=32 Hk=8 D=128, page 64, bf16, graph replay us')
    print(f"{'batch':>5} {'ctx':>6} {'splits':>6} {'two kernels':>11} {'fused':>8}")
    for batch, ctx in [(1, 256), (1, 1024), (1, 8192), (1, 32768), (8, 1024), (64, 2048)]:
        q, k, v, bo, qsl, qs, kvs = make_cache([ctx] * batch, [1] * batch, 32, 8, 128, 64, torch.bfloat16)
        out = torch.empty_like(q)
        times = {}
        for fused in (False, True):
            def run():
                decode_attention_fwd(q, k, v, bo, qsl, qs, kvs, out, fused_reduce=fused)
            run()
            times[fused] = triton.testing.do_bench_cudagraph(run, rep=200, return_mode='median') * 1e3
        splits = choose_num_splits(batch, 8, 1, q.device)
        print(f'{batch:>5} {ctx:>6} {splits:>6} {times[False]:>11.2f} {times[True]:>8.2f}', flush=True)


if __name__ == '__main__':
    main()
