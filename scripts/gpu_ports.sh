#!/usr/bin/env bash
# Issue 13's dense half on the GPU, in one device call (about 10 minutes on an H200), each log under $OUT:
#   the tests marked gpu that it added (blocks' fused paths vs their steps in bf16, per-sequence LongRoPE inside a
#   CUDA graph, bf16 parity of every new port's tiny with CUDA-graph replay); `pytest parity --device cuda
#   --dtype bfloat16` on each family's tiny; bf16 parity on one real layer shape per family.
# Speed: the dense figures must not move; run `python -m lmdp.bench 1b 8b` beside lmdeploy as before.
#
#     bash scripts/gpu_ports.sh         # from the repository root, on the GPU machine
set -u -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lmdp_gpu_ports}
mkdir -p "$out"
status=0

. "$(dirname "$0")/lib.sh"

step gpu_tests python -m pytest -q -p no:cacheprovider -m gpu tests/nn tests/test_ports_parity.py tests/kernels
for family in qwen2 qwen3 phi3 gemma3_text gemma gemma2 mistral; do
    tiny=$(mktemp -d)
    python -m lmdp make-tiny "$family" "$tiny" > /dev/null
    step "parity_tiny_${family}_bf16" python -m pytest -q -p no:cacheprovider parity --model "$tiny" \
        --device cuda --dtype bfloat16 --report "$out/tiny_$family"
    rm -rf "$tiny"
done
step parity_real_shapes_bf16 python scripts/parity_real_shapes.py --out "$out/real"
exit $status
