#!/usr/bin/env bash
# The CUDA backend's and the harness's correctness checks in one device call, each log under $OUT:
#   every test marked gpu; `pytest parity --device cuda --dtype bfloat16` on the tiny llama; full parity of the
#   Llama-3.2-1B-shaped random checkpoint, both views, timed against its 60 s target (scripts/parity_speed.py);
#   the harness's sensitivity in bfloat16 (scripts/parity_sensitivity.py): every shipped family's correct port
#   over 3 seeds (false failures), its planted bugs, and a 0.5% scale error in every module kind (misses), on
#   tiny and real layer shapes.
# Speed is measured apart: `python -m lmdp.bench` beside ../shared/bench's lmdeploy (notes/performance.md).
#
#     bash scripts/gpu_acceptance.sh [FAMILIES [FAMILIES_1B [SEEDS_1B]]]    # repository root, on the GPU machine
set -u -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lmdp_gpu_acceptance}
families=${1:-llama,gemma,gemma2}
families_1b=${2:-$families}
seeds_1b=${3:-0,1,2}
mkdir -p "$out"
status=0

. "$(dirname "$0")/lib.sh"

step gpu_tests python -m pytest -q -p no:cacheprovider -m gpu tests
step parity_tiny_bf16 python -m pytest -q -p no:cacheprovider parity --device cuda --dtype bfloat16
step parity_1b_bf16 python scripts/parity_speed.py
step sensitivity_tiny python scripts/parity_sensitivity.py --device cuda --dtype bfloat16 --families "$families" \
    --shapes tiny --seeds 0,1,2 --at 0.005 --out "$out/sens_tiny"
step sensitivity_1b python scripts/parity_sensitivity.py --device cuda --dtype bfloat16 --families "$families_1b" \
    --shapes 1b --seeds "$seeds_1b" --at 0.005 --out "$out/sens_1b"
grep -h -A40 '^### ' "$out"/sens_*/calibration.md 2>/dev/null
exit $status
