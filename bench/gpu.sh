#!/usr/bin/env bash
# The prepared GPU check: one command for a session that is lent a GPU machine, so that its 15
# minutes go to measuring. After `bash ../shared/tools/gpu-carry.sh` and the three data carries
# (see the developers' brief), run on the device, carrying .gpu/bin:
#   source .gpu/bin/setup.sh && bash bench/gpu.sh
# It writes under $OUT (or /tmp/gpu-out): the device, a one-epoch --profile table, every conv shape
# at batch 1024 / base depth 64 (GFLOP/s and % of fp32 peak, the tiled and block kernel sets), the full default run with --runs 3
# (training times and EMA accuracies, JSON and run log), then, in the time left, the full run with
# --precision f16 twice. Each step has its own time limit, shortest first, and all of them together
# stay under GPU_SH_BUDGET seconds (default 570, under the device's 600 s per command), so a slow GPU
# still returns the profile. Copy the figures into bench/RESULTS.md.
set -uo pipefail
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out/runs" "$out/runs-f16"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
: "${CIFAR10_DIR:?set CIFAR10_DIR (source .gpu/bin/setup.sh does)}"
deadline=$((SECONDS + ${GPU_SH_BUDGET:-570}))
step() { # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  if ((left < 20)); then
    echo "== $name: skipped, ${left}s left"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "   rc $rc after $((SECONDS - t0)) s"
  tail -n 25 "$out/$name.txt"
}
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1; deno --version; git log -1 --oneline; } |
  tee "$out/device.txt"
# fp32 peak (TFLOP/s, boost clock, vendor data sheets) for the conv bench's "% of peak"; unknown GPUs print none
case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)" in
  *H100*PCIe*) export BENCH_PEAK_TFLOPS=51.2 ;;
  *H100*NVL*) export BENCH_PEAK_TFLOPS=60 ;;
  *H100* | *H200*) export BENCH_PEAK_TFLOPS=66.9 ;;
esac
step profile 100 deno run -A main.ts --epochs 1 --profile --no-log --seed 1
BENCH_BATCH=1024 BENCH_BASE_DEPTH=64 BENCH_SETS=tiled,block step conv-bench 100 deno bench -A bench/conv.bench.ts
step full-run 370 deno run -A main.ts --runs 3 --seed 1 --json "$out/full.json" --log-dir "$out/runs"
step full-run-f16 240 deno run -A main.ts --runs 2 --seed 1 --precision f16 --json "$out/full-f16.json" \
  --log-dir "$out/runs-f16"
