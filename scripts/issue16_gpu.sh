#!/usr/bin/env bash
# Issue 16 (quantised checkpoints) on the GPU in one device call (about 5 minutes on an H200), logs under $OUT:
#   1. the gpu tests of the quant kernels (bf16, 8B layer sizes, M 1..512, fused activation, CUDA graph);
#   2. scripts/issue16_gpu.py: a random 1B-shape Llama quantised to FP8 and AWQ by lmdp quantize (about 7 GB of
#      disk with the dequantised float32 copies parity makes), bf16 parity of each, and batch-1 decode of bf16 vs
#      FP8 vs AWQ against each one's roofline; its table is printed last.
#
#     bash scripts/issue16_gpu.sh         # from the repository root, on the GPU machine
set -u -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lmdp_issue16}
mkdir -p "$out"
work=$(mktemp -d)
status=0

. "$(dirname "$0")/lib.sh"

step gpu_tests python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_quant_kernels.py
step decode_1b env OUT="$out" python scripts/issue16_gpu.py --workdir "$work"
rm -rf "$work"
echo
tail -n 5 "$out/decode_1b.log"
exit $status
