"""Micro-benchmark of lmdp's Triton attention kernels (run on a GPU).

    python -m lmdp.kernels.triton.bench_kernels                 # decode + prefill, default configs
    python -m lmdp.kernels.triton.bench_kernels --sweep         # also try other tile configs, print the best
    python -m lmdp.kernels.triton.bench_kernels --only decode --head-dim 64

Decode: batch 1/64/256 x context 1k/8k/32k (Llama-3-8B-like heads: 32 q heads, 8 kv heads, D=128, bf16, cache
blocks of 64 shuffled), timed with `triton.testing.do_bench` (median) and also replayed from a CUDA graph (as the
engine runs decode); "GB/s" is the K/V bytes the step must read divided by the time (H100 SXM peak ~3350 GB/s).
Prefill: prompts with and without history; TFLOP/s counts the causal (visible) part only, next to torch's SDPA on
the same (contiguous) data as a yardstick.
"""
import argparse

import torch
import triton
import triton.testing

from lmdp.kernels.triton.decode_attention import choose_num_splits, decode_attention_fwd
from lmdp.kernels.triton.prefill_attention import prefill_attention_fwd


def make_cache(kv_lens, q_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, seed=0):
    g = torch.Generator(device='cuda').manual_seed(seed)
    need = [triton.cdiv(n, page_size) for n in kv_lens]
    num_blocks = sum(need)
    perm = torch.randperm(num_blocks, device='cuda', generator=g).to(torch.int32)
    block_offsets = torch.zeros(len(kv_lens), max(need), dtype=torch.int32, device='cuda')
    used = 0
    for b, n in enumerate(need):
        block_offsets[b, :n] = perm[used:used + n]
        used += n
    k_cache = torch.randn(num_blocks, page_size, num_kv_heads, head_dim, device='cuda', dtype=dtype, generator=g)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(sum(q_lens), num_heads, head_dim, device='cuda', dtype=dtype, generator=g)
    q_seqlens = torch.tensor(q_lens, dtype=torch.int32, device='cuda')
    kv_seqlens = torch.tensor(kv_lens, dtype=torch.int32, device='cuda')
    q_start_loc = (torch.cumsum(q_seqlens, 0) - q_seqlens).to(torch.int32)
    return q, k_cache, v_cache, block_offsets, q_start_loc, q_seqlens, kv_seqlens


def median_ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median')


def graph_ms(fn):
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode='median')
    except Exception as e:  # noqa: BLE001 - a benchmark: report and go on
        print(f'    (cuda graph timing failed: {type(e).__name__}: {e})')
        return float('nan')


def _time_config(run, kw):
    try:
        return median_ms(lambda: run(**kw)), kw
    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report and go on
        return float('inf'), dict(kw, error=type(e).__name__)


