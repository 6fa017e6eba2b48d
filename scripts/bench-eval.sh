#!/usr/bin/env bash
# The agent-runtime benchmark of docs/BENCHMARKS.md: `teamtune eval` of the base default model
# (schema-constrained, greedy) on every task, CPU, 2 threads, one episode at a time
# (--parallel 1: batch 1) vs several episodes decoded together, dense f32 and --quantize q8_0.
#   scripts/bench-eval.sh [EPISODES] [PARALLEL...]     (default: 2 episodes; 1 and 8)
# Each line: settings, agent turns/s, generated tokens/s, wall time, invalid-reply rate.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-default-model.sh >/dev/null
export RAYON_NUM_THREADS=2
episodes="${1:-2}"; shift || true
parallels=("$@"); [ ${#parallels[@]} -eq 0 ] && parallels=(1 8)
cargo build --release -q -p teamtune
out="$(mktemp -d)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for quant in "" q8_0; do
  for p in "${parallels[@]}"; do
    dir="$out/eval-p$p${quant:+-$quant}"
    target/release/teamtune eval --task all --episodes "$episodes" --parallel "$p" \
      ${quant:+--quantize $quant} --out "$dir" >/dev/null 2>&1
    python3 - "$dir/eval.json" "$p" "${quant:-f32}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
turns = sum(t["turns"] for t in r["tasks"])
tokens = sum(t["generated_tokens"] for t in r["tasks"])
wall = r["wall_seconds"]
print(json.dumps({"parallel": int(sys.argv[2]), "weights": sys.argv[3],
                  "episodes": sum(t["episodes"] for t in r["tasks"]), "turns": turns,
                  "generated_tokens": tokens, "wall_s": round(wall, 1),
                  "turns_per_s": round(turns / wall, 3), "tokens_per_s": round(tokens / wall, 2),
                  "mean_score": round(r["mean_score"], 2),
                  "invalid_reply_rate": r["invalid_reply_rate"]}))
PY
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
