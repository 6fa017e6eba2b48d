#!/usr/bin/env bash
# LLaMA-3.1-8B-shaped benchmark on the GPU machine: `teamtune-gpu bench` (the GPU harness,
# crates/train/examples/gpu/) with random weights made on the GPU (no download). Writes
# $RESULTS/bench-<config>.md (a markdown table) and the log next to it. Extra arguments go to
# `teamtune-gpu bench`, e.g.
#   scripts/gpu/bench.sh --skip-infer --seq 2048          # one training row pair only
#   scripts/gpu/bench.sh --skip-train --batch 1,8         # prefill and decode only
#   CONFIG=tiny DEVICE=cpu scripts/gpu/bench.sh --seq 64 --batch 1 --prefill-len 32  # smoke test
# The random weights (16 GB in bf16 for 8b) are written once to WEIGHTS_DIR (default:
# /dev/shm when it has room, else $TMPDIR) and reused by later runs on the same machine.
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/env.sh"
CONFIG=${CONFIG:-8b}
if [[ -z ${WEIGHTS_DIR:-} ]]; then
  [[ $CONFIG == 8b ]] && need_kb=$(( 20 * 1024 * 1024 )) || need_kb=1024
  if [[ -d /dev/shm ]] && (( $(df -Pk /dev/shm | awk 'NR==2 {print $4}') > need_kb )); then
    WEIGHTS_DIR=/dev/shm/teamtune-bench-$CONFIG
  else
    WEIGHTS_DIR=${TMPDIR:-/tmp}/teamtune-bench-$CONFIG
  fi
fi
tag=$CONFIG${BENCH_TAG:+-$BENCH_TAG}
{
  echo "# gpu-bench $(date -u +%FT%TZ), binary $TG"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || echo "no nvidia-smi"
} > "$RESULTS/bench-$tag.log"
"$TG" bench --device "$DEVICE" --config "$CONFIG" --weights-dir "$WEIGHTS_DIR" --reuse-weights \
  --out "$RESULTS/bench-$tag.md" "$@" 2>> "$RESULTS/bench-$tag.log"
echo "table: $RESULTS/bench-$tag.md; log: $RESULTS/bench-$tag.log"
