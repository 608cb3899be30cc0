"""The harness judging itself: the correct Llama port must pass, and every planted bug must fail, at its tap.

    PYTHONPATH=$PWD python -m parity.selftest --device cuda --dtype bfloat16            # GPU acceptance table
    PYTHONPATH=$PWD python -m parity.selftest --device cpu --dtype float32 --shape tiny

Builds a random-weight llama (`--shape tiny|small|1b`, or `--model PATH`), runs transformers once, then the correct
port and each port of `parity.planted_bugs` against it, and prints one row per port. Exit status 0 when the correct
port passes the rule and every bug fails it at the tap it was planted to break.
"""
import argparse
import sys
import tempfile
import time

import torch

from .noise_floor import MULTIPLE
from .planted_bugs import PLANTED_BUGS
from .random_checkpoint import LLAMA_1B_SHAPE, SMALL_SHAPE, build_random_llama
from .run import compare, resolve_device, run_references


def build_model(shape: str, directory: str, device: str, dtype: str) -> str:
    ckpt_dtype = 'float32' if dtype in ('float32', 'auto') else dtype
    if shape == 'tiny':
        from lmdp.tiny import make_tiny
        return str(make_tiny('llama', directory, dtype=ckpt_dtype))
    dims = {'small': SMALL_SHAPE, '1b': LLAMA_1B_SHAPE}[shape]
    return str(build_random_llama(directory, device=device, dtype=ckpt_dtype, **dims))


def _where(result) -> str:
    return '-' if result is None else f'{result.phase} {result.tap}'


def _worst_floor_ratio(report) -> str:
    ratios = [t.port.rel_l2 / t.floor.rel_l2 for t in report.main_taps
              if t.port is not None and t.floor is not None and t.floor.rel_l2 > 0]
    return f'{max(ratios):.2f}' if ratios else '-'


def run_selftest(model_path: str, dtype: str, device: str, prompts=3, decode_steps: int = 4, report_dir=None):
    """Rows of (name, expected, verdict, first divergence, err/tol there, worst err/floor, ok) and all ok."""
    start = time.perf_counter()
    refs = run_references(model_path, dtype=dtype, device=device, prompts=prompts, decode_steps=decode_steps)
    rows, all_ok = [], True
    for bug in [None] + PLANTED_BUGS:
        name = 'correct port' if bug is None else bug.name
        report = compare(model_path, references=refs, custom_module_map=None if bug is None else bug.module_map())
        if report_dir:
            report.save(f'{report_dir}/{name.replace(" ", "_")}')
        first = report.first_divergence
        if bug is None:
            expected = 'PASS'
            ok = report.passed
            ratio = max(t.ratio for t in report.main_taps)
        else:
            expected = f'FAIL at {bug.phase} {bug.tap}'
            ok = (not report.passed and first is not None and (first.phase, first.tap) == (bug.phase, bug.tap))
            ratio = first.ratio if first is not None else float('nan')
        all_ok &= ok
        rows.append((name, expected, 'PASS' if report.passed else 'FAIL', _where(first), f'{ratio:.2f}',
                     _worst_floor_ratio(report), 'yes' if ok else 'NO'))
    return rows, all_ok, time.perf_counter() - start


def format_table(rows) -> str:
    header = ('port', 'expected', 'verdict', 'first divergence', 'err/tol', 'max err/floor', 'as expected')
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: '  '.join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return '\n'.join([line(header), line(['-' * w for w in widths])] + [line(r) for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m parity.selftest', description=__doc__.split('\n')[0])
    parser.add_argument('--model', help='checkpoint folder (default: build a random llama of --shape)')
    parser.add_argument('--shape', default='small', choices=['tiny', 'small', '1b'])
    parser.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16', 'float16'])
    parser.add_argument('--device', default='auto')
    parser.add_argument('--prompts', default='3')
    parser.add_argument('--decode-steps', type=int, default=4)
    parser.add_argument('--report', help='write each port\'s report.json / report.html under this folder')
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix='parity-selftest-') as tmp:
        path = args.model or build_model(args.shape, tmp, device, args.dtype)
        rows, ok, seconds = run_selftest(path, args.dtype, device, args.prompts, args.decode_steps, args.report)
    card = torch.cuda.get_device_name(torch.device(device)) if device.startswith('cuda') else 'cpu'
    print(f'parity self-test: {path if args.model else args.shape + " random llama"}, {args.dtype} on {device} '
          f'({card}), rule multiple {MULTIPLE:g}')
    print(format_table(rows))
    print(f'{"OK" if ok else "FAILED"}: the correct port {"passes" if rows[0][-1] == "yes" else "does NOT pass"}; '
          f'{sum(r[-1] == "yes" for r in rows[1:])}/{len(rows) - 1} planted bugs fail at their tap [{seconds:.1f} s]')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
