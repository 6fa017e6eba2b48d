#!/usr/bin/env bash
# The LoRA training benchmark of docs/BENCHMARKS.md: teamtune and PEFT in the same run, one
# after the other, on SmolLM2-135M-Instruct (f32, CPU, 2 threads), one sequence per step, with
# and without gradient checkpointing; PEFT with transformers' default attention (sdpa) and with
# eager. Each line is one process: tokens/s and its peak RSS (and, with /usr/bin/time, its page
# faults and system time).
#   scripts/bench-train.sh [SEQ...]      (default: 512 2048)
# Env: STEPS (timed steps per process, default 3), CHECKPOINTING (default "0 1"), ATTN (PEFT's
# attention implementations, default "sdpa eager"; empty: teamtune only), BASE_DTYPE (teamtune's
# frozen projections, default "f32 bf16": bf16 is `train --base-dtype bf16`, AVX512-BF16).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-default-model.sh >/dev/null
export RAYON_NUM_THREADS=2
steps="${STEPS:-3}"
cargo bench -p teamtune-train --bench lora_step --no-run 2>/dev/null
bench=$(cargo bench -p teamtune-train --bench lora_step --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and "lora_step" in m["executable"]: print(m["executable"])' | tail -1)
py="$(scripts/ref-env.sh)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
seqs=("$@"); [ ${#seqs[@]} -eq 0 ] && seqs=(512 2048)
for seq in "${seqs[@]}"; do
  for ckpt in ${CHECKPOINTING:-0 1}; do
    for base in ${BASE_DTYPE-f32 bf16}; do
      TEAMTUNE_BENCH_SEQ=$seq TEAMTUNE_BENCH_STEPS=$steps TEAMTUNE_BENCH_CHECKPOINTING=$ckpt \
        TEAMTUNE_BENCH_BASE_DTYPE=$base /usr/bin/time -f '{"wall_s": %e, "max_rss_kib": %M, "minor_faults": %R, "system_s": %S}' "$bench" 2>&1 | tail -2
    done
    flag=""; [ "$ckpt" = 1 ] && flag="--checkpointing"
    for attn in ${ATTN-sdpa eager}; do
      /usr/bin/time -f '{"wall_s": %e, "max_rss_kib": %M, "minor_faults": %R, "system_s": %S}' \
        "$py" scripts/bench_lora_reference.py --seq "$seq" --steps "$steps" --attn "$attn" $flag 2>&1 | tail -2
    done
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
