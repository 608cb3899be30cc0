#!/usr/bin/env bash
# Performance probes on the GPU in one device call (H200, under 9 minutes), logs under $OUT, a summary last. Each
# step gets what is left of $DEADLINE (less what the steps after it need at least), so the summary always prints:
#   tests    gpu tests of the code the probes run (prefill attention paths, mixed steps, CUDA graphs, attention
#            blocks, the fallback), two xdist workers when .carry/wheels holds them; the bench checkpoints are
#            written meanwhile
#   prefill  scripts/bench_prefill_attention.py: each prefill kernel's TFLOP/s against torch SDPA's backends
#   ttft     .carry/lmdeploy/longctx.py, 8B shape: time to first token at 4k/16k/32k per prefill attention
#            (LMDP_PREFILL_ATTENTION=triton, flash)
#   mixed    lmdp bench 1b --mixed-prefill both: the 256-request run with and without prompt chunks beside the
#            decodes (out tok/s; TTFT and inter-token latency p50/p99)
#   lmdeploy scripts/lmdeploy_latency.py on the same 1B checkpoint (the same streamed run, lmdeploy serving)
#   moe      python -m lmdp.kernels.triton.bench_moe --sweep at 256 and 4096 tokens (what time is left)
#
#     [PARTS="tests prefill ttft mixed lmdeploy moe" DEADLINE=540] bash scripts/perf_gpu.sh   # repo root, GPU machine
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lmdp_perf_gpu}
mkdir -p "$out"
export OUT=$out
PARTS=${PARTS:-tests prefill ttft mixed lmdeploy moe}
DEADLINE=${DEADLINE:-540}
want() { [[ " $PARTS " == *" $1 "* ]]; }
step() {   # step NAME WANT RESERVE CMD...: at most WANT s, leaving RESERVE s for the steps after it
    local name=$1 lim=$2 reserve=$3 left
    shift 3
    left=$((DEADLINE - reserve - SECONDS))
    [ "$left" -lt "$lim" ] && lim=$left
    if [ "$lim" -lt 20 ]; then echo "== $name: skipped, no time left"; return; fi
    echo "== $name (limit $lim s)"
    timeout -k 5 "$lim" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? after $SECONDS s"
}
. scripts/xdist.sh
ckpt() { python -c "from lmdp.bench.checkpoint import ensure_checkpoint
from lmdp.bench.shapes import SHAPES
print(ensure_checkpoint(SHAPES['$1'], '/tmp'))" 2>> "$out/ckpt.log" | tail -n 1; }

{ want ttft && ckpt 8b > /dev/null; { want mixed || want lmdeploy; } && ckpt 1b > /dev/null; } &
want tests && step tests 140 380 python -m pytest -q -p no:cacheprovider -m gpu "${xdist[@]}" \
    tests/kernels/test_prefill_select.py tests/kernels/test_triton_kernels.py tests/nn/test_blocks_gpu.py \
    tests/engine/test_mixed_prefill.py tests/engine/test_cuda_graph_engine.py tests/parity/test_parity_cuda_graph.py \
    tests/fallback/test_fallback_gpu.py
wait
want prefill && step prefill 70 300 python scripts/bench_prefill_attention.py
if want ttft; then
    for impl in triton flash; do
        step "ttft_$impl" 60 180 env LMDP_PREFILL_ATTENTION=$impl \
            python .carry/lmdeploy/longctx.py lmdp /tmp/lmd_random_llama_8b 4096 16384 32768
    done
fi
rm -rf /tmp/lmd_random_llama_8b
want mixed && step mixed 120 60 python -m lmdp.bench 1b --mixed-prefill both --no-hf --long-context --workdir /tmp \
    --json "$out/lmdp_bench_1b_mixed.json"
want lmdeploy && [ -f .carry/lmdeploy/install.sh ] && step lmdeploy 80 0 env -u PYTHONPATH bash -c \
    ". .carry/lmdeploy/install.sh && PYTHONPATH=$PWD:\$PYTHONPATH python3 scripts/lmdeploy_latency.py /tmp/lmd_random_llama_1b"
want moe && step moe 150 0 python -m lmdp.kernels.triton.bench_moe --sweep --tokens 256 4096 \
    --json "$out/bench_moe.json"

echo
[ -f "$out/tests.log" ] && grep -E "passed|failed" "$out/tests.log" | tail -n 1 && grep -E "^FAILED|^ERROR" "$out/tests.log" | head
[ -f "$out/prefill.log" ] && grep -v '^{' "$out/prefill.log" | tail -n 22
for impl in triton flash; do [ -f "$out/ttft_$impl.log" ] && grep -E "^lmdp " "$out/ttft_$impl.log" | sed "s/^/$impl: /"; done
[ -f "$out/mixed.log" ] && tail -n 8 "$out/mixed.log"
[ -f "$out/lmdeploy.log" ] && grep RESULT "$out/lmdeploy.log"
[ -f "$out/moe.log" ] && grep '^{' "$out/moe.log"
exit 0
