#!/usr/bin/env bash
# CUDA against CPU on the GPU machine (from the unpacked tarball or a checkout with the cuda
# build): `teamtune-gpu check` (the GPU harness, crates/train/examples/gpu/). Checks, each a
# PASS/FAIL line:
#   tiny-logits-f32-{inference,training}  tiny Llama-3.1-shaped model, logits at every position
#   tiny-kv-cache-f32                      cached decoding on the device vs full forward on CPU
#   tiny-lora-grads-{plain,checkpointed}   every LoRA factor's gradient through the training step
#   model-greedy-f32                       default model (SmolLM2-135M): greedy tokens identical
#   train-bf16-tracks-f32                  bf16 base: loss of 4 AdamW steps within 2% of f32's
#   train-dtypes                           base bf16; LoRA factors, grads, AdamW moments f32
# Environment: DEVICE (cuda, cuda:N; cpu = smoke test without a GPU), MODEL (a .gguf or HF
# folder for the model checks; default: the default model under $TEAMTUNE_HOME, or the
# model-parts in fixtures/ joined; none found = those checks are skipped and say so),
# TEAMTUNE_GPU (the harness binary), RESULTS or OUT (output folder). Exit status non-zero on any FAIL.
set -euo pipefail
source "$(cd "$(dirname "$0")" && pwd)/env.sh"

# The default model is 98 MB, more than one 64 MiB carry: it may arrive as parts to join.
if [[ -z ${MODEL:-} ]]; then
  parts=("$GPU_ROOT"/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf.part-*)
  joined=$GPU_ROOT/fixtures/SmolLM2-135M-Instruct.Q4_1.gguf
  if [[ -e ${parts[0]} && ! -e $joined ]]; then cat "${parts[@]}" > "$joined"; fi
  if [[ -e $joined ]]; then
    MODEL=$joined
  elif [[ -e ${TEAMTUNE_HOME:-$HOME/.cache/teamtune}/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf ]]; then
    MODEL=${TEAMTUNE_HOME:-$HOME/.cache/teamtune}/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
  fi
fi
model_args=(--skip-model)
[[ -n ${MODEL:-} ]] && model_args=(--model "$MODEL")

{
  echo "# gpu-check $(date -u +%FT%TZ)"
  echo "binary: $TG"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
  [[ $DEVICE == cpu ]] || ldd "$TG" | grep -E 'cuda|cublas|curand|nvrtc|not found' || true
} | tee "$RESULTS/check.txt"
set +e
"$TG" check --device "$DEVICE" --reference cpu --tiny "$TINY" "${model_args[@]}" "$@" 2> "$RESULTS/check.log" | tee -a "$RESULTS/check.txt"
rc=${PIPESTATUS[0]}
set -e
[[ $rc == 0 ]] || { echo "gpu-check failed (rc $rc); last log lines:"; tail -n 20 "$RESULTS/check.log"; } | tee -a "$RESULTS/check.txt"
exit "$rc"
