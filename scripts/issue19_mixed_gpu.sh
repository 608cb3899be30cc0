#!/usr/bin/env bash
# Issue 19, mixed prefill and latency percentiles, on the GPU in one device call per shape, logs and JSON under $OUT:
#   1. the gpu tests of mixed steps (attention rows split between the decode and prefill kernels in bf16; decode-only
#      steps still replaying CUDA graphs beside eager mixed steps);
#   2. lmdp bench SHAPE --mixed-prefill both: the 256-request run with and without mixing on one engine, each with
#      output tok/s (batch call) and TTFT / ITL p50/p99 (streamed run);
#   2b. the same with mixing at smaller prompt budgets ($BUDGETS, default 1024): shorter mixed steps, longer prefill;
#   3. lmdeploy on the same checkpoint: ../shared/bench/lmdeploy_bench.py (bs1 and 256-request tok/s) and
#      scripts/lmdeploy_latency.py (the same streamed run, measured by the same lmdp code), when .carry/lmdeploy
#      holds the bundle (see ../shared/bench/README.md).
#
#     bash scripts/issue19_mixed_gpu.sh 1b      # from the repository root; then again with 8b
set -u -o pipefail
shape=${1:-1b}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lmdp_issue19}
mkdir -p "$out"
status=0

TAIL=${TAIL:-8}
. "$(dirname "$0")/lib.sh"

if [ "$shape" = 1b ]; then
    step gpu_tests python -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_mixed_prefill.py \
        tests/kernels/test_triton_kernels.py -k "mixed"
fi
step "bench_$shape" python -m lmdp.bench "$shape" --mixed-prefill both --no-hf --long-context --json "$out/lmdp_bench_$shape.json"
for budget in ${BUDGETS-1024}; do
    step "bench_${shape}_budget$budget" python -m lmdp.bench "$shape" --mixed-prefill on --no-hf --long-context \
        --max-prefill-token-num "$budget" --json "$out/lmdp_bench_${shape}_budget$budget.json"
done
if [ -f .carry/lmdeploy/install.sh ]; then
    step "lmdeploy_$shape" bash -c ". .carry/lmdeploy/install.sh && python3 .carry/lmdeploy/lmdeploy_bench.py $shape"
    step "lmdeploy_latency_$shape" bash -c ". .carry/lmdeploy/install.sh && PYTHONPATH=$PWD:\$PYTHONPATH \
        python3 scripts/lmdeploy_latency.py /tmp/lmd_random_llama_$shape"
else
    echo "== no .carry/lmdeploy: lmdeploy skipped"
fi
exit $status
