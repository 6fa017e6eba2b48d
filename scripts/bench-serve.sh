#!/usr/bin/env bash
# Load test of `teamtune serve` on loopback (docs/BENCHMARKS.md, "Serve"): the default model
# served twice, batched (--max-batch 8) and one request at a time (--max-batch 1); each time
# N concurrent clients (crates/serve/benches/load.rs) send REQUESTS greedy chat completions of
# at most MAX_TOKENS tokens, bounded by DURATION_S seconds. Prints one line and one JSON line
# per mode; fails if a request was neither answered nor refused with 429.
#
#   scripts/bench-serve.sh                      # CLIENTS=8 REQUESTS=32 MAX_TOKENS=64
#   CLIENTS=16 REQUESTS=64 QUEUE=8 scripts/bench-serve.sh
#
# Env: CLIENTS, REQUESTS, MAX_TOKENS, DURATION_S, QUEUE (--queue-size), BATCH (batched mode's
# --max-batch), MODES (default "batched:$BATCH one-at-a-time:1": label:max-batch pairs), MODEL (--model, default: the default model), EXTRA (more serve flags, e.g.
# "--quantize q8_0" or "--adapter a0=/tmp/adapters/a0"), PORT (default 8931), RETRY_429 (times a
# client resends a refused request after its Retry-After, default 0), BIN (the teamtune binary,
# default target/release/teamtune built here: another build, e.g. an older commit's, to compare),
# SERVED (the model names clients send to, comma-separated, client c to the (c mod n)-th;
# default: the first /v1/models lists).
#
#   # 4 adapters x 4 clients against 1 adapter x 16 clients (adapters: scripts/random_adapters.py)
#   EXTRA="--adapter a0=/tmp/adapters/a0 --adapter a1=/tmp/adapters/a1 ..." SERVED=a0,a1,a2,a3 \
#     CLIENTS=16 MODES=continuous:16 scripts/bench-serve.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

clients="${CLIENTS:-8}"
requests="${REQUESTS:-32}"
max_tokens="${MAX_TOKENS:-64}"
duration="${DURATION_S:-900}"
queue="${QUEUE:-64}"
batch="${BATCH:-8}"
port="${PORT:-8931}"
model_flag=()
[ -n "${MODEL:-}" ] && model_flag=(--model "$MODEL")
# shellcheck disable=SC2206
extra=(${EXTRA:-})

scripts/fetch-default-model.sh >/dev/null
if [ -z "${BIN:-}" ]; then
  nice -n 10 cargo build --release -q -p teamtune
fi
nice -n 10 cargo bench -q -p teamtune-serve --bench load --no-run 2>/dev/null
bin="${BIN:-target/release/teamtune}"
served=()
[ -n "${SERVED:-}" ] && served=(--model "$SERVED")

server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true; }
trap cleanup EXIT

# shellcheck disable=SC2206
modes=(${MODES:-batched:$batch one-at-a-time:1})
for mode in "${modes[@]}"; do
  label="${mode%%:*}"
  max_batch="${mode##*:}"
  RUST_LOG=warn "$bin" serve "${model_flag[@]}" "${extra[@]}" --port "$port" \
    --max-batch "$max_batch" --queue-size "$queue" >/tmp/bench-serve.$$.out &
  server=$!
  for _ in $(seq 1 120); do
    grep -q http /tmp/bench-serve.$$.out 2>/dev/null && break
    sleep 0.5
  done
  url="$(head -1 /tmp/bench-serve.$$.out)"
  echo "== $label (--max-batch $max_batch, --queue-size $queue): ${clients} clients, $requests requests, max_tokens $max_tokens, at $url" >&2
  cargo bench -q -p teamtune-serve --bench load -- --url "$url" --clients "$clients" \
    --requests "$requests" --max-tokens "$max_tokens" --duration-s "$duration" --label "$label" \
    --retry-429 "${RETRY_429:-0}" "${served[@]}"
  kill -TERM "$server"
  wait "$server"
  server=""
done
rm -f /tmp/bench-serve.$$.out
