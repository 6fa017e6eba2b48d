#!/usr/bin/env bash
# Create (once) the Python reference environment used to produce fixtures and reference numbers
# (transformers / peft / torch on CPU), and print the path of its python on stdout.
#
#   $(scripts/ref-env.sh) scripts/make_reference.py
#
# The venv lives at ${TEAMTUNE_REF_VENV:-<repo>/.venv-ref} (git-ignored). Versions are pinned so
# that fixtures are reproducible; an existing venv is reused only if every pin matches, otherwise
# the missing/mismatched pins are (re)installed with pip. All progress goes to stderr.
# Env: PYTHON (interpreter used to create the venv, default python3, needs >= 3.10),
#      TEAMTUNE_REF_VENV, and the usual PIP_* variables (e.g. PIP_EXTRA_INDEX_URL for CPU torch wheels).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TEAMTUNE_REF_VENV:-$repo/.venv-ref}"
python="${PYTHON:-python3}"

# Pins: the versions the committed fixtures were made with (crates/llama/tests/fixtures).
pins=(
  "torch==2.15.0"
  "transformers==5.24.0"
  "tokenizers==0.23.3"
  "peft==0.21.2"
  "accelerate==1.15.0"
  "gguf==0.19.0"
  "safetensors==0.8.0"
  "numpy==2.4.6"
  "sentencepiece==0.2.3"
  "openai==3.57.0"
)

vpy="$venv/bin/python"

# Prints the pins that are not satisfied by the venv (nothing when all match).
missing_pins() {
  "$vpy" - "${pins[@]}" <<'PY'
import sys
from importlib import metadata
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    # local version labels (e.g. 2.15.0+cpu) satisfy the pin too
    if have is None or have.split("+")[0] != want:
        print(pin)
PY
}

if [ ! -x "$vpy" ]; then
  echo "ref-env: creating venv $venv" >&2
  "$python" -m venv "$venv" >&2
  "$vpy" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2 || true
fi

todo="$(missing_pins)"
if [ -n "$todo" ]; then
  echo "ref-env: installing into $venv:" $todo >&2
  # shellcheck disable=SC2086
  "$vpy" -m pip install --disable-pip-version-check "${pins[@]}" >&2
  todo="$(missing_pins)"
  if [ -n "$todo" ]; then
    echo "ref-env: pins still not satisfied after install:" $todo >&2
    exit 1
  fi
fi

echo "$vpy"
