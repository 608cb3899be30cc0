"""bfloat16 parity of each new port on one real layer shape per family, random weights built on the GPU.

    PYTHONPATH=$PWD python scripts/parity_real_shapes.py [--families qwen2 qwen3 phi3 gemma3_text] [--out DIR]

Shapes are released models' per-layer shapes (hidden size, heads, kv heads, head_dim, intermediate size,
vocabulary, rope settings) with fewer layers: Qwen2-1.5B and Qwen3-1.7B from `parity.random_checkpoint.REAL_SHAPES`,
and here Phi-4-mini (tied, partial rotary 3/4, LongRoPE with 48 factors) and Gemma-3-4B (head_dim 256, five
local layers then a global one). `parity.random_checkpoint.build_random` writes them (lmdp.tiny's init rules, on the
device). Each family's report goes to DIR/<family>/; a table is printed; exit status 0 when every family passes.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere, no install

import parity  # noqa: E402
from parity.random_checkpoint import REAL_SHAPES, build_random  # noqa: E402

_LONGROPE = dict(rope_type='longrope', rope_theta=10000.0, partial_rotary_factor=0.75,
                 short_factor=[1.0 + 0.02 * i for i in range(48)], long_factor=[1.0 + 0.6 * i for i in range(48)])
SHAPES = {
    'qwen2': REAL_SHAPES['qwen2'],
    'qwen3': REAL_SHAPES['qwen3'],
    'phi3': dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=24,
                 num_key_value_heads=8, vocab_size=200064, max_position_embeddings=131072,
                 original_max_position_embeddings=4096, sliding_window=262144, tie_word_embeddings=True,
                 rope_parameters=_LONGROPE),                                                    # Phi-4-mini
    'gemma3_text': dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256, vocab_size=262208, max_position_embeddings=131072,
                        query_pre_attn_scalar=256, sliding_window=1024,
                        layer_types=['sliding_attention'] * 5 + ['full_attention'],
                        rope_parameters={'sliding_attention': dict(rope_type='default', rope_theta=10000.0),
                                         'full_attention': dict(rope_type='linear', factor=8.0,
                                                                rope_theta=1000000.0)},
                        tie_word_embeddings=True),                                                # Gemma-3-4B
}

# transformers' Gemma 3 norms q/k in its [1, H, T, D] layout, which the harness cannot cut into token rows yet
TAP_OVERRIDES = {'gemma3_text': {'reference': {'q_norm': None, 'k_norm': None}}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--families', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument('--out', default=os.environ.get('OUT', 'out'), help='reports go to OUT/<family>/')
    parser.add_argument('--device', default='cuda')
    args = parser.parse_args(argv)
    rows, status = [], 0
    for family in args.families:
        with tempfile.TemporaryDirectory(prefix=f'real-{family}-') as tmp:
            start = time.perf_counter()
            build_random(family, tmp, device=args.device, dtype='bfloat16', **SHAPES[family])
            built = time.perf_counter() - start
            report = parity.compare(tmp, dtype='bfloat16', device=args.device, tap_overrides=TAP_OVERRIDES.get(family))
            report.save(os.path.join(args.out, family))
            worst = max((t for t in report.main_taps if t.floor is not None and t.port is not None),
                        key=lambda t: t.port.rel_l2 / max(t.floor.rel_l2, 1e-30), default=None)
            ratio = f'{worst.port.rel_l2 / max(worst.floor.rel_l2, 1e-30):.2f}x floor at {worst.phase} {worst.tap}' \
                if worst else '-'
            rows.append((family, 'PASS' if report.passed else 'FAIL', report.divergence_line(), ratio,
                         f'{built:.0f} s build, {time.perf_counter() - start - built:.0f} s parity'))
            print(report.summary(), flush=True)
            status |= not report.passed
    print('\nfamily        verdict  first divergence / worst tap / time')
    for family, verdict, line, ratio, seconds in rows:
        print(f'{family:13s} {verdict:8s} {line}; worst {ratio}; {seconds}')
    return status


if __name__ == '__main__':
    sys.exit(main())
