#!/usr/bin/env bash
# Tensor parallelism on two GPUs (NCCL), one device call (kind nvidia-h200-x2, ~6 min), logs under $OUT:
#   1. the tensor-parallel tests (tests/tp) on the CPU (gloo) as in CI, to see they pass on this machine too;
#   2. `pytest parity --tp 2` in bfloat16 on CUDA for the tiny llama (with CUDA-graph replay on both ranks);
#   3. greedy bf16 outputs of pipeline(tp=2) with CUDA graphs equal to tp=1, 16 prompts (scripts/tp_greedy.py).
# From the repository root. Exits non-zero if any step failed; prints the tail of each log.
set -u -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lmdp_tp_gpu}
mkdir -p "$out"
status=0
TAIL=${TAIL:-25} STEP_TIMEOUT=${STEP_TIMEOUT:-300}
. "$(dirname "$0")/lib.sh"
nvidia-smi -L
step tp_tests python -m pytest tests/tp -q -p no:cacheprovider -x
python -m lmdp make-tiny llama "$out/tiny" --layers 2 --dtype bfloat16 > /dev/null
step parity_tp2 python -m pytest parity -q -p no:cacheprovider --model "$out/tiny" --dtype bfloat16 --device cuda --tp 2
step greedy_tp2 python scripts/tp_greedy.py "$out/tiny" 2
exit $status
