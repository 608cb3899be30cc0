"""The harness measured: false failures of every shipped port, planted bugs named, smallest scale error caught.

    PYTHONPATH=$PWD python scripts/parity_sensitivity.py --device cpu --dtype float32          # CI-sized, minutes
    PYTHONPATH=$PWD python scripts/parity_sensitivity.py --device cuda --dtype bfloat16 --shapes tiny,1b \
        --at 0.005 --sweep tiny --out $OUT/sensitivity

For each shape, family and seed it builds a random checkpoint, runs transformers once, then the correct port
(false failures: every tap's error and scale error against their tolerances), the family's planted bugs, one
(1 + --at) scale error per module kind in layer 1 (is it caught, and named at that module?) and, for the --sweep
shapes, the smallest scale error caught per module kind. Prints the tables of parity/README.md (and writes
calibration.json and calibration.md into --out). Exit status 1 on any false failure or miss.
"""
import argparse
import json
import os
import sys

from parity.calibration import calibrate, false_failure_rate, markdown, miss_rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    ap.add_argument('--families', default='llama,gemma,gemma2')
    ap.add_argument('--shapes', default='tiny', help='tiny and/or 1b (one real layer shape per family)')
    ap.add_argument('--seeds', default='0,1,2')
    ap.add_argument('--at', type=float, default=None, help='check a (1 + AT) scale error in every module kind')
    ap.add_argument('--sweep', default='', help='shapes to search the smallest caught scale error on')
    ap.add_argument('--no-planted', action='store_true')
    ap.add_argument('--out', default=None)
    args = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(',') if x]  # noqa: E731
    cal = calibrate(split(args.families), split(args.shapes), [int(s) for s in split(args.seeds)], args.device,
                    args.dtype, scale_at=args.at, sweep_shapes=split(args.sweep), planted_bugs=not args.no_planted,
                    log=lambda line: print(line, flush=True))
    text = markdown(cal)
    print()
    print(text)
    print(f'\nfalse-failure rate {false_failure_rate(cal):.3f} ({len(cal.runs)} runs); miss rate {miss_rate(cal):.3f} '
          f'({len(cal.detections)} planted errors)')
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'calibration.json'), 'w') as f:
            json.dump(cal.to_dict(), f, indent=1)
        with open(os.path.join(args.out, 'calibration.md'), 'w') as f:
            f.write(text + '\n')
    return int(false_failure_rate(cal) > 0 or miss_rate(cal) > 0)


if __name__ == '__main__':
    sys.exit(main())
