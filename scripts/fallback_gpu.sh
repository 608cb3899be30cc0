#!/usr/bin/env bash
# Issue 14 on the GPU, in one device call: the transformers fallback's GPU tests (bfloat16 parity with CUDA-graph
# replay on eight families, the engine capturing fallback graphs), then `lmdp bench 1b --model-impl both`: the
# native Llama port and the fallback on the same Llama-3.2-1B-shaped checkpoint, with transformers' eager generate,
# printing the fallback's ratios against the targets (bs1 >= 0.6x port, 256 requests >= 0.8x port, bs1 >= 5x HF).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD}"
rc=0
# FALLBACK_GPU_TESTS=0: the bench alone (scripts/issues13_14_gpu.sh, where the tests do not fit the call's time)
if [ "${FALLBACK_GPU_TESTS:-1}" != 0 ]; then
    python -m pytest tests/fallback -q -p no:cacheprovider -m gpu -x 2>&1 | tail -40 || rc=1
fi
python -m lmdp.bench 1b --model-impl both --long-context --workdir "${WORKDIR:-/tmp}" --json "$OUT/fallback_bench_1b.json" || rc=1
exit $rc
