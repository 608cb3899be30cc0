#!/usr/bin/env bash
# Mixture of experts on the GPU, in stages that each fit one device call (<= 10 minutes), logs under $OUT:
#
#   bash scripts/moe_gpu_check.sh kernels   # tests marked gpu for the MoE kernels and ports (bf16; experts 8/64/128,
#                                           # top-k 2/8, 1-4096 tokens; CUDA graphs; each tiny MoE port's bf16 parity
#                                           # with graph replay and routing), then the kernel micro-bench
#                                           # on Qwen3-30B-A3B's layer (GEMV vs grouped GEMM by batch)   ~4 min
#   bash scripts/moe_gpu_check.sh parity    # bf16 parity + routing agreement of Mixtral, Qwen2-MoE, Qwen3-MoE on
#                                           # their tiny presets and on 2-layer real-shaped checkpoints     ~5 min
#   bash scripts/moe_gpu_check.sh bench     # `lmdp bench moe` (Qwen3-30B-A3B shape, 24 layers, ~31 GB written to
#                                           # /tmp) and lmdeploy 0.18 on the same checkpoint, same call      ~9 min
#                                           # (`lmdp` or `lmdeploy` instead of `bench`: one engine, if the pair
#                                           # does not fit one call)
#   bash scripts/moe_gpu_check.sh sweep     # the grouped GEMM's 64 tilings at 64/256/4096 tokens (tuning)
#
# From the repository root on the GPU machine. The bench stage needs the lmdeploy bundle in .carry/lmdeploy
# (../shared/bench/README.md: prepare-lmdeploy.sh, plus lmdeploy_bench.py copied next to install.sh); without it
# only lmdp is measured. Every stage prints the tail of each log and exits non-zero if any step failed.
set -u -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lmdp_moe_gpu}
mkdir -p "$out"
status=0

TAIL=${TAIL:-25}
. "$(dirname "$0")/lib.sh"

case "${1:-}" in
kernels)
    step moe_gpu_tests python -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_fused_moe.py \
        tests/test_moe_ports.py tests/kernels/test_triton_kernels.py -k 'moe or rms_norm or bf16_parity'
    TAIL=20 step moe_kernel_bench python -m lmdp.kernels.triton.bench_moe --paths --json "$out/bench_moe.json"
    ;;
parity)
    TAIL=12 step moe_parity python scripts/moe_parity.py --json "$out/moe_parity.json"
    ;;
bench|lmdp|lmdeploy)
    # the checkpoint both engines read (written once; ~1 minute)
    step moe_checkpoint python -c 'from lmdp.bench.checkpoint import ensure_checkpoint; from lmdp.bench.shapes \
import SHAPES; print(ensure_checkpoint(SHAPES["moe"], "/tmp"))'
    if [ "$1" != lmdeploy ]; then
        TAIL=8 step lmdp_bench_moe python -m lmdp.bench moe --no-hf --long-context --json "$out/lmdp_bench_moe.json"
    fi
    if [ "$1" = lmdp ]; then
        :
    elif [ -f .carry/lmdeploy/install.sh ] && [ -f .carry/lmdeploy/lmdeploy_bench.py ]; then
        TAIL=6 step lmdeploy_bench_moe bash -c '. .carry/lmdeploy/install.sh || exit 1; \
            python3 .carry/lmdeploy/lmdeploy_bench.py /tmp/lmd_random_qwen3moe_moe'
    else
        echo "== lmdeploy_bench_moe: skipped, no .carry/lmdeploy bundle (see ../shared/bench/README.md)"
    fi
    ;;
sweep)
    TAIL=40 step moe_kernel_sweep python -m lmdp.kernels.triton.bench_moe --sweep --tokens 64 256 4096 \
        --json "$out/bench_moe_sweep.json"
    ;;
*)
    echo "usage: bash scripts/moe_gpu_check.sh kernels|parity|bench|lmdp|lmdeploy|sweep" >&2
    exit 2
    ;;
esac
exit $status
