#!/usr/bin/env bash
# Issues 13 and 14 on the GPU in one device call of at most 8 minutes (H200), each log under $OUT, a table last:
#
#   a  MoE kernels, bf16: `pytest -m gpu` on tests/kernels/test_fused_moe.py (experts 8/64/128, top-k 2/8,
#      1-4096 tokens, both paths, CUDA graphs) and tests/test_moe_ports.py (each MoE tiny's bf16 parity with replay)
#   b  bf16 parity (scripts/parity_real_shapes.py): every family's tiny preset, and one real layer shape per family
#      (parity.random_checkpoint.REAL_SHAPES, $PARITY_LAYERS layers), MoE routers compared beside the taps
#   c  `lmdp bench moe --layers $MOE_LAYERS` (Qwen3-30B-A3B's layer shape): batch-1 decode against its roofline
#      (active-parameter bytes per token) and 256 requests; lmdeploy on the same checkpoint after it
#      (.carry/lmdeploy/lmdeploy_bench.py CHECKPOINT_DIR; skipped when the bundle is absent)
#   d  scripts/fallback_gpu.sh's bench: the transformers fallback against the native Llama port on the 1B shape
#      (batch-1 and 256 requests) and transformers' eager generate
#   e  (not by default) lmdeploy on the 1B checkpoint d wrote: the dense figures beside lmdeploy. Needs ~90 s more:
#      PARTS="a b c d e" DEADLINE=560 in a 10-minute call.
#
# a and b check correctness and run side by side (six processes on the one GPU); c and d are timed and run alone, one after the other. Every step
# runs under `timeout`: its limit is what is left of $DEADLINE (465 s) less the budgets of the steps after it, so a
# hang costs only its own step and time a step saves passes to the next.
#
#   bash scripts/issues13_14_gpu.sh                    # from the repository root, on the GPU machine
#   PARTS="c d" bash scripts/issues13_14_gpu.sh        # some parts only (each then gets the time left)
#   bash scripts/issues13_14_gpu.sh --dry-run          # on the CPU: the steps with tiny shapes, nothing timed
#   bash scripts/issues13_14_gpu.sh --table-only       # the table again, from the files under $OUT
set -u -o pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=${OUT:-/tmp/lmdp_issues13_14}
mkdir -p "$out"
export OUT=$out PYTHONUNBUFFERED=1        # lmdp bench and lmdeploy_bench.py write their JSON to $OUT
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
DEADLINE=${DEADLINE:-465}
MOE_LAYERS=${MOE_LAYERS:-8}
PARITY_LAYERS=${PARITY_LAYERS:-2}
PARTS=${PARTS:-a b c d}
WORKDIR=${WORKDIR:-/tmp}                  # where the bench checkpoints are written (lmdeploy reads them there)
dry=0
table_only=0
for arg in "$@"; do
    case $arg in
    --dry-run) dry=1 ;;
    --table-only) table_only=1 ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "issues13_14_gpu.sh: unknown argument '$arg' (expected --dry-run, --table-only or --help)" >&2; exit 2 ;;
    esac
done
for p in $PARTS; do
    case $p in a|b|c|d|e) ;; *) echo "issues13_14_gpu.sh: PARTS holds '$p'; parts are a b c d e" >&2; exit 2 ;; esac
done
want() { [[ " $PARTS " == *" $1 "* ]]; }

moe_ckpt="$WORKDIR/lmd_random_qwen3moe_moe-${MOE_LAYERS}l"
lmdeploy_ok=0
[ -f .carry/lmdeploy/install.sh ] && [ -f .carry/lmdeploy/lmdeploy_bench.py ] && lmdeploy_ok=1

# --- budgets (seconds) and the rolling limit ----------------------------------------------------------------------
declare -A budget=([ab]=150 [moe_ckpt]=35 [moe_lmdp]=70 [moe_lmdeploy]=105 [fallback]=105 [dense_lmdeploy]=90)
order=()
{ want a || want b; } && order+=(ab)
want c && order+=(moe_ckpt moe_lmdp) && [ $lmdeploy_ok = 1 ] && order+=(moe_lmdeploy)
want d && order+=(fallback)
want e && [ $lmdeploy_ok = 1 ] && order+=(dense_lmdeploy)
start=$SECONDS
steps="$out/steps.tsv"