def bench_decode(args):
    print(f'\n== decode: Hq={args.num_heads} Hk={args.num_kv_heads} D={args.head_dim} page={args.page_size} bf16')
    print(f'{"batch":>6} {"ctx":>6} {"splits":>6} {"us":>9} {"GB/s":>7} {"graph us":>9} {"GB/s":>7}')
    for batch in (1, 64, 256):
        for ctx in (1024, 8192, 32768):
            kv_bytes = batch * ctx * args.num_kv_heads * args.head_dim * 2 * 2
            if kv_bytes > args.max_cache_gb * 2**30:
                print(f'{batch:>6} {ctx:>6}   skipped (cache {kv_bytes / 2**30:.0f} GiB > --max-cache-gb)')
                continue
            t = make_cache([ctx] * batch, [1] * batch, args.num_heads, args.num_kv_heads, args.head_dim,
                           args.page_size, torch.bfloat16)
            out = torch.empty_like(t[0])
            block_h = min(max(16, triton.next_power_of_2(args.num_heads // args.num_kv_heads)), 64)
            splits = choose_num_splits(batch, args.num_kv_heads, triton.cdiv(args.num_heads // args.num_kv_heads,
                                                                             block_h), out.device, ctx)

            def run(**kw):
                return decode_attention_fwd(*t, out, max_kv_seqlen=ctx, **kw)

            ms = median_ms(run)
            gms = graph_ms(run)
            print(f'{batch:>6} {ctx:>6} {splits:>6} {ms * 1e3:>9.1f} {kv_bytes / ms / 1e6:>7.0f} '
                  f'{gms * 1e3:>9.1f} {kv_bytes / gms / 1e6:>7.0f}')
            if args.sweep:
                # tile configs at the chosen number of splits, then other split counts with the best tile config
                results = []
                for block_n in (32, 64, 128):
                    for num_stages in (2, 3, 4):
                        for num_warps in (4, 8):
                            kw = dict(block_n=block_n, num_stages=num_stages, num_warps=num_warps)
                            results.append(_time_config(run, kw))
                results.sort(key=lambda r: r[0])
                best = {k: v for k, v in results[0][1].items() if k != 'error'}
                for sp in sorted({max(1, splits // 4), max(1, splits // 2), min(64, splits * 2), min(64, splits * 4)}
                                 - {splits}):
                    results.append(_time_config(run, dict(best, num_splits=sp)))
                results.sort(key=lambda r: r[0])
                for ms_, kw in results[:4]:
                    print(f'         sweep: {ms_ * 1e3:8.1f} us {kv_bytes / ms_ / 1e6:6.0f} GB/s  {kw}')
            t = out = None      # free the cache before the next shape
            torch.cuda.empty_cache()


def bench_prefill(args):
    hq, hk, d = args.num_heads, args.num_kv_heads, args.head_dim
    print(f'\n== prefill: Hq={hq} Hk={hk} D={d} page={args.page_size} bf16, causal')
    print(f'{"case":>28} {"ms":>8} {"TFLOP/s":>8} {"sdpa ms":>8} {"TFLOP/s":>8}')
    cases = [('1 x 4096 (no history)', [4096], [4096]),
             ('1 x 16384 (no history)', [16384], [16384]),
             ('1 x 2048 after 14336 hist', [2048], [16384]),
             ('8 x 1024 (no history)', [1024] * 8, [1024] * 8),
             ('16 x 512 after 3584 hist', [512] * 16, [4096] * 16)]
    for name, q_lens, kv_lens in cases:
        t = make_cache(kv_lens, q_lens, hq, hk, d, args.page_size, torch.bfloat16)
        out = torch.empty_like(t[0])
        flops = 0
        for ql, kl in zip(q_lens, kv_lens):
            hist = kl - ql
            visible = ql * hist + ql * (ql + 1) / 2
            flops += 4 * visible * d * hq
        max_q = max(q_lens)

        def run(**kw):
            return prefill_attention_fwd(*t, out, max_q, **kw)

        ms = median_ms(run)
        sdpa = _sdpa_ms(t, q_lens, kv_lens, hq, hk, d)
        print(f'{name:>28} {ms:>8.3f} {flops / ms / 1e9:>8.1f} {sdpa:>8.3f} {flops / sdpa / 1e9:>8.1f}')
        if args.sweep:
            results = []
            for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4),
                                 (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 3), (128, 64, 8, 2)]:
                results.append(_time_config(run, dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s)))
            results.sort(key=lambda r: r[0])
            for ms_, kw in results[:3]:
                print(f'         sweep: {ms_:8.3f} ms {flops / ms_ / 1e9:6.1f} TFLOP/s  {kw}')
        t = out = None
        torch.cuda.empty_cache()


def _sdpa_ms(t, q_lens, kv_lens, hq, hk, d):
    """torch SDPA (flash backend where it applies) on one contiguous sequence of the same shape, times count."""
    ql, kl = q_lens[0], kv_lens[0]
    if ql != kl:  # SDPA's causal mask is top-left aligned: only compare plain prompts
        return float('nan')
    q = torch.randn(1, hq, ql, d, device='cuda', dtype=torch.bfloat16)
    k = torch.randn(1, hq, kl, d, device='cuda', dtype=torch.bfloat16)
    v = torch.randn_like(k)
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    return median_ms(fn) * len(q_lens)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', choices=['decode', 'prefill'])
    parser.add_argument('--sweep', action='store_true', help='also time other tile configs')
    parser.add_argument('--num-heads', type=int, default=32)
    parser.add_argument('--num-kv-heads', type=int, default=8)
    parser.add_argument('--head-dim', type=int, default=128)
    parser.add_argument('--page-size', type=int, default=64)
    parser.add_argument('--max-cache-gb', type=float, default=40.0, help='skip decode cases with a bigger cache')
    args = parser.parse_args()
    assert torch.cuda.is_available(), 'needs a GPU'
    print(f'{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}')
    if args.only in (None, 'decode'):
        bench_decode(args)
    if args.only in (None, 'prefill'):
        bench_prefill(args)


if __name__ == '__main__':
    main()
