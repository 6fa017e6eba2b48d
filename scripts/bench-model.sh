#!/usr/bin/env bash
# The model benchmarks of docs/BENCHMARKS.md, one after the other on an otherwise idle machine:
# teamtune (f32, bf16, Q8_0 and Q4_0 inference paths) and transformers on the same prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-default-model.sh >/dev/null
export RAYON_NUM_THREADS=2
cargo bench -p teamtune-llama --bench smollm2 --no-run 2>/dev/null
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
cargo bench -q -p teamtune-llama --bench smollm2 2>/dev/null | tail -1
TEAMTUNE_BENCH_DTYPE=bf16 cargo bench -q -p teamtune-llama --bench smollm2 2>/dev/null | tail -1
TEAMTUNE_BENCH_QUANTIZE=q8_0 cargo bench -q -p teamtune-llama --bench smollm2 2>/dev/null | tail -1
TEAMTUNE_BENCH_QUANTIZE=q4_0 cargo bench -q -p teamtune-llama --bench smollm2 2>/dev/null | tail -1
"$(scripts/ref-env.sh)" scripts/bench_reference.py 2>/dev/null | tail -1
