#!/usr/bin/env bash
# The CUDA backend's correctness checks in one device call (about 5 minutes on an H100), each log under $OUT:
#   every test marked gpu; `pytest parity --device cuda --dtype bfloat16` on the tiny llama; parity on the
#   Llama-3.2-1B-shaped random checkpoint (scripts/parity_speed.py, which also times it against its 60 s target).
# Speed is measured apart: `python -m lmdp.bench` beside ../shared/bench's lmdeploy (notes/performance.md).
#
#     bash scripts/gpu_acceptance.sh         # from the repository root, on the GPU machine
set -u -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lmdp_gpu_acceptance}
mkdir -p "$out"
status=0

step() {
    local name=$1
    shift
    echo "== $name: $*"
    "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 3 "$out/$name.log"
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

step gpu_tests python -m pytest -q -p no:cacheprovider -m gpu tests
step parity_tiny_bf16 python -m pytest -q -p no:cacheprovider parity --device cuda --dtype bfloat16
step parity_1b_bf16 python scripts/parity_speed.py
exit $status
