"""`python -m lmdp.bench` / `lmdp bench`: lmdp's speed on real shapes, framed by the roofline and baselines.

For each shape: write (or reuse) a random-weight bf16 checkpoint, measure the copy bandwidth, lmdp's batch-1
decode and 256-request throughput (with time to first token and inter-token latency p50/p99 from a streamed run
of the same requests, and where the run's time went: prefill and decode steps), time to first token and decode
rate at long context (4k/16k/32k), and transformers' eager batch-1 decode; print a table and write JSON.
"""
import argparse
import json
import os
import sys

from .. import envs
from .checkpoint import QUANT_METHODS, ensure_checkpoint, ensure_quantized, step_bytes
from .long_context import LENGTHS, long_context_row
from .shapes import SHAPES, with_layers


def run(args) -> dict:
    import torch

    from .long_context import long_context_figures
    from .measure import copy_bandwidth, hf_batch1_decode, lmdp_figures
    if not torch.cuda.is_available():
        raise SystemExit('lmdp bench needs a CUDA device')
    bandwidth = copy_bandwidth()
    results = {'device': torch.cuda.get_device_name(0), 'copy_bandwidth_TBps': round(bandwidth / 1e12, 3),
               'shapes': {}}
    print(f"{results['device']}: device copy {bandwidth / 1e12:.2f} TB/s", flush=True)
    pairs = [(s, q) for s in args.shapes for q in args.quant]
    for shape_name, quant in dict.fromkeys(pairs):        # each once, in the order asked
        shape = with_layers(SHAPES[shape_name], args.layers)
        path = ensure_checkpoint(shape, args.workdir)
        name, step = shape.name, shape.decode_weight_bytes()
        if quant != 'bf16':
            bf16_path, path, name = path, ensure_quantized(path, quant, device='cuda'), f'{name}-{quant}'
            # the quantised copy's share of the bf16 bytes; for a mixture of experts that share stands in for the
            # active experts' (every expert is quantised alike)
            step = step * step_bytes(path) / step_bytes(bf16_path)
        roofline = bandwidth / step
        fig = {'roofline_tok_s': round(roofline, 1), 'decode_weight_GB': round(step / 1e9, 2)}
        impls = ['lmdp', 'transformers'] if args.model_impl == 'both' else [args.model_impl]
        for impl in impls:
            figures = lmdp_figures(path, throughput=not args.no_throughput, eager_mode=args.eager, model_impl=impl,
                                   mixed_prefill=MIXED_PREFILL[args.mixed_prefill],
                                   max_prefill_token_num=args.max_prefill_token_num)
            figures['bs1_roofline_fraction'] = round(figures['bs1_decode_tok_s'] / roofline, 3)
            if impl == impls[0]:
                fig.update(figures)          # the first implementation's figures are the shape's headline
            if len(impls) > 1:
                fig.setdefault('by_model_impl', {})[impl] = figures
            print(name, impl, figures, flush=True)
        if args.long_context:
            fig['long_context'] = long_context_figures(path, args.long_context)
            print(name, 'long context', fig['long_context'], flush=True)
        if not args.no_hf:
            fig['hf_bs1_decode_tok_s'] = round(hf_batch1_decode(path, args.hf_new_tokens), 1)
        if len(impls) > 1:
            fig['fallback_vs_port'] = fallback_ratios(fig)
        results['shapes'][name] = fig
    return results


#: issue 14's acceptance: the transformers fallback against the native port and transformers' eager generate
FALLBACK_TARGETS = {'bs1_vs_port': 0.6, 'throughput_vs_port': 0.8, 'bs1_vs_hf_eager': 5.0}


def fallback_ratios(fig: dict) -> dict:
    port, fallback = fig['by_model_impl']['lmdp'], fig['by_model_impl']['transformers']
    ratios = {'bs1_vs_port': fallback['bs1_decode_tok_s'] / port['bs1_decode_tok_s']}
    if 'tp_out_tok_s' in port and 'tp_out_tok_s' in fallback:
        ratios['throughput_vs_port'] = fallback['tp_out_tok_s'] / port['tp_out_tok_s']
    if fig.get('hf_bs1_decode_tok_s'):
        ratios['bs1_vs_hf_eager'] = fallback['bs1_decode_tok_s'] / fig['hf_bs1_decode_tok_s']
    return {k: {'ratio': round(v, 3), 'target': FALLBACK_TARGETS[k], 'met': v >= FALLBACK_TARGETS[k]}
            for k, v in ratios.items()}


#: --mixed-prefill: the scheduling policies the 256-request run is measured under, the first one the headline
MIXED_PREFILL = {'on': (True,), 'off': (False,), 'both': (False, True)}
NAN = float('nan')


