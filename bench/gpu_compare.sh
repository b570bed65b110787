#!/usr/bin/env bash
# bench/gpu_compare.sh: densegrad against PyTorch on one CUDA GPU, RDNet-tiny at batch 64 and
# 224 px, a training step and inference: densegrad fp32 and TF32 (rdnet_bench --tf32), PyTorch
# fp32, TF32, bf16 autocast, and bf16 autocast with channels-last; then a markdown table of
# images per second, peak GPU memory and the densegrad / PyTorch ratios. densegrad bf16 is
# rdnet_bench --precision bf16 --tf32 (conv products in bfloat16, the head's linear in TF32;
# float32 activations, weights and gradients); its training also runs with --memory-efficient
# (norm and activation outputs recomputed in backward). Measures only.
#
#   bench/gpu_compare.sh [BUILD_DIR]     # from the repo root; BUILD_DIR (default build) holds
#                                        # bin/rdnet_bench built with CUDA
# Settings through the environment: MODEL (tiny), BATCH (64), RES (224), WARMUP (3), ITERS (10),
# TIMEOUT (seconds per run, 120), PYTHON (python3), LOG_DIR (each run's full output; a temp dir).
# With the defaults the fifteen runs take about four minutes on an H100.
set -u

BUILD=${1:-build}
BENCH="$BUILD/bin/rdnet_bench"
MODEL=${MODEL:-tiny} BATCH=${BATCH:-64} RES=${RES:-224} WARMUP=${WARMUP:-3} ITERS=${ITERS:-10}
TIMEOUT=${TIMEOUT:-120} PYTHON=${PYTHON:-python3}
LOG_DIR=${LOG_DIR:-$(mktemp -d /tmp/gpu_compare.XXXXXX)}
mkdir -p "$LOG_DIR"
HERE=$(cd "$(dirname "$0")" && pwd)

if [ ! -x "$BENCH" ]; then
  echo "gpu_compare: error: $BENCH not found: build it with \`cmake --build $BUILD --target rdnet_bench\`" >&2
  exit 1
fi
HAVE_TORCH=1
if ! "$PYTHON" -c 'import torch, timm, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  HAVE_TORCH=0
  echo "gpu_compare: PyTorch rows skipped: $PYTHON cannot import torch and timm with CUDA (pip install torch timm)"
fi
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)

COMMON=(--model "$MODEL" --batch "$BATCH" --res "$RES" --warmup "$WARMUP" --iters "$ITERS" --device cuda)
declare -A IPS MEM  # by "mode/run": images per second, peak GPU MiB (or why there is none)
FAILED=0
RUNS=("densegrad fp32" "densegrad tf32" "densegrad bf16" "densegrad bf16 memory-efficient" "torch fp32" "torch tf32"
      "torch bf16" "torch bf16 channels-last")

# field KEY LINE: the value of KEY=... in a RESULT line.
field() { tr ' ' '\n' <<<"$2" | sed -n "s/^$1=//p"; }

for mode in train infer; do
  for run in "${RUNS[@]}"; do
    [[ $mode == infer && $run == *memory-efficient ]] && continue  # nothing kept for backward
    case $run in
      "densegrad fp32")          cmd=("$BENCH" "${COMMON[@]}" --mode "$mode") ;;
      "densegrad tf32")          cmd=("$BENCH" "${COMMON[@]}" --mode "$mode" --tf32) ;;
      "densegrad bf16")          cmd=("$BENCH" "${COMMON[@]}" --mode "$mode" --precision bf16 --tf32) ;;
      "densegrad bf16 memory-efficient")
                                 cmd=("$BENCH" "${COMMON[@]}" --mode "$mode" --precision bf16 --tf32 --memory-efficient) ;;
      "torch fp32")              cmd=("$PYTHON" "$HERE/torch_bench.py" "${COMMON[@]}" --mode "$mode" --precision fp32) ;;
      "torch tf32")              cmd=("$PYTHON" "$HERE/torch_bench.py" "${COMMON[@]}" --mode "$mode" --precision tf32) ;;
      "torch bf16")              cmd=("$PYTHON" "$HERE/torch_bench.py" "${COMMON[@]}" --mode "$mode" --precision bf16) ;;
      "torch bf16 channels-last") cmd=("$PYTHON" "$HERE/torch_bench.py" "${COMMON[@]}" --mode "$mode" --precision bf16 --channels-last) ;;
    esac
    key="$mode/$run"
    if [[ $run == torch* && $HAVE_TORCH == 0 ]]; then
      IPS[$key]="skipped"; MEM[$key]=""
      continue
    fi
    log="$LOG_DIR/${mode}_${run// /_}.log"
    echo "gpu_compare: $mode, $run: ${cmd[*]}"
    timeout "$TIMEOUT" "${cmd[@]}" >"$log" 2>&1
    rc=$?
    line=$(grep '^RESULT ' "$log" | tail -n 1)
    if [ $rc -ne 0 ] || [ -z "$line" ]; then
      why="exit $rc"; [ $rc -eq 124 ] && why="timed out after ${TIMEOUT}s"
      IPS[$key]="failed ($why: $(grep -v '^ *$' "$log" | tail -n 1 | cut -c1-120 | tr '|' '/'))"; MEM[$key]=""
      echo "gpu_compare:   ${IPS[$key]}"
      FAILED=1
      continue
    fi
    IPS[$key]=$(field img_per_s "$line")
    MEM[$key]=$(field peak_gpu_mb "$line")
    echo "gpu_compare:   ${IPS[$key]} img/s, peak GPU ${MEM[$key]} MiB"
  done
done

# ratio A B: A / B with two decimals, or "-" when either is not a number.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2f", a / b; else printf "-" }'; }

echo
echo "RDNet-$MODEL, batch $BATCH, ${RES}x${RES}, ${GPU:-unknown GPU}; $WARMUP warmup + $ITERS timed iterations each."
echo "Ratios: densegrad's images per second over this row's (above 1, densegrad is faster). Logs: $LOG_DIR"
echo
echo "| mode | run | img/s | peak GPU MiB | densegrad fp32 / this | densegrad tf32 / this | densegrad bf16 / this |"
echo "|---|---|---:|---:|---:|---:|---:|"
for mode in train infer; do
  for run in "${RUNS[@]}"; do
    key="$mode/$run"
    [ -n "${IPS[$key]+set}" ] || continue
    ips=${IPS[$key]}
    echo "| $mode | $run | $ips | ${MEM[$key]} | $(ratio "${IPS[$mode/densegrad fp32]}" "$ips") |" \
         "$(ratio "${IPS[$mode/densegrad tf32]}" "$ips") | $(ratio "${IPS[$mode/densegrad bf16]}" "$ips") |"
  done
done
exit $FAILED
