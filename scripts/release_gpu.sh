#!/usr/bin/env bash
# The correctness release check in one device call (H200, under 10 minutes), logs under $OUT, a summary last.
# Side by side, each process limited to two CPU threads (eight processes with torch's default of one thread per
# core ran five times slower than alone):
#   - every test marked gpu (pytest-xdist's two workers when it is importable: carry its wheels in .carry/wheels);
#   - the harness's sensitivity in bfloat16 (scripts/parity_sensitivity.py): a 0.5% scale in every module kind of
#     the Llama-1B shape; every shipped family, tiny preset and real layer shape (parity.random_checkpoint), on
#     3 seeds: zero false failures is the rule.
# Then, alone (timed), $PHASE2's parts of scripts/issues13_14_gpu.sh (none by default; "c d e" for the benches).
#
#     [P1=480 END=560 PHASE2="c"] bash scripts/release_gpu.sh   # repository root, on the GPU machine
set -u -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
# a pipeline sizes its KV pool from the memory free on the card: cap it, or the first test starves the others
export LMDP_MAX_KV_POOL_GIB=${LMDP_MAX_KV_POOL_GIB:-6}
out=${OUT:-/tmp/lmdp_release_gpu}
mkdir -p "$out"
P1=${P1:-480}           # phase 1's limit, seconds
END=${END:-560}         # when phase 2 must be done, seconds from the start
: > "$out/rc.txt"

. scripts/xdist.sh

s() {   # s NAME LIMIT CMD...: one step under `timeout`, its log and exit status under $out
    local name=$1 lim=$2
    shift 2
    timeout -k 5 "$lim" "$@" > "$out/$name.log" 2>&1
    echo "$name rc=$? after $SECONDS s" >> "$out/rc.txt"
}
sens() { local name=$1; shift; s "$name" "$P1" python scripts/parity_sensitivity.py --device cuda --dtype bfloat16 \
    --out "$out/$name" "$@"; }

s gpu_tests "$P1" python -m pytest -q -p no:cacheprovider -m gpu "${xdist[@]}" --durations=15 tests &
sens sens_1b_llama_scale --families llama --shapes 1b --seeds 0 --at 0.005 --no-planted &
sens sens_tiny --families llama,mistral,gemma,gemma2,qwen2,qwen3,phi3,gemma3_text,mixtral,qwen2_moe,qwen3_moe \
    --shapes tiny --seeds 0,1,2 --no-planted &
sens sens_1b_a --families llama,mistral,gemma,qwen2 --shapes 1b --seeds 0,1,2 --no-planted &
sens sens_1b_b --families phi3,gemma3_text,qwen3,gemma2 --shapes 1b --seeds 0,1,2 --no-planted &
sens sens_1b_moe --families qwen3_moe,qwen2_moe,mixtral --shapes 1b --seeds 0,1,2 --no-planted &
wait
echo "phase 1 done after $SECONDS s" >> "$out/rc.txt"
if [ -n "${PHASE2:-}" ]; then
    OUT=$out/cd PARTS="$PHASE2" DEADLINE=$((END - SECONDS)) bash scripts/issues13_14_gpu.sh > "$out/cd.log" 2>&1
    echo "phase 2 done after $SECONDS s" >> "$out/rc.txt"
fi

cat "$out/rc.txt"
grep -E "passed|failed" "$out/gpu_tests.log" | tail -n 3
grep -E "^FAILED|^ERROR" "$out/gpu_tests.log" | head -20
for f in "$out"/sens_*/calibration.md; do [ -f "$f" ] && grep -v '^$' "$f"; done
echo "sensitivity runs: $(grep -h -E ' seed [0-9]+: ' "$out"/sens_*.log | grep -c PASS) passed," \
    "$(grep -h -E ' seed [0-9]+: ' "$out"/sens_*.log | grep -vc PASS) not"
grep -h -E "FAIL|MISSED|Traceback|Error" "$out"/sens_*.log | head -20
[ -n "${PHASE2:-}" ] && tail -n 30 "$out/cd.log"
exit 0
