"""The `lmdp` command line: check, make-tiny, quantize, compare, parity, generate, bench, serve."""
import argparse
import logging
import sys
import tempfile


def _int_list(text: str):
    return [int(x) for x in text.split(',') if x.strip()]


def cmd_check(args) -> int:
    from .check_env import check_model
    report = check_model(args.model_path, trust_remote_code=args.trust_remote_code,
                         custom_module_map=args.custom_module_map, model_impl=args.model_impl, tp=args.tp)
    print(report)
    return 0 if report.ok else 1


def cmd_make_tiny(args) -> int:
    from .tiny import make_tiny
    overrides = {}
    if args.layers is not None:
        overrides['num_hidden_layers'] = args.layers
    path = make_tiny(args.model_type, args.out_dir, seed=args.seed, dtype=args.dtype,
                     max_shard_size=args.max_shard_size, quantize=args.quantize, **overrides)
    print(f'wrote a tiny {args.model_type} checkpoint to {path}')
    return 0


def cmd_quantize(args) -> int:
    from .quantize import quantize_checkpoint
    record = quantize_checkpoint(args.src, args.dst, 'fp8-block' if args.fp8_block else 'awq',
                                 group_size=args.group_size, device=args.device)
    print(f"wrote {args.dst}: {record['quantized_tensors']} linear weights quantised ({record['method']}), "
          f"{record['bytes'] / 2**20:.1f} MiB of tensors")
    return 0


def cmd_compare(args) -> int:
    from parity import compare_logits
    from parity.options import check_options
    check_options(model_path=args.model_path, dtype=args.dtype, device=args.device, decode_steps=args.decode_steps,
                  block_size=args.block_size, custom_module_map=args.custom_module_map)
    if not args.prompt_lengths or min(args.prompt_lengths) < 1:
        raise ValueError(f'--prompt-lengths {",".join(map(str, args.prompt_lengths))}: give one or more lengths, '
                         'each 1 or more (e.g. 5,17,64)')
    with tempfile.TemporaryDirectory(prefix='lmdp-tiny-') as tmp:
        model_path = args.model_path
        if model_path is None:
            from .tiny import make_tiny
            model_path = str(make_tiny('llama', tmp))
            print(f'no model given: built the tiny llama in {model_path}')
        report = compare_logits(model_path, prompt_lengths=args.prompt_lengths, decode_steps=args.decode_steps,
                                dtype=args.dtype, device=args.device, block_size=args.block_size,
                                custom_module_map=args.custom_module_map)
        print(report.summary())
    return 0 if report.passed else 1


def cmd_parity(args) -> int:
    """The pytest parity suite: same options, output and exit status as `pytest parity --model PATH ...`;
    arguments after `--` go to pytest itself (-x, -k layers.0, -v, ...)."""
    import os
    import subprocess

    import parity
    from parity.options import OPTIONS
    if args.model is not None and args.model_path is not None and args.model != args.model_path:
        raise ValueError(f'two checkpoints given ({args.model} and --model {args.model_path}); pass one')
    args.model_path = args.model_path or args.model
    # a fresh interpreter: pytest must import lmdp and parity itself to load its plugin cleanly
    argv = [sys.executable, '-m', 'pytest', os.path.dirname(os.path.abspath(parity.__file__)), '-p',
            'no:cacheprovider']
    for option in OPTIONS:
        value = getattr(args, option.keyword, option.default)
        if option.flag and value:
            argv.append(option.flags[0])
        elif not option.flag and value is not option.default:    # given on the command line
            argv += [option.flags[0], value]
    return subprocess.call(argv + list(args.pytest_args))


def _tp_option(p):
    p.add_argument('--tp', type=int, default=1, metavar='N', help='tensor-parallel ranks (one process each; see the '
                   'README for torchrun across hosts)')


def _module_map_option(p):
    p.add_argument('--custom-module-map', '--module-map', dest='custom_module_map', metavar='FILE',
                   help='a .py file defining MODULE_MAP entries to add or override (the port to use)')


def cmd_generate(args) -> int:
    from .api import pipeline
    from .messages import GenerationConfig, PytorchEngineConfig
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           random_seed=args.seed, ignore_eos=args.ignore_eos)
    config = PytorchEngineConfig(dtype=args.dtype, device_type=args.device, session_len=args.session_len,
                                 custom_module_map=args.custom_module_map, tp=args.tp)
    response = None
    with pipeline(args.model_path, backend_config=config) as pipe:     # closing it ends the other ranks (--tp)
        for piece in pipe.stream_infer([args.prompt], gen, do_preprocess=not args.no_chat_template):
            print(piece.text, end='', flush=True)
            response = piece
    print()
    if response.finish_reason == 'error':
        print(f'lmdp generate: error: {response.error}', file=sys.stderr)
        return 2
    return 0


