#!/usr/bin/env bash
# lmdp beside lmdeploy on the same random checkpoints, one shape after the other, in one device call; logs and JSON
# under $OUT, a table last. For each SHAPE[:LAYERS][+QUANT] (lmdp bench's shapes; `moe:8` = the moe shape with 8
# layers; `8b+fp8` / `8b+awq` = the 8b checkpoint quantised by lmdp quantize, lmdp bench --quant):
# `lmdp bench SHAPE --no-hf` (it writes the checkpoint), then ../shared/bench/lmdeploy_bench.py on that folder
# (carry .carry/lmdeploy: see /work/shared/bench/README.md), then the checkpoint is removed (the disk is 64 GB).
#
# With LONG_CONTEXT (default "4096 16384 32768"; empty to skip) both engines also time the first token and the
# decode rate at those prompt lengths (lmdp bench --long-context, ../shared/bench/longctx.py).
#
#     [LIMIT=300 DEADLINE=560] bash scripts/bench_vs_lmdeploy.sh moe:8 1b 8b     # repository root, on the GPU machine
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lmdp_bench_vs_lmdeploy}
work=${WORKDIR:-/tmp}
mkdir -p "$out"
export OUT=$out
LIMIT=${LIMIT:-300}       # per engine and shape, seconds
DEADLINE=${DEADLINE:-560} # seconds from the start: a step gets what is left of it (less 20 s for the table)
LONG_CONTEXT=${LONG_CONTEXT-4096 16384 32768}   # prompt lengths for TTFT / decode at context (empty: skip)
lim() { local left=$((DEADLINE - 20 - SECONDS)); echo $((left < LIMIT ? left : LIMIT)); }

for spec in "$@"; do
    quant=bf16
    if [[ "$spec" == *+* ]]; then quant=${spec#*+}; spec=${spec%%+*}; fi
    shape=${spec%%:*}
    layers=()
    [ "$spec" != "$shape" ] && layers=(--layers "${spec#*:}")
    name=$shape
    [ ${#layers[@]} -gt 0 ] && name="$shape-${spec#*:}l"
    [ "$quant" != bf16 ] && name="$name-$quant"
    nl=None
    [ ${#layers[@]} -gt 0 ] && nl=${spec#*:}
    base=$(python -c "from lmdp.bench.checkpoint import checkpoint_dir
from lmdp.bench.shapes import SHAPES, with_layers
print(checkpoint_dir(with_layers(SHAPES['$shape'], $nl), '$work'))")
    ckpt=$base
    [ "$quant" != bf16 ] && ckpt=$(python -c "from lmdp.bench.checkpoint import quantized_dir
print(quantized_dir('$base', '$quant'))")
    # a new shape: the last one's bf16 checkpoint goes (it stays while specs quantise the same shape)
    [ -n "${prev_base:-}" ] && [ "$prev_base" != "$base" ] && rm -rf "$prev_base"
    prev_base=$base
    if [ "$(lim)" -lt 60 ]; then echo "== $name: skipped, $((DEADLINE - SECONDS)) s left"; continue; fi
    echo "== $name: lmdp"
    # shellcheck disable=SC2086
    timeout -k 10 "$(lim)" python -m lmdp.bench "$shape" "${layers[@]}" --no-hf --workdir "$work" \
        --quant "$quant" --long-context $LONG_CONTEXT \
        --json "$out/lmdp_$name.json" > "$out/lmdp_$name.log" 2>&1
    echo "   exit $? after $SECONDS s"; tail -n 3 "$out/lmdp_$name.log" | sed 's/^/   /'
    if [ -f .carry/lmdeploy/install.sh ] && [ -f "$ckpt/config.json" ] && [ "$(lim)" -ge 60 ]; then
        echo "== $name: lmdeploy on $ckpt"
        timeout -k 10 "$(lim)" env -u PYTHONPATH bash -c \
            '. .carry/lmdeploy/install.sh || exit 1; python3 .carry/lmdeploy/lmdeploy_bench.py "$1"' _ "$ckpt" \
            > "$out/lmdeploy_$name.log" 2>&1
        echo "   exit $? after $SECONDS s"; grep RESULT "$out/lmdeploy_$name.log" | sed 's/^/   /'
        if [ -n "$LONG_CONTEXT" ] && [ "$(lim)" -ge 60 ]; then
            echo "== $name: lmdeploy long context $LONG_CONTEXT"
            # shellcheck disable=SC2086
            timeout -k 10 "$(lim)" env -u PYTHONPATH bash -c \
                '. .carry/lmdeploy/install.sh || exit 1; python3 .carry/lmdeploy/longctx.py lmdeploy "$@"' _ \
                "$ckpt" $LONG_CONTEXT > "$out/lmdeploy_longctx_$name.log" 2>&1
            echo "   exit $? after $SECONDS s"
            grep '^RESULT ' "$out/lmdeploy_longctx_$name.log" | tail -n 1 | cut -c8- > "$out/lmdeploy_longctx_$name.json"
        fi
    fi
    [ "$quant" != bf16 ] && rm -rf "$ckpt"       # a quantised copy is used by its own spec only
done
[ -n "${prev_base:-}" ] && rm -rf "$prev_base"

python - "$out" "$@" <<'PY'
import glob, json, os, sys
from lmdp.bench.long_context import long_context_row
out = sys.argv[1]


def load(path):
    try:
        return json.load(open(path))
    except Exception:
        return None


print('\n| shape | lmdp bs1 tok/s | roofline | fraction | lmdeploy bs1 | ratio | lmdp 256-req out tok/s | lmdeploy | ratio |')
print('| --- | --- | --- | --- | --- | --- | --- | --- | --- |')
long_rows, res = [], {}
for path in sorted(glob.glob(os.path.join(out, 'lmdp_*.json'))):
    res = load(path) or {}
    for name, fig in res.get('shapes', {}).items():
        lmd = {}
        for cand in glob.glob(os.path.join(out, 'lmdeploy_*.json')):
            d = load(cand) or {}
            if d.get('preset', '').endswith('_' + name):
                lmd = d
        bs1, roof = fig.get('bs1_decode_tok_s'), fig.get('roofline_tok_s')
        tp, ltp, lbs1 = fig.get('tp_out_tok_s'), lmd.get('tp_out_tok_s'), lmd.get('bs1_decode_tok_s')
        r = lambda a, b: f'{a / b:.2f}x' if a and b else '-'  # noqa: E731
        print(f"| {name} | {bs1} | {roof} | {bs1 / roof:.1%} | {lbs1 or '-'} | {r(bs1, lbs1)} | {tp or '-'} | "
              f"{ltp or '-'} | {r(tp, ltp)} |")
        if fig.get('long_context'):
            theirs = load(os.path.join(out, f'lmdeploy_longctx_{name}.json'))
            long_rows.append(long_context_row(name, fig['long_context'], theirs))
print('\n'.join(long_rows))
print(f"\n{res.get('device', '')}, copy bandwidth {res.get('copy_bandwidth_TBps', '?')} TB/s")
PY
