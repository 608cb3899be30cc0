#!/usr/bin/env bash
# The release check in one device call (H200, under 10 minutes), logs under $OUT, a summary last:
#   phase 1, side by side (correctness only): the MoE and harness tests marked gpu; the harness's sensitivity in
#   bfloat16 (scripts/parity_sensitivity.py) for every shipped family on its tiny preset (3 seeds, planted bugs and
#   a 0.5% scale in every module kind), the Llama-1B shape (3 seeds, planted) and the other dense families' real
#   shapes (3 seeds); scripts/issues13_14_gpu.sh's part b (bf16 parity of every family, tiny and real-shaped);
#   phase 2, alone (timed): scripts/issues13_14_gpu.sh's parts c (MoE bench beside lmdeploy) and d (the
#   transformers fallback beside the native port).
#
#     [P1=215 END=560 PHASE2="c d"] bash scripts/release_gpu.sh   # repository root, on the GPU machine; .carry/lmdeploy carried for part c
set -u -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lmdp_release_gpu}
mkdir -p "$out"
P1=${P1:-215}           # phase 1's limit, seconds
END=${END:-560}         # when phase 2 must be done, seconds from the start
: > "$out/rc.txt"

s() {   # s NAME LIMIT CMD...: one step under `timeout`, its log and exit status under $out
    local name=$1 lim=$2
    shift 2
    timeout -k 5 "$lim" "$@" > "$out/$name.log" 2>&1
    echo "$name rc=$? after $SECONDS s" >> "$out/rc.txt"
}
sens() { local name=$1; shift; s "$name" "$P1" python scripts/parity_sensitivity.py --device cuda --dtype bfloat16 \
    --out "$out/$name" "$@"; }

s gpu_tests "$P1" python -m pytest -q -p no:cacheprovider -m gpu tests/test_moe_ports.py \
    tests/parity/test_parity_moe_routing.py tests/nn/test_blocks_gpu.py tests/parity/test_parity_gpu_float32.py &
sens sens_tiny_a --families gemma2,qwen2,qwen3 --shapes tiny --seeds 0,1,2 --at 0.005 &
sens sens_tiny_b --families phi3,gemma3_text,gemma --shapes tiny --seeds 0,1,2 --at 0.005 &
sens sens_tiny_moe --families mixtral,qwen2_moe,qwen3_moe --shapes tiny --seeds 0,1,2 --at 0.005 &
sens sens_1b_llama --families llama --shapes 1b --seeds 0,1,2 --at 0.005 &
sens sens_1b_a --families qwen3,gemma2 --shapes 1b --seeds 0,1,2 --no-planted &
sens sens_1b_b --families mistral,gemma,qwen2 --shapes 1b --seeds 0,1,2 --no-planted &
OUT=$out/b PARTS=b DEADLINE=$P1 bash scripts/issues13_14_gpu.sh > "$out/b.log" 2>&1 &
wait
echo "phase 1 done after $SECONDS s" >> "$out/rc.txt"
OUT=$out/cd PARTS="${PHASE2:-c d}" DEADLINE=$((END - SECONDS)) bash scripts/issues13_14_gpu.sh > "$out/cd.log" 2>&1
echo "phase 2 done after $SECONDS s" >> "$out/rc.txt"

cat "$out/rc.txt"
tail -n 4 "$out/gpu_tests.log"
for f in "$out"/sens_*/calibration.md; do [ -f "$f" ] && grep -v '^$' "$f"; done
grep -h -E "tiny  seed|1b    seed" "$out"/sens_*.log | grep -c PASS | sed 's/^/sensitivity runs passed: /'
grep -h -E "FAIL|MISSED" "$out"/sens_*.log | head -20
tail -n 30 "$out/b.log"
tail -n 30 "$out/cd.log"