def cmd_bench(args) -> int:
    from .bench.__main__ import main as bench_main
    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='lmdp', description='lmdp: port HF models to a paged engine and prove '
                                     'they compute what transformers computes')
    parser.add_argument('-v', '--verbose', action='store_true', help='log progress')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('check', help='can lmdp load this checkpoint? (no weights are read)')
    p.add_argument('model_path')
    p.add_argument('--trust-remote-code', action='store_true')
    _module_map_option(p)
    p.add_argument('--model-impl', default='auto', choices=['auto', 'lmdp', 'transformers'],
                   help='auto: the lmdp port if registered, else the transformers fallback')
    _tp_option(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser('make-tiny', help='write a tiny random-weight checkpoint with transformers')
    p.add_argument('model_type', help='llama, gemma, gemma2, ...')
    p.add_argument('out_dir')
    p.add_argument('--layers', type=int, help='number of decoder layers')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    p.add_argument('--max-shard-size', help='e.g. 200KB, to write a sharded checkpoint')
    p.add_argument('--quantize', choices=['fp8-block', 'awq'],
                   help='write it quantised (round-to-nearest), the unquantised original in OUT_DIR/unquantized')
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser('quantize', help="rewrite an unquantised checkpoint in transformers' FP8 (128x128 block) or "
                       'AWQ 4-bit GEMM format, round-to-nearest, no calibration data')
    p.add_argument('src')
    p.add_argument('dst')
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument('--fp8-block', action='store_true', help='float8_e4m3fn weights, weight_scale_inv per 128x128')
    how.add_argument('--awq', action='store_true', help='4-bit with zero points, qweight/qzeros/scales')
    p.add_argument('--group-size', type=int, default=128, help='AWQ group of input features (16, 32, 64, 128)')
    p.add_argument('--device', help='where to quantise (default: cuda if present)')
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser('compare', help='logits of lmdp vs transformers (packed prefill + paged decode)')
    p.add_argument('model_path', nargs='?', help='checkpoint folder (default: a fresh tiny llama)')
    p.add_argument('--dtype', default='float32')
    p.add_argument('--device', default='cpu')
    p.add_argument('--prompt-lengths', type=_int_list, default=[5, 17, 64], help='comma-separated')
    p.add_argument('--decode-steps', type=int, default=8)
    p.add_argument('--block-size', type=int, default=16)
    _module_map_option(p)
    p.set_defaults(func=cmd_compare)

    from parity.options import add_options
    p = sub.add_parser('parity', help='the layer-by-layer parity suite (pytest parity) on a checkpoint; '
                       'arguments after -- go to pytest', description='Runs `pytest parity` (in a fresh process): '
                       'one item per tap and phase, a table, the first divergence; exit status as pytest\'s.',
                       epilog='arguments after -- go to pytest: lmdp parity ./llama -- -x -k layers.0')
    p.add_argument('model', nargs='?', metavar='MODEL', help='checkpoint folder, as --model (default: a fresh tiny '
                   'llama)')
    add_options(p.add_argument, typed=False)   # pytest converts and checks them
    p.set_defaults(func=cmd_parity, pytest_args=[])

    p = sub.add_parser('generate', help='continue a prompt with the engine, printing the text as it comes')
    p.add_argument('model_path')
    p.add_argument('prompt')
    p.add_argument('--max-new-tokens', type=int, default=128)
    p.add_argument('--temperature', type=float, default=0.0, help='0 (the default): greedy')
    p.add_argument('--top-k', type=int, default=50)
    p.add_argument('--top-p', type=float, default=1.0)
    p.add_argument('--seed', type=int)
    p.add_argument('--ignore-eos', action='store_true')
    p.add_argument('--no-chat-template', action='store_true', help='send the prompt as raw text')
    p.add_argument('--dtype', default='auto')
    p.add_argument('--device', default='auto', choices=['auto', 'cuda', 'cpu'])
    p.add_argument('--session-len', type=int)
    _module_map_option(p)
    _tp_option(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser('bench', help='speed on real shapes vs the HBM roofline and transformers (GPU); '
                       'arguments as for python -m lmdp.bench', add_help=False)
    p.add_argument('bench_args', nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    from .serve.cli import add_parser as add_serve_parser
    add_serve_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['bench']:                      # its own parser: `lmdp bench --help` lists its options
        from .bench.__main__ import main as bench_main
        return bench_main(argv[1:])
    pytest_args = []
    if '--' in argv and 'parity' in argv[:argv.index('--')]:    # the rest is pytest's own command line
        cut = argv.index('--')
        argv, pytest_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if pytest_args:
        args.pytest_args = pytest_args
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='%(levelname)s %(message)s')
    try:
        return args.func(args)
    except ValueError as e:
        message = str(e)
        if hasattr(e, 'command_line'):   # parity.options.OptionError: name the flag, not the API keyword
            message = e.command_line() if e.keyword != 'model_path' else f'{e.value}: {e.problem}'
        print(f'lmdp {args.command}: error: {message}', file=sys.stderr)
        return 2
    except (FileNotFoundError, NotImplementedError) as e:
        print(f'lmdp {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
