#!/usr/bin/env bash
# The prepared GPU check: one command for a session that is lent a GPU machine, so that its 15
# minutes go to measuring. After `bash ../shared/tools/gpu-carry.sh` and the three data carries
# (see the developers' brief), run on the device, carrying .gpu/bin:
#   source .gpu/bin/setup.sh && bash bench/gpu.sh
# It writes under $OUT (or /tmp/gpu-out): the device, a one-epoch --profile table, every conv shape
# at batch 1024 / base depth 64 (GFLOP/s, both kernel sets), then the full default run with
# --runs 3 (training times and EMA accuracies, JSON and run log). Each step has its own time limit,
# shortest first, so a slow GPU still returns the profile. Copy the figures into bench/RESULTS.md.
set -uo pipefail
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out/runs"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
: "${CIFAR10_DIR:?set CIFAR10_DIR (source .gpu/bin/setup.sh does)}"
step() { # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "   rc $rc after $((SECONDS - t0)) s"
  tail -n 25 "$out/$name.txt"
}
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1; deno --version; git log -1 --oneline; } |
  tee "$out/device.txt"
step profile 120 deno run -A main.ts --epochs 1 --profile --no-log --seed 1
BENCH_BATCH=1024 BENCH_BASE_DEPTH=64 step conv-bench 120 deno bench -A bench/conv.bench.ts
step full-run 330 deno run -A main.ts --runs 3 --seed 1 --json "$out/full.json" --log-dir "$out/runs"
