#!/usr/bin/env bash
# Mixture-of-experts on the GPU in one device call (issue 13), logs under $OUT, a summary last:
#   tests   the fused-MoE, quantised-kernel and MoE-port gpu tests (two xdist workers when .carry/wheels has them);
#           the 8-layer Qwen3-30B-A3B-shaped checkpoint is written meanwhile
#   kernel  scripts/bench_moe_lmdeploy.py: lmdp's fused MoE beside lmdeploy's, 1-4096 tokens (carry .carry/lmdeploy)
#   sweep   python -m lmdp.kernels.triton.bench_moe --sweep at the decode and prefill batches of the bench
#   bench   lmdp bench moe --layers 8: batch-1 decode and the 256-request run, with where its time went
#   profile scripts/profile_decode.py moe:8 at batch 1, 64 and 256: one graph replay of a decode step against the
#           bench's mean decode step (device- or host-bound?), and the kernels of the step
#
#     [PARTS="tests kernel sweep bench profile" SWEEP_TOKENS="256 2048 4096"] bash scripts/moe_gpu.sh   # repo root
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/lmdp_moe_gpu}
mkdir -p "$out"
export OUT=$out
PARTS=${PARTS:-tests kernel sweep bench profile}
SWEEP_TOKENS=${SWEEP_TOKENS:-256 2048 4096}
want() { [[ " $PARTS " == *" $1 "* ]]; }
. scripts/lib.sh
. scripts/xdist.sh

{ want bench || want profile; } && python -c "from lmdp.bench.checkpoint import ensure_checkpoint
from lmdp.bench.shapes import SHAPES, with_layers
ensure_checkpoint(with_layers(SHAPES['moe'], 8), '/tmp')" > "$out/ckpt.log" 2>&1 &
want tests && STEP_TIMEOUT=180 step tests python -m pytest -q -p no:cacheprovider -m gpu "${xdist[@]}" \
    tests/kernels/test_fused_moe.py tests/kernels/test_quant_kernels.py tests/test_moe_ports.py \
    tests/parity/test_parity_moe_routing.py
wait
if want kernel && [ -f .carry/lmdeploy/install.sh ]; then
    TAIL=14 STEP_TIMEOUT=150 step kernel bash -c \
        '. .carry/lmdeploy/install.sh > /dev/null || exit 1; PYTHONPATH=$PWD:$PYTHONPATH python scripts/bench_moe_lmdeploy.py'
fi
# shellcheck disable=SC2086
want sweep && TAIL=4 STEP_TIMEOUT=200 step sweep python -m lmdp.kernels.triton.bench_moe --sweep --tokens $SWEEP_TOKENS \
    --json "$out/bench_moe_sweep.json"
want bench && TAIL=3 STEP_TIMEOUT=240 step bench python -m lmdp.bench moe --layers 8 --no-hf --long-context --workdir /tmp \
    --json "$out/lmdp_moe8.json"
want profile && TAIL=2 STEP_TIMEOUT=150 step profile python scripts/profile_decode.py moe:8 --batch 1 64 256 \
    --kernels 12
grep -E 'graph replay|engine step|roofline' "$out/profile.log" 2>/dev/null

echo; echo '== summary'
grep -h '"sweep_best' "$out/sweep.log" 2>/dev/null | python -c "import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(f\"sweep {r['tokens']} tokens: auto {r['us']} us, best {r.get('sweep_best_us')} us {r.get('sweep_best')}\")"
python - "$out/lmdp_moe8.json" <<'PY'
import json, sys
try:
    res = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f'bench: no result ({e})')
for name, f in res.get('shapes', {}).items():
    keys = ['bs1_decode_tok_s', 'roofline_tok_s', 'tp_out_tok_s', 'tp_wall_s', 'tp_prefill_steps', 'tp_prefill_s',
            'tp_prefill_step_ms', 'tp_prefill_step_max_ms', 'tp_decode_steps', 'tp_decode_s', 'tp_decode_step_ms',
            'tp_decode_step_max_ms', 'tp_decode_batch_mean',
            'tp_stream_out_tok_s', 'cuda_graphs_captured']
    print(name, ' '.join(f'{k}={f.get(k)}' for k in keys))
PY
exit $status
