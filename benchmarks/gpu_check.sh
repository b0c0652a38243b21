#!/usr/bin/env bash
# The GPU checks in one run, under 10 minutes on one H100: what users run, each part under
# its own time limit, a failed part not stopping the others.
#   - two-step `launch/train.py` runs of tiny-moe: ZeRO-3 bf16; channel_xcorr + MoE at
#     ZeRO-2 bf16 (expert_matmul auto: grouped GEMM where CUDA fuses it); fp16 at ZeRO-2;
#     the plain engine with torch.compile (bf16);
#   - `leviathan export` and `leviathan sample` of the ZeRO-3 run;
#   - the attention benchmark (dot, token_xcorr, involution, inv_xcorr) and the MoE layer
#     benchmark (ours, DeepSpeed's on the CUDA accelerator, dense); bf16.
# Each part leaves $OUT/parts/NAME.json ({"part", "ok", "exit", "seconds", "limit"}); the
# benchmarks their tables as JSON, the runs their summary.json beside it; $OUT/summary.json
# lists them all. The last lines are one PASS/FAIL line per part; the exit status is the
# number of parts that failed. OUT defaults to benchmarks/results/gpu.
#
#   benchmarks/gpu_check.sh    (PYTHON=...: an interpreter other than .venv's or python3)
set -u
cd "$(dirname "$0")/.."
default_py=python3
[ -x .venv/bin/python ] && default_py=.venv/bin/python
PY="${PYTHON:-$default_py}"
OUT="${OUT:-benchmarks/results/gpu}"
RUNS="$OUT/runs"
mkdir -p "$OUT/parts" "$RUNS"
failed=0
lines=()

part() { # part NAME SECONDS COMMAND...: run one part under a time limit, record its result
    local name=$1 limit=$2 start=$SECONDS code=0 ok=false
    shift 2
    echo "== $name (limit ${limit} s) $(date -u +%T)"
    timeout "$limit" "$@" || code=$?
    local took=$((SECONDS - start))
    if [ "$code" -eq 0 ]; then ok=true; else failed=$((failed + 1)); fi
    printf '{"part": "%s", "ok": %s, "exit": %d, "seconds": %d, "limit": %d}\n' \
        "$name" "$ok" "$code" "$took" "$limit" >"$OUT/parts/$name.json"
    if [ "$ok" = true ]; then
        lines+=("PASS $name (${took} s)")
    else
        local why="exit $code"
        [ "$code" -eq 124 ] && why="over its limit"
        lines+=("FAIL $name ($why after ${took} s)")
    fi
}

# Two optimizer steps, one evaluation and one checkpoint, small enough to start fast.
SHORT=(train.max_steps=2 train.warmup_steps=1 train.eval_interval=2 train.ckpt_interval=2
    train.eval_tokens=8192 train.micro_batch_size=8 run.sample_tokens=16)

train_part() { # train_part NAME SECONDS OVERRIDE...: launch/train.py on tiny-moe, a part
    local name=$1 limit=$2
    shift 2
    part "$name" "$limit" "$PY" launch/train.py --config leviathan/configs/tiny-moe.yaml \
        "${SHORT[@]}" "run.dir=$RUNS/$name" "$@"
    cp "$RUNS/$name/summary.json" "$OUT/$name.json" 2>/dev/null || true
}

"$PY" - <<'PYEOF' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device: gpu_check.sh is for a GPU machine"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
PYEOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true

DS=(parallel.engine=deepspeed)
train_part zero3_bf16 130 "${DS[@]}" parallel.zero_stage=3 train.precision=bf16
train_part channel_moe_zero2_bf16 70 "${DS[@]}" parallel.zero_stage=2 train.precision=bf16 \
    "model.mixer={kind: channel_xcorr, lags: 2}"
train_part fp16_zero2 70 "${DS[@]}" parallel.zero_stage=2 train.precision=fp16
train_part torch_compile 100 parallel.engine=torch train.compile=true train.precision=bf16
part export 30 "$PY" -m leviathan.cli export --run "$RUNS/zero3_bf16" \
    --out "$OUT/zero3_bf16.safetensors"
part sample 30 bash -c '"$1" -m leviathan.cli sample --run "$2" --max-new-tokens 64 >"$3"' \
    _ "$PY" "$RUNS/zero3_bf16" "$OUT/sample.txt"
# bf16 (flash attention runs); token_xcorr and the generated-filter kinds against dot
part attention 100 "$PY" -m benchmarks.attention --device cuda --dtype bfloat16 \
    --seq-lens 2048 8192 --paths fast --repeats 10 \
    --cases "token W=4 r=1" "involution K=31" "inv_xcorr W=4 r=1" --out "$OUT/attention.json"
# DeepSpeed's MoE on the CUDA accelerator: the benchmark defaults DS_ACCELERATOR to cpu
part moe 60 env DS_ACCELERATOR=cuda "$PY" -m benchmarks.moe_layer --device cuda \
    --dtype bfloat16 --tokens 4096 16384 --repeats 10 --out "$OUT/moe.json"

{
    echo "["
    sep=""
    for f in "$OUT"/parts/*.json; do
        printf '%s' "$sep"
        cat "$f"
        sep=","
    done
    echo "]"
} >"$OUT/summary.json"
printf '%s\n' "${lines[@]}"
echo "== done: $failed part(s) failed; JSON in $OUT"
exit "$failed"
