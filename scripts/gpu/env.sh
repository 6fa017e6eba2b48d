# Sourced by check.sh and bench.sh: finds the GPU harness (teamtune-gpu: the `gpu` example of
# crates/train), the teamtune binary and the CUDA libraries they need, and sets TG (the
# harness), TT (the teamtune binary, when there is one), LD_LIBRARY_PATH and RESULTS (where
# outputs go).
#
# Works from the unpacked tarball (bin/teamtune-gpu, bin/teamtune, lib/, fixtures/) and from a
# checkout (target/cuda/release/examples/gpu, target/cuda/release/teamtune,
# crates/llama/tests/fixtures). TEAMTUNE_GPU=path overrides the harness, TEAMTUNE=path the
# teamtune binary. The binaries need, besides the driver's libcuda.so.1: libcublas.so.13 (which loads
# libcublasLt.so.13), libcurand.so.10 and libcudart.so.13 (packed). Searched in this
# order: lib/ next to this script, CUDA_LIB_DIRS (colon-separated), pip's nvidia wheels of every
# python3 on PATH (torch+cu130 brings them), /usr/local/cuda*/lib64, ldconfig, then a find
# under /opt /usr /root /home.
GPU_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -x $GPU_HERE/bin/teamtune-gpu || -x $GPU_HERE/bin/teamtune ]]; then
  GPU_ROOT=$GPU_HERE                                   # unpacked tarball
  TINY=$GPU_HERE/fixtures/tiny-llama31
else
  GPU_ROOT=$(cd "$GPU_HERE/../.." && pwd)              # checkout
  TINY=$GPU_ROOT/crates/llama/tests/fixtures/tiny-llama31
fi
TG=${TEAMTUNE_GPU:-}
if [[ -z $TG ]]; then
  for c in "$GPU_ROOT/bin/teamtune-gpu" "$GPU_ROOT/target/cuda/release/examples/gpu"; do
    [[ -x $c ]] && { TG=$c; break; }
  done
fi
[[ -n $TG && -x $TG ]] || { echo "env.sh: no GPU harness binary (set TEAMTUNE_GPU=...; built by scripts/gpu/build-cuda.sh, or cargo build --release -p teamtune-train --example gpu)" >&2; return 1 2>/dev/null || exit 1; }
TT=${TEAMTUNE:-}
if [[ -z $TT ]]; then
  for c in "$GPU_ROOT/bin/teamtune" "$GPU_ROOT/target/cuda/release/teamtune"; do
    [[ -x $c ]] && { TT=$c; break; }
  done
fi

DEVICE=${DEVICE:-cuda}
_need=(libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13)
_dirs=()
[[ -d $GPU_ROOT/lib ]] && _dirs+=("$GPU_ROOT/lib")
IFS=: read -r -a _extra <<< "${CUDA_LIB_DIRS:-}"
_dirs+=("${_extra[@]}")
for py in python3 python; do
  command -v "$py" >/dev/null 2>&1 || continue
  while IFS= read -r d; do _dirs+=("$d"); done < <("$py" - 2>/dev/null <<'PY'
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + sys.path)
for r in sorted(p for p in roots if p and os.path.isdir(p)):
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        print(d)
PY
)
done
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
  [[ -d $d ]] && _dirs+=("$d")
done
_ld=()
for so in "${_need[@]}"; do
  found=
  for d in "${_dirs[@]}"; do
    [[ -n $d && -e $d/$so ]] && { found=$d; break; }
  done
  if [[ -z $found ]]; then
    found=$(ldconfig -p 2>/dev/null | awk -v s="$so" '$1 == s {print $NF; exit}' | xargs -r dirname)
  fi
  if [[ -z $found && $DEVICE != cpu ]]; then  # last resort: a venv not on PATH (torch's wheels)
    found=$(find /opt /usr /root /home -maxdepth 9 -name "$so" -not -path '*/stubs/*' 2>/dev/null | head -n1 | xargs -r dirname)
  fi
  if [[ -n $found ]]; then
    [[ " ${_ld[*]} " == *" $found "* ]] || _ld+=("$found")
  elif [[ $DEVICE != cpu ]]; then
    echo "env.sh: WARNING: $so not found (set CUDA_LIB_DIRS)" >&2
  fi
done
export LD_LIBRARY_PATH=$(IFS=:; echo "${_ld[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
RESULTS=${RESULTS:-${OUT:-$GPU_ROOT/results}}
mkdir -p "$RESULTS"
export TG TT TINY RESULTS GPU_ROOT DEVICE
unset _need _dirs _extra _ld found so d py