limit_for() {       # what is left of the deadline less the budgets of the steps after $1
    local later=0 seen=0 s
    for s in "${order[@]}"; do
        [ $seen = 1 ] && later=$((later + budget[$s]))
        [ "$s" = "$1" ] && seen=1
    done
    echo $((DEADLINE - (SECONDS - start) - later))
}

# step NAME LIMIT CMD...: run CMD under `timeout LIMIT`, log to $out/NAME.log, one row in steps.tsv
step() {
    local name=$1 lim=$2
    shift 2
    if [ "$lim" -lt 10 ]; then
        echo "== $name: skipped, ${lim} s left"
        printf '%s\tno time\t0\t%s\n' "$name" "$lim" >> "$steps"
        return
    fi
    echo "== $name (limit ${lim} s): $*"
    local t0=$SECONDS rc
    timeout -k 10 "$lim" "$@" > "$out/$name.log" 2>&1
    rc=$?
    local state=ok
    [ $rc -ne 0 ] && state="exit $rc"
    { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && state=TIMEOUT
    tail -n "${TAIL:-4}" "$out/$name.log" | sed 's/^/   /'
    echo "== $name: $state after $((SECONDS - t0)) s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$state" "$((SECONDS - t0))" "$lim" >> "$steps"
}

skipped() { echo "== $1: skipped, $2"; printf '%s\tskipped: %s\t0\t0\n' "$1" "$2" >> "$steps"; }

if [ $table_only = 0 ]; then
    : > "$steps"
    rm -rf "$out/parity"
    dense1="llama mistral gemma gemma2 qwen2"
    dense2="qwen3 phi3 gemma3_text"
    moe="mixtral qwen2_moe qwen3_moe"
    if [ $dry = 1 ]; then
        dev=(--device cpu --dtype float32)
        pytest_gpu=(python -m pytest -q -p no:cacheprovider --co -m gpu)       # the selection, collected only
        dense1="llama" dense2="" moe="qwen3_moe"
    else
        dev=(--device cuda --dtype bfloat16)
        pytest_gpu=(python -m pytest -q -p no:cacheprovider -m gpu)
    fi
    parity_run=(python scripts/parity_real_shapes.py "${dev[@]}" --out "$out/parity")

    # --- a and b, side by side (correctness only) ---------------------------------------------------------------
    if want a || want b; then
        lim=$(limit_for ab)
        want a && TAIL=3 step moe_gpu_tests "$lim" "${pytest_gpu[@]}" tests/kernels/test_fused_moe.py \
            tests/test_moe_ports.py &
        if want b; then
            # shellcheck disable=SC2086
            TAIL=10 step parity_tiny_dense "$lim" "${parity_run[@]}" --sizes tiny --families $dense1 $dense2 &
            # shellcheck disable=SC2086
            TAIL=5 step parity_tiny_moe "$lim" "${parity_run[@]}" --sizes tiny --families $moe &
            if [ $dry = 0 ]; then
                # shellcheck disable=SC2086
                { TAIL=7 step parity_real_dense1 "$lim" "${parity_run[@]}" --sizes real --layers "$PARITY_LAYERS" \
                    --families $dense1 & }
                # shellcheck disable=SC2086
                { TAIL=5 step parity_real_dense2 "$lim" "${parity_run[@]}" --sizes real --layers "$PARITY_LAYERS" \
                    --families $dense2 & }
                # shellcheck disable=SC2086
                { TAIL=5 step parity_real_moe "$lim" "${parity_run[@]}" --sizes real --layers "$PARITY_LAYERS" \
                    --families $moe & }
            fi
        fi
        wait
    fi

    # --- c: the MoE bench, lmdp then lmdeploy on the same checkpoint -----------------------------------------------
    if want c; then
        if [ $dry = 1 ]; then
            step moe_ckpt 120 python -c "from lmdp.bench.checkpoint import ensure_checkpoint
from lmdp.bench.shapes import SHAPES, with_layers
print(ensure_checkpoint(with_layers(SHAPES['moe-tiny'], 1), '$out/dry_ckpt'))"
            echo "== moe_lmdp (dry run): python -m lmdp.bench moe --layers $MOE_LAYERS --no-hf --workdir $WORKDIR" \
                "--json $out/lmdp_bench_moe.json"
            echo "== moe_lmdeploy (dry run, bundle $([ $lmdeploy_ok = 1 ] && echo present || echo absent)):" \
                "python3 .carry/lmdeploy/lmdeploy_bench.py $moe_ckpt"
        else
            step moe_ckpt "$(limit_for moe_ckpt)" python -c "from lmdp.bench.checkpoint import ensure_checkpoint
from lmdp.bench.shapes import SHAPES, with_layers
print(ensure_checkpoint(with_layers(SHAPES['moe'], $MOE_LAYERS), '$WORKDIR'))"
            TAIL=3 step moe_lmdp "$(limit_for moe_lmdp)" python -m lmdp.bench moe --layers "$MOE_LAYERS" --no-hf --long-context \
                --workdir "$WORKDIR" --json "$out/lmdp_bench_moe.json"
            if [ $lmdeploy_ok = 1 ]; then
                # lmdeploy's own environment: its install.sh prepends its site folders; lmdp's path is left out
                TAIL=3 step moe_lmdeploy "$(limit_for moe_lmdeploy)" env -u PYTHONPATH bash -c \
                    '. .carry/lmdeploy/install.sh || exit 1; python3 .carry/lmdeploy/lmdeploy_bench.py "$1"' _ \
                    "$moe_ckpt"
            else
                skipped moe_lmdeploy 'no .carry/lmdeploy bundle (install.sh, lmdeploy_bench.py): /work/shared/bench/README.md'
            fi
        fi
    fi

    # --- d: the transformers fallback beside the native port (scripts/fallback_gpu.sh without its tests) ----------
    if want d; then
        if [ $dry = 1 ]; then
            echo "== fallback (dry run): FALLBACK_GPU_TESTS=0 WORKDIR=$WORKDIR bash scripts/fallback_gpu.sh"
        else
            TAIL=6 step fallback "$(limit_for fallback)" env FALLBACK_GPU_TESTS=0 WORKDIR="$WORKDIR" \
                bash scripts/fallback_gpu.sh
        fi
    fi

    # --- e: lmdeploy on the 1B checkpoint (same folder name lmdp bench writes) --------------------------------------
    if want e; then
        if [ $lmdeploy_ok = 0 ]; then
            skipped dense_lmdeploy 'no .carry/lmdeploy bundle'
        elif [ $dry = 1 ]; then
            echo "== dense_lmdeploy (dry run): python3 .carry/lmdeploy/lmdeploy_bench.py $WORKDIR/lmd_random_llama_1b"
        else
            TAIL=3 step dense_lmdeploy "$(limit_for dense_lmdeploy)" env -u PYTHONPATH bash -c \
                '. .carry/lmdeploy/install.sh || exit 1; python3 .carry/lmdeploy/lmdeploy_bench.py "$1"' _ \
                "$WORKDIR/lmd_random_llama_1b"
        fi
    fi
    echo "== all steps done after $((SECONDS - start)) s"
fi

# --- the table: read back from the files under $OUT ---------------------------------------------------------------
python - "$out" "$MOE_LAYERS" "$WORKDIR" <<'PY'
import glob, json, os, re, sys
out, moe_layers, workdir = sys.argv[1], sys.argv[2], sys.argv[3]
status = 0


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ratio(a, b):
    return a / b if a and b else None


def verdict(r, target):
    global status
    if r is None:
        return '-'
    met = r >= target
    status |= not met
    return f'{r:.2f}x (target >= {target}x: {"met" if met else "NOT MET"})'


print('\n==================== issues 13/14 on the GPU: summary ====================')
rows = [line.rstrip('\n').split('\t') for line in open(os.path.join(out, 'steps.tsv'))] \
    if os.path.exists(os.path.join(out, 'steps.tsv')) else []
for name, state, secs, lim in rows:
    extra = ''
    if name == 'moe_gpu_tests':
        log = open(os.path.join(out, name + '.log')).read() if os.path.exists(os.path.join(out, name + '.log')) else ''
        found = re.findall(r'^=*\s*([\d/]+ (?:passed|failed|error|skipped|deselected|tests? collected).*?)\s*=*$', log, re.M)
        extra = found[-1] if found else ''
    print(f'step {name:20s} {state:10s} {secs:>4s} s (limit {lim} s) {extra}')
    status |= state not in ('ok',) and not state.startswith('skipped')

summaries = sorted(glob.glob(os.path.join(out, 'parity', '*', 'summary.json')),
                   key=lambda p: (not p.endswith('-tiny/summary.json'), p))       # every tiny first
if summaries:
    print('\nparity (bf16 on the GPU unless a dry run): family, size, verdict; worst tap; routing')
    for path in summaries:
        r = json.load(open(path))
        failed = f" failed: {', '.join(r['failed_checks'])};" if r.get('failed_checks') else ''
        print(f"  {r['family']:12s} {r['size']:5s} {'PASS' if r['passed'] else 'FAIL'}  {r['divergence']};{failed} "
              f"worst {r['worst']}{'; ' + r['routing'] if r.get('routing') else ''}")
        status |= not r['passed']

lmdp = load('lmdp_bench_moe.json')
lmd = load(f'lmdeploy_lmd_random_qwen3moe_moe-{moe_layers}l.json')
if lmdp or lmd:
    f = (lmdp or {}).get('shapes', {}).get(f'moe-{moe_layers}l', {})
    print(f'\nMoE bench: Qwen3-30B-A3B layer shape, {moe_layers} layers (128 experts of 768, top-8), bf16, '
          f"{(lmdp or lmd).get('device')}; device copy {(lmdp or {}).get('copy_bandwidth_TBps', '-')} TB/s")
    if f:
        print(f"  lmdp batch-1 decode  {f['bs1_decode_tok_s']:9.1f} tok/s = {f['bs1_roofline_fraction']:.1%} of its "
              f"roofline {f['roofline_tok_s']:.0f} tok/s ({f['decode_weight_GB']} GB active weights per token)")
        if 'tp_out_tok_s' in f:
            print(f"  lmdp 256 requests    {f['tp_out_tok_s']:9.1f} out tok/s ({f['tp_out_tokens']} tokens in "
                  f"{f['tp_wall_s']} s)")
    if lmd:
        print(f"  lmdeploy batch-1     {lmd['bs1_decode_tok_s']:9.1f} tok/s; 256 requests "
              f"{lmd.get('tp_out_tok_s', float('nan')):.1f} out tok/s ({lmd.get('tp_wall_s')} s)")
        print(f"  lmdp / lmdeploy batch-1: {verdict(ratio(f.get('bs1_decode_tok_s'), lmd['bs1_decode_tok_s']), 1.1)}")
        print(f"  lmdp / lmdeploy 256-req: {verdict(ratio(f.get('tp_out_tok_s'), lmd.get('tp_out_tok_s')), 1.1)}")
    else:
        print('  lmdeploy: no figures (skipped or failed: see moe_lmdeploy.log)')

fb = load('fallback_bench_1b.json')
if fb:
    s = fb['shapes']['1b']
    port, fall = s['by_model_impl']['lmdp'], s['by_model_impl']['transformers']
    print(f"\nfallback, Llama 1B shape, {fb['device']}: port batch-1 {port['bs1_decode_tok_s']:.1f} tok/s, fallback "
          f"{fall['bs1_decode_tok_s']:.1f} tok/s, transformers eager {s.get('hf_bs1_decode_tok_s', float('nan')):.1f}"
          f" tok/s; 256 requests port {port.get('tp_out_tok_s', float('nan')):.0f}, fallback "
          f"{fall.get('tp_out_tok_s', float('nan')):.0f} out tok/s")
    for key, r in s.get('fallback_vs_port', {}).items():
        print(f"  fallback {key:18s} {verdict(r['ratio'], r['target'])}")
    lmd1 = load('lmdeploy_lmd_random_llama_1b.json')
    if lmd1:
        print(f"  dense 1B, lmdp port / lmdeploy: batch-1 {verdict(ratio(port['bs1_decode_tok_s'], lmd1['bs1_decode_tok_s']), 1.5)}"
              f", 256-req {verdict(ratio(port.get('tp_out_tok_s'), lmd1.get('tp_out_tok_s')), 1.1)}")
print(f"\nlogs and reports: {out}  (parity HTML: {out}/parity/<family>-<size>/report.html)")
print('OVERALL:', 'all steps ran and every target checked here was met' if not status else
      'something failed, timed out or missed a target (above)')
sys.exit(1 if status else 0)
PY
