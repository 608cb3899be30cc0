"""Prefill attention on the GPU: lmdp's chosen kernel, each candidate, and torch SDPA's own backends, in TFLOP/s.

    PYTHONPATH=. python scripts/bench_prefill_attention.py [--head-dim 128 --num-heads 32 --num-kv-heads 8]

Cases: one prompt of 4k/16k/32k without history, and 4096-token chunks after history (how the engine prefills a
long prompt: max_prefill_token_num=4096), bf16, causal, cache blocks of 64 shuffled. TFLOP/s counts the visible
(causal) part only. SDPA runs on the same shapes, contiguous, per backend (cuDNN, flash, and its default pick);
with history SDPA's causal mask is top-left, so its row there times attention over the full key range without a
mask, scaled to the visible FLOPs (a yardstick of the kernel's speed, not the same computation). `cudnn cold` is
the first call of a new shape (cuDNN builds an execution plan); `gather` is the packed K/V copy the flash path
makes. Prints one JSON line per case at the end.
"""
import argparse
import json
import os

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmdp.kernels import prefill_select, torch_prefill
from lmdp.kernels.triton.bench_kernels import make_cache
from lmdp.kernels.triton.prefill_attention import prefill_attention_fwd


def ms(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode='median')


def cold_ms(fn):
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def sdpa_ms(backend, hq, hk, q_len, kv_len, d, causal):
    q = torch.randn(1, hq, q_len, d, device='cuda', dtype=torch.bfloat16)
    k = torch.randn(1, hk, kv_len, d, device='cuda', dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def fn():
        with sdpa_kernel([backend]) if backend is not None else _null():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hk)
    try:
        return ms(fn)
    except Exception as e:  # noqa: BLE001 - a benchmark: report and go on
        print(f'    sdpa {backend}: {type(e).__name__}: {str(e).splitlines()[0][:120]}')
        return float('nan')


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--num-heads', type=int, default=32)
    parser.add_argument('--num-kv-heads', type=int, default=8)
    parser.add_argument('--head-dim', type=int, default=128)
    args = parser.parse_args()
    hq, hk, d = args.num_heads, args.num_kv_heads, args.head_dim
    print(f'{torch.cuda.get_device_name()}  torch {torch.__version__}  cuDNN {torch.backends.cudnn.version()}  '
          f'TORCH_CUDNN_SDPA_AVOID_RECOMPILE={os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE")}')
    scale = d ** -0.5
    q0 = torch.empty(1, hq, d, device='cuda', dtype=torch.bfloat16)
    kc0 = torch.empty(1, 64, hk, d, device='cuda', dtype=torch.bfloat16)
    for kind in prefill_select.TORCH_KINDS:
        why = prefill_select.probe(kind, q0.device, torch.bfloat16, d, d, hq != hk, False)
        print(f'start-up check {kind}: {"passed" if why is None else why}')
    print(f'chosen (LMDP_PREFILL_ATTENTION={os.environ.get("LMDP_PREFILL_ATTENTION", "auto")}): '
          f'{prefill_select.choose(q0, kc0, kc0, None, None, 1)}')
    cases = [('4k', 4096, 0), ('16k', 16384, 0), ('32k', 32768, 0),
             ('4k after 12k', 4096, 12288), ('4k after 28k', 4096, 28672), ('2k after 14k', 2048, 14336)]
    header = ['case', 'chosen', 'triton', 'flash', 'cudnn', 'cudnn cold', 'sdpa', 'sdpa cudnn', 'sdpa flash']
    print(f'\nTFLOP/s (Hq={hq} Hk={hk} D={d} bf16 causal); gather = ms of the flash path\'s K/V copy')
    print(''.join(f'{h:>13}' for h in header) + f'{"gather ms":>11}')
    rows = []
    for name, q_len, hist in cases:
        kv_len = q_len + hist
        t = make_cache([kv_len], [q_len], hq, hk, d, 64, torch.bfloat16)
        q, kc, vc, bo, qsl, qs, kvs = t
        flops = 4 * (q_len * hist + q_len * (q_len + 1) / 2) * d * hq
        tf = lambda m: flops / m / 1e9  # noqa: E731
        out = torch.empty_like(q)
        row = {'case': name}

        def chosen():
            return prefill_select.prefill_attention(q, kc, vc, bo, qsl, qs, kvs, out, q_len, kv_len, kv_len,
                                                    scale)

        def kind_fn(kind):
            return lambda: prefill_select.run(kind, q, kc, vc, bo, qsl, qs, kvs, out, q_len, kv_len, kv_len, scale,
                                              None, True)
        row['chosen'] = tf(ms(chosen))
        row['triton'] = tf(ms(lambda: prefill_attention_fwd(q, kc, vc, bo, qsl, qs, kvs, out, q_len, scale=scale)))
        for kind in prefill_select.TORCH_KINDS:
            if prefill_select.probe(kind, q.device, q.dtype, d, d, hq != hk, False) is not None:
                row[kind] = float('nan')
                continue
            if kind == 'cudnn':
                row['cudnn cold'] = tf(cold_ms(kind_fn(kind)))
            row[kind] = tf(ms(kind_fn(kind)))
        # SDPA: without history the same computation; with history attention over all keys, no mask
        visible = flops if hist == 0 else 4 * q_len * kv_len * d * hq
        for key, backend in (('sdpa', None), ('sdpa cudnn', SDPBackend.CUDNN_ATTENTION),
                             ('sdpa flash', SDPBackend.FLASH_ATTENTION)):
            row[key] = visible / sdpa_ms(backend, hq, hk, q_len, kv_len, d, hist == 0) / 1e9
        row['gather ms'] = ms(lambda: torch_prefill.gather_packed_kv(kc, vc, bo, kvs, kv_len))
        print(''.join(f'{row[h]:>13.1f}' if isinstance(row.get(h), float) else f'{row.get(h, "-"):>13}'
                      for h in header) + f'{row["gather ms"]:>11.3f}')
        rows.append(row)
        t = q = kc = vc = out = None
        torch.cuda.empty_cache()
    for row in rows:
        print(json.dumps(row))


if __name__ == '__main__':
    main()
