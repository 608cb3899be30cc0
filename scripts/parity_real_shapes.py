"""Parity of ports on their tiny presets and on one real layer shape per family, with the routers of a mixture of
experts compared beside the taps (what `pytest parity` runs, for several checkpoints in one process).

    PYTHONPATH=$PWD python scripts/parity_real_shapes.py                       # cuda, bfloat16, every new port
    PYTHONPATH=$PWD python scripts/parity_real_shapes.py --families qwen3_moe --sizes tiny --device cpu \
        --dtype float32 --out /tmp/p

Real shapes are `parity.random_checkpoint.REAL_SHAPES` (released models' per-layer shapes, few layers), written
with random weights on the device by `build_random`; tiny ones by `lmdp make-tiny`. Each report goes to
OUT/<family>-<size>/ (report.json, report.html) with a one-line summary.json; a table is printed last; exit
status 0 when every run passes.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # run from anywhere, no install

from parity.random_checkpoint import REAL_SHAPES  # noqa: E402

# the ports issue 13 added
NEW_PORTS = ['qwen2', 'qwen3', 'phi3', 'gemma3_text', 'mixtral', 'qwen2_moe', 'qwen3_moe']


def build(family: str, size: str, directory: str, device: str, dtype: str, layers=None) -> str:
    if size == 'tiny':
        from lmdp.tiny import make_tiny
        return str(make_tiny(family, directory))
    from parity.random_checkpoint import build_random
    shape = dict(REAL_SHAPES[family])
    if layers:
        shape['num_hidden_layers'] = layers
        if 'layer_types' in shape:        # keep the pattern's last layers (Gemma 3: its global layer)
            shape['layer_types'] = shape['layer_types'][-layers:]
    ckpt_dtype = 'float32' if dtype == 'float32' else 'bfloat16'
    return str(build_random(family, directory, device=device, dtype=ckpt_dtype, **shape))


def worst_tap(report) -> str:
    """The verdict tap closest to its tolerance: 'NN% of tol at phase tap'."""
    taps = [t for t in report.main_taps if t.port is not None]
    if not taps:
        return '-'
    t = max(taps, key=lambda t: t.ratio)
    return f'{t.ratio:.0%} of tol at {t.phase} {t.tap}'


def routing_line(report) -> str:
    checks = [c for c in report.checks if c.name == 'routing']
    if not checks:
        return ''
    parts = []
    for c in checks:
        layers = (c.data or {}).get('layers', [])
        flips = sum(len(x['flips']) for x in layers)
        hard = sum(not f['near_tie'] for x in layers for f in x['flips'])
        low = min((x['agreement'] for x in layers), default=float('nan'))
        parts.append(f'{c.phase} {"ok" if c.passed else "FAIL"} min {low:.1%} ({flips - hard} near-tie, {hard} hard)')
    return 'routing ' + '; '.join(parts)


def run_one(family: str, size: str, args) -> dict:
    import parity
    out = os.path.join(args.out, f'{family}-{size}')
    with tempfile.TemporaryDirectory(prefix=f'parity-{family}-{size}-') as tmp:
        start = time.perf_counter()
        path = build(family, size, tmp, args.device, args.dtype, args.layers if size == 'real' else None)
        built = time.perf_counter() - start
        report = parity.compare(path, dtype=args.dtype, device=args.device, prompts=args.prompts,
                                decode_steps=args.decode_steps)
        report.save(out)
    print(report.summary(), flush=True)
    row = dict(family=family, size=size, passed=report.passed, divergence=report.divergence_line(),
               worst=worst_tap(report), routing=routing_line(report), build_s=round(built, 1),
               parity_s=round(time.perf_counter() - start - built, 1),
               failed_checks=[c.id for c in report.checks if c.status == 'failed'])
    return row


def table(rows) -> str:
    lines = [f"{'family':12s} {'size':5s} verdict  first divergence / worst tap / routing / time"]
    for r in rows:
        failed = f" failed: {', '.join(r['failed_checks'])};" if r['failed_checks'] else ''
        lines.append(f"{r['family']:12s} {r['size']:5s} {'PASS' if r['passed'] else 'FAIL':8s} {r['divergence']};"
                     f"{failed} worst {r['worst']}; {r['routing'] + '; ' if r['routing'] else ''}"
                     f"{r['build_s']:.0f} s build, {r['parity_s']:.0f} s parity")
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--families', nargs='+', default=NEW_PORTS, choices=sorted(REAL_SHAPES))
    parser.add_argument('--sizes', nargs='+', default=['tiny', 'real'], choices=['tiny', 'real'])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
    parser.add_argument('--layers', type=int, default=None, help='decoder layers of the real shapes (default: '
                        "REAL_SHAPES')")
    parser.add_argument('--prompts', type=int, default=3)
    parser.add_argument('--decode-steps', type=int, default=4)
    parser.add_argument('--out', default=os.path.join(os.environ.get('OUT', 'out'), 'parity'),
                        help='reports go to OUT/<family>-<size>/')
    args = parser.parse_args(argv)
    rows = []
    # every family's tiny before any real shape: a run cut short by its time limit still covers each family
    for size in args.sizes:
        for family in args.families:
            try:
                rows.append(run_one(family, size, args))
            except Exception as e:  # noqa: BLE001 - one family's crash must not hide the others' results
                import traceback
                traceback.print_exc()
                rows.append(dict(family=family, size=size, passed=False, divergence=f'crashed: {type(e).__name__}: '
                                 f'{e}'[:300], worst='-', routing='', build_s=0, parity_s=0, failed_checks=[]))
            out = os.path.join(args.out, f'{family}-{size}')
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, 'summary.json'), 'w') as f:
                json.dump(rows[-1], f)
    print('\n' + table(rows))
    return 0 if all(r['passed'] for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
