#!/usr/bin/env bash
# GPU readiness in one script, inside 8 minutes on one H100/H200-class GPU:
#   1. bench/gpu_dit.py: DiT-XL/2 guided sampling images/s at batch 1..256, fp32 / bf16 weights /
#      bf16 autocast, SDPA vs math attention, then bf16 with torch.compile; fraction of the counted
#      FLOP bound (PEAK_TFLOPS, default 989 = H100 / H200 SXM dense bf16);
#   2. bench/rehearsal.py at paper depth (28 blocks) on the GPU: the whole asset graph, per-stage wall
#      time, peak RSS and peak GPU memory at N and 4N images per class.
# Needs the environment built (`make env`); nothing is downloaded. Tables go to $OUT (default
# bench/gpu_check_out/). Each part has its own time limit, so one slow part cannot eat the others'.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-bench/gpu_check_out}
PEAK=${PEAK_TFLOPS:-989}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
start=$(date +%s)
part() {  # part <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit} s)"
  timeout --signal=INT --kill-after=10 "$limit" "$@" || echo "== $name: exit $? (124 = hit its ${limit} s limit)"
  echo "== $name done at $(( $(date +%s) - start )) s"
}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
part 200 "throughput: dtype x attention, no compile" \
  "$PY" bench/gpu_dit.py --device cuda --dtype bf16,bf16w,fp32 --attention sdpa,math \
  --batches 1,16,64,256 --timed-steps 3 --batch1-images 2 --no-unguided --peak-tflops "$PEAK" --out "$OUT/gpu_dit.md"
part 100 "throughput: bf16 + torch.compile" \
  "$PY" bench/gpu_dit.py --device cuda --dtype bf16,bf16w --attention sdpa --compile on \
  --batches 1,64,256 --timed-steps 3 --batch1-images 2 --no-unguided --peak-tflops "$PEAK" --out "$OUT/gpu_dit_compiled.md"
part 160 "rehearsal at DiT-XL/2 depth 28" \
  "$PY" bench/rehearsal.py --device cuda --depth 28 --classes 3 --per-class 16 --scale 4 --steps 10 \
  --encode-batch 16 --train-batch 16 --memory-budget-mb 4096 --epochs 2 --out "$OUT/rehearsal.md"
echo "== total $(( $(date +%s) - start )) s; tables in $OUT/"
