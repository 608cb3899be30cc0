"""Parity of the mixture-of-experts ports (Mixtral, Qwen2-MoE, Qwen3-MoE) on the GPU in bfloat16: each family's
tiny preset, and a checkpoint with the real layer shapes (two layers, the tiny vocabulary), with the routers'
agreement per layer beside the taps.

    PYTHONPATH=$PWD python scripts/moe_parity.py                  # cuda, bfloat16, every family, both sizes
    PYTHONPATH=$PWD python scripts/moe_parity.py --families qwen3_moe --sizes tiny --device cpu --dtype float32

Real shapes: Mixtral-8x7B (hidden 4096, 8 experts of 14336, top-2, 32/8 heads), Qwen1.5-MoE-A2.7B (hidden 2048,
60 experts of 1408, top-4, shared expert 5632, 16 heads), Qwen3-30B-A3B (hidden 2048, 128 experts of 768, top-8,
32/4 heads of 128). Prints each report's table and routing summary; writes $OUT/moe_parity.json; exit status 0
when every run passes.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere, no install

REAL = {
    'mixtral': dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2, sliding_window=None, rope_theta=1e6),
    'qwen2_moe': dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, intermediate_size=5632, num_experts=60,
                      num_experts_per_tok=4, norm_topk_prob=False, mlp_only_layers=[], rope_theta=1e6),
    'qwen3_moe': dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                      moe_intermediate_size=768, intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
                      norm_topk_prob=True, rope_theta=1e6),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--families', nargs='*', default=sorted(REAL), choices=sorted(REAL))
    parser.add_argument('--sizes', nargs='*', default=['tiny', 'real'], choices=['tiny', 'real'])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--dtype', default='bfloat16')
    parser.add_argument('--layers', type=int, default=2, help='decoder layers of the real-shaped checkpoints')
    parser.add_argument('--json', default=os.path.join(os.environ.get('OUT', '.'), 'moe_parity.json'))
    args = parser.parse_args(argv)

    import parity
    from lmdp.tiny import make_tiny
    from parity.routing import routing_parity
    results, ok = [], True
    with tempfile.TemporaryDirectory(prefix='moe-parity-') as tmp:
        for family in args.families:
            for size in args.sizes:
                overrides = dict(REAL[family], num_hidden_layers=args.layers) if size == 'real' else {}
                start = time.perf_counter()
                path = make_tiny(family, os.path.join(tmp, f'{family}-{size}'), dtype=args.dtype, **overrides)
                built = time.perf_counter() - start
                report = parity.compare(str(path), dtype=args.dtype, device=args.device, prompts=3, decode_steps=4)
                routing = routing_parity(str(path), dtype=args.dtype, device=args.device, prompts=3, decode_steps=4)
                print(f'\n===== {family} {size} ({built:.0f} s to build) =====')
                print(report.summary())
                for phase, r in routing.items():
                    print(r.summary())
                fd = report.first_divergence
                results.append(dict(family=family, size=size, passed=report.passed,
                                    first_divergence=None if fd is None else f'{fd.phase} {fd.tap}',
                                    routing={phase: dict(passed=r.passed, agreement=r.agreement(),
                                                         near_tie=sum(len(x.flips) - len(x.hard_flips)
                                                                      for x in r.layers),
                                                         hard=sum(len(x.hard_flips) for x in r.layers))
                                             for phase, r in routing.items()},
                                    seconds=round(time.perf_counter() - start, 1)))
                ok &= report.passed
                print(json.dumps(results[-1]), flush=True)
    with open(args.json, 'w') as f:
        json.dump(results, f, indent=1)
    print('\n' + '\n'.join(f"{r['family']:>10} {r['size']:>5}: {'PASS' if r['passed'] else 'FAIL'}"
                           f"  first divergence {r['first_divergence']}  routing "
                           + ', '.join(f"{ph} {min(v['agreement'].values(), default=1):.1%} min agreement, "
                                       f"{v['near_tie']} near-tie / {v['hard']} hard flips"
                                       for ph, v in r['routing'].items()) for r in results))
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
