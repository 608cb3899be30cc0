"""bfloat16 parity of each new port on one real layer shape per family, random weights built on the GPU.

    PYTHONPATH=$PWD python scripts/parity_real_shapes.py [--families qwen2 qwen3 phi3 gemma3_text] [--out DIR]

Shapes are the released models' per-layer shapes (hidden size, heads, kv heads, head_dim, intermediate size,
vocabulary, rope settings) with fewer layers, so that a run fits one call: Qwen2.5-7B, Qwen3-4B (tied, head_dim
128 != 2560/32), Phi-4-mini (tied, partial rotary 3/4, LongRoPE with 48 factors), Gemma-3-4B (head_dim 256, five
local layers then a global one). Weights follow `lmdp.tiny`'s order-one init rules. Each family's report goes to
DIR/<family>/; a table is printed; exit status 0 when every family passes.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere, no install

import torch  # noqa: E402
from torch import nn  # noqa: E402

import parity  # noqa: E402
from lmdp.tiny import NORM_NOISE, RESIDUAL_OUT_GAIN, tiny_config  # noqa: E402

_LONGROPE = dict(rope_type='longrope', rope_theta=10000.0, partial_rotary_factor=0.75,
                 short_factor=[1.0 + 0.02 * i for i in range(48)], long_factor=[1.0 + 0.6 * i for i in range(48)])
SHAPES = {
    'qwen2': dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=4, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                  use_sliding_window=False, sliding_window=None, max_window_layers=28, tie_word_embeddings=False,
                  rope_parameters=dict(rope_type='default', rope_theta=1000000.0)),
    'qwen3': dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=4, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                  tie_word_embeddings=True, rope_parameters=dict(rope_type='default', rope_theta=1000000.0)),
    'phi3': dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=24,
                 num_key_value_heads=8, vocab_size=200064, max_position_embeddings=131072,
                 original_max_position_embeddings=4096, sliding_window=262144, tie_word_embeddings=True,
                 rope_parameters=_LONGROPE),
    'gemma3_text': dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=6, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=256, vocab_size=262208, max_position_embeddings=131072,
                        query_pre_attn_scalar=256, sliding_window=1024,
                        layer_types=['sliding_attention'] * 5 + ['full_attention'],
                        rope_parameters={'sliding_attention': dict(rope_type='default', rope_theta=10000.0),
                                         'full_attention': dict(rope_type='linear', factor=8.0,
                                                                rope_theta=1000000.0)},
                        tie_word_embeddings=True),
}


@torch.no_grad()
def build_random(family: str, out_dir: str, device: str, dtype=torch.bfloat16) -> str:
    """A random-weight checkpoint of `family` at its real shape, initialised on `device` (lmdp.tiny's rules)."""
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(family, **SHAPES[family])
    with torch.device('meta'):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model = model.to_empty(device=device)
    model.tie_weights()   # to_empty gives every parameter its own storage: tie lm_head to the embedding again
    gen = torch.Generator(device=device).manual_seed(0)
    # Gemma's norms multiply by (1 + w): their identity is 0, everyone else's 1
    identity = 0.0 if family.startswith('gemma') else 1.0
    emb = model.get_input_embeddings()
    emb.weight.normal_(0.0, 1.0 / float(getattr(emb, 'scalar_embed_scale', 1.0)), generator=gen)
    done = {id(emb.weight)}
    if cfg.tie_word_embeddings:   # a zero-mean random gain on the final norm (see lmdp.tiny.reinit_weights)
        model.base_model.norm.weight.normal_(identity - 1.0, 1.0, generator=gen)
        done.add(id(model.base_model.norm.weight))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in done:
            gain = RESIDUAL_OUT_GAIN if name.rsplit('.', 1)[-1] in ('o_proj', 'down_proj') else 1.0
            module.weight.normal_(0.0, gain * module.in_features**-0.5, generator=gen)
            done.add(id(module.weight))
            if module.bias is not None:
                module.bias.normal_(0.0, 0.1, generator=gen)
                done.add(id(module.bias))
    for name, param in model.named_parameters():
        if id(param) in done:
            continue
        if param.ndim != 1 or 'norm' not in name:
            raise RuntimeError(f'no init rule for {name} {tuple(param.shape)}')
        param.normal_(identity, NORM_NOISE, generator=gen)
    model.to(dtype)
    model.config.dtype = str(dtype).replace('torch.', '')
    from lmdp.quiet import quiet_transformers
    with quiet_transformers():
        model.save_pretrained(out_dir)
    del model
    torch.cuda.empty_cache()
    return out_dir


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
            build_random(family, tmp, args.device)
            built = time.perf_counter() - start
            report = parity.compare(tmp, dtype='bfloat16', device=args.device)
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
