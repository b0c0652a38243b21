#!/usr/bin/env bash
# The GPU checks in one run, under 8 minutes on one CUDA device: the attention op (eager
# and compiled, token_xcorr r=1 and r=2 against dot), the MoE layer (ours, DeepSpeed's,
# dense; bf16) and the training step (eager and compiled; tiny, tiny-dot and small.yaml
# in bf16, with small.yaml's MFU). Tables go to stdout, JSON to $OUT (default
# benchmarks/results/gpu). Each part has its own time limit and a failed part does not
# stop the others; the exit status is the number of parts that failed.
#
#   benchmarks/gpu_check.sh    (PYTHON=...: an interpreter other than .venv's or python3)
set -u
cd "$(dirname "$0")/.."
default_py=python3
[ -x .venv/bin/python ] && default_py=.venv/bin/python
PY="${PYTHON:-$default_py}"
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
failed=0

part() {  # part NAME SECONDS COMMAND...: run one benchmark under a time limit
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s) $(date -u +%T)"
    local start=$SECONDS
    timeout "$limit" "$@" || { echo "== $name FAILED (exit $?)"; failed=$((failed + 1)); }
    echo "== $name took $((SECONDS - start)) s"
}

"$PY" - <<'PYEOF' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device: gpu_check.sh is for a GPU machine"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
PYEOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

part attention 200 "$PY" -m benchmarks.attention --device cuda --seq-lens 512 2048 \
    --paths fast compiled --cases "token W=4 r=1" "token W=2 r=2" --repeats 20 \
    --out "$OUT/attention.json"
part moe 90 "$PY" -m benchmarks.moe_layer --device cuda --dtype bfloat16 --tokens 4096 16384 \
    --repeats 20 --out "$OUT/moe.json"
part train_step 170 "$PY" -m benchmarks.train_step --device cuda --precision bf16 \
    --configs tiny.yaml tiny-dot.yaml small.yaml --warmup 5 --steps 20 \
    --out "$OUT/train_step.json"
echo "== done: $failed part(s) failed; JSON in $OUT"
exit "$failed"
