#!/usr/bin/env bash
# Performance probes on the GPU in one device call (H200, ~8 minutes), logs under $OUT, a summary last:
#   tests    the gpu tests of the prefill attention paths (torch flash / cuDNN / Triton) and the attention blocks
#   prefill  scripts/bench_prefill_attention.py: each prefill kernel's TFLOP/s against torch SDPA's backends
#   moe      python -m lmdp.kernels.triton.bench_moe --sweep: the fused-MoE layer at decode (256 tokens) and prefill
#            (4096) batches, the chosen tiles against the best of 64
#   ttft     .carry/lmdeploy/longctx.py on the 8B shape, time to first token at 4k/16k/32k, with each prefill
#            attention (LMDP_PREFILL_ATTENTION=triton, flash)
#
#     [PARTS="tests prefill moe ttft"] bash scripts/perf_gpu.sh     # repository root, on the GPU machine
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lmdp_perf_gpu}
mkdir -p "$out"
export OUT=$out
PARTS=${PARTS:-tests prefill moe ttft}
want() { [[ " $PARTS " == *" $1 "* ]]; }
step() {   # step NAME LIMIT CMD...
    local name=$1 lim=$2
    shift 2
    echo "== $name (limit $lim s)"
    timeout -k 10 "$lim" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? after $SECONDS s"
}

want tests && step tests 150 python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_prefill_select.py \
    tests/kernels/test_triton_kernels.py tests/nn/test_blocks_gpu.py
want prefill && step prefill 120 python scripts/bench_prefill_attention.py
want moe && step moe 150 python -m lmdp.kernels.triton.bench_moe --sweep --tokens 256 4096 --json "$out/bench_moe.json"
if want ttft; then
    ckpt=$(python -c "from lmdp.bench.checkpoint import ensure_checkpoint
from lmdp.bench.shapes import SHAPES
print(ensure_checkpoint(SHAPES['8b'], '/tmp'))" 2> "$out/ttft_ckpt.log" | tail -n 1)
    for impl in triton flash; do
        step "ttft_$impl" 90 env LMDP_PREFILL_ATTENTION=$impl python .carry/lmdeploy/longctx.py lmdp "$ckpt" 4096 16384 32768
    done
fi

echo
for f in tests; do [ -f "$out/$f.log" ] && tail -n 2 "$out/$f.log" && grep -E "^FAILED" "$out/$f.log" | head; done
[ -f "$out/prefill.log" ] && grep -v '^{' "$out/prefill.log" | tail -n 25
[ -f "$out/moe.log" ] && grep '^{' "$out/moe.log"
for impl in triton flash; do [ -f "$out/ttft_$impl.log" ] && grep -E "^lmdp " "$out/ttft_$impl.log" | sed "s/^/$impl: /"; done
exit 0