def _latency_cells(f: dict) -> str:
    return ' '.join(f"{f.get(k, NAN):>9.1f}" for k in ('tp_ttft_p50_ms', 'tp_ttft_p99_ms', 'tp_itl_p50_ms',
                                                       'tp_itl_p99_ms'))


def table(results: dict) -> str:
    lines = [f"{results['device']}, device copy {results['copy_bandwidth_TBps']:.2f} TB/s; 256 requests: TTFT and "
             'ITL in ms, from a streamed run',
             f"{'shape':>5} {'bs1 tok/s':>10} {'roofline':>9} {'fraction':>9} {'HF bs1':>7} {'256-req out tok/s':>18} "
             f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9}"]
    for name, f in results['shapes'].items():
        lines.append(f"{name:>5} {f['bs1_decode_tok_s']:>10.1f} {f['roofline_tok_s']:>9.1f} "
                     f"{f['bs1_roofline_fraction']:>9.1%} {f.get('hf_bs1_decode_tok_s', NAN):>7.1f} "
                     f"{f.get('tp_out_tok_s', NAN):>18.1f} {_latency_cells(f)}")
    for name, f in results['shapes'].items():
        for policy, g in f.get('tp_by_mixed_prefill', {}).items():
            lines.append(f"{name:>5} mixed_prefill {policy:<3} {'':>20} {g['tp_out_tok_s']:>18.1f} "
                         f"{_latency_cells(g)}")
    for name, f in results['shapes'].items():
        if f.get('long_context'):
            lines.append(long_context_row(name, f['long_context']))
    for name, f in results['shapes'].items():
        for key, r in f.get('fallback_vs_port', {}).items():
            lines.append(f"{name:>5} transformers fallback {key}: {r['ratio']:.3f}x (target >= {r['target']}x) "
                         f"{'met' if r['met'] else 'NOT MET'}")
    return '\n'.join(lines)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'expected a whole number >= 1, got {text!r}')
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='lmdp bench', description=__doc__)
    parser.add_argument('shapes', nargs='*', default=['1b', '8b'], choices=sorted(SHAPES))
    parser.add_argument('--workdir', default='/tmp', help='where the random checkpoints are written')
    parser.add_argument('--layers', type=_positive, default=None,
                        help="decoder layers, fewer than the shape's (same layer shape; the checkpoint folder and "
                             "the results are named SHAPE-Nl): a quicker run, e.g. `moe --layers 8` in a shared call")
    parser.add_argument('--no-throughput', action='store_true', help='skip the 256-request throughput run')
    parser.add_argument('--no-hf', action='store_true', help='skip the transformers baseline')
    parser.add_argument('--hf-new-tokens', type=int, default=256)
    parser.add_argument('--eager', action='store_true', help='eager_mode=True (no CUDA graphs)')
    parser.add_argument('--mixed-prefill', default='off', choices=sorted(MIXED_PREFILL),
                        help='the 256-request run prefill first (off, the engine default), with prompt chunks riding '
                             'along with the decodes (on), or both on the same engine (off first, the headline)')
    parser.add_argument('--model-impl', default='auto', choices=['auto', 'lmdp', 'transformers', 'both'],
                        help="which implementation serves the checkpoint: its lmdp port, the transformers fallback "
                             "(model_impl='transformers'), or both in one call with the fallback's ratios to the "
                             'port and to transformers\' eager generate')
    parser.add_argument('--max-prefill-token-num', type=int, default=4096,
                        help='prompt tokens a step may take (a mixed step: beside its decodes); smaller makes mixed '
                             'steps shorter (inter-token latency) and the prefill of a burst longer (first token)')
    parser.add_argument('--quant', nargs='+', default=['bf16'], choices=['bf16', *sorted(QUANT_METHODS)],
                        help='the formats to measure each shape in: the bf16 checkpoint, and/or copies of it '
                             'quantised by lmdp quantize (fp8: 128x128 block scales; awq: 4-bit, group 128), '
                             'reported as SHAPE-fp8 / SHAPE-awq with rooflines from their bytes')
    parser.add_argument('--long-context', type=_positive, nargs='*', default=list(LENGTHS), metavar='N',
                        help='prompt lengths at which to time the first token and the decode rate (default '
                             f"{' '.join(map(str, LENGTHS))}; none: skip)")
    parser.add_argument('--json', default=os.path.join(envs.OUT, 'lmdp_bench.json'))
    args = parser.parse_args(argv)
    results = run(args)
    with open(args.json, 'w') as f:
        json.dump(results, f, indent=1)
    print('RESULT ' + json.dumps(results))
    print(table(results))
    return 0


if __name__ == '__main__':
    sys.exit(main())
