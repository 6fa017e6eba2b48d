#!/usr/bin/env bash
# Build `teamtune` and the GPU harness `teamtune-gpu` (the `gpu` example of crates/train, which
# check.sh and bench.sh run) with `--features cuda` on a machine WITHOUT a GPU or a CUDA install,
# and pack what a GPU machine without network or Rust toolchain needs to run them.
#
#   scripts/gpu/build-cuda.sh            # wheels -> toolkit layout -> build -> ldd -> tarball
#   scripts/gpu/build-cuda.sh --no-pack  # stop after the build and the ldd check
#   scripts/gpu/build-cuda.sh --with-libs  # also pack cuBLAS/cuBLASLt/cuRAND from the wheels (~730 MB)
#   scripts/gpu/build-cuda.sh --rev HEAD   # build a commit (git archive into target/cuda-src),
#                                          # not the working tree
#
# nvcc, headers and the link-time libraries come from NVIDIA's PyPI wheels (CUDA 13.0, the
# version the GPU machines' driver 580 supports; nvcc must not be newer than the driver, because
# candle's kernels are PTX JIT-compiled by the driver). libcuda.so (the driver) is in no wheel:
# a stub exporting the driver API's names is linked against; the real one comes from the driver
# on the GPU machine.
#
# Environment (all optional):
#   TEAMTUNE_CUDA_CACHE  where the wheels go        (default: target/cuda-toolkit)
#   TEAMTUNE_CUDA_TARGET cargo target dir           (default: target/cuda)
#   CUDA_COMPUTE_CAP     SM version of the kernels  (default: 90, H100/H200)
#   OUT                  tarball path               (default: target/teamtune-cuda.tar.gz)
# Heavy steps run under `nice -n 19`. Needs python3 -m pip, cargo, gcc/g++ (host compiler of nvcc).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PACK=1
WITH_LIBS=0
REV=
while [[ $# -gt 0 ]]; do
  case $1 in
    --no-pack) PACK=0 ;;
    --with-libs) WITH_LIBS=1 ;;
    --rev) REV=$2; shift ;;
    *) echo "usage: $0 [--no-pack] [--with-libs] [--rev COMMIT]" >&2; exit 2 ;;
  esac
  shift
done

CACHE=${TEAMTUNE_CUDA_CACHE:-$ROOT/target/cuda-toolkit}
TARGET_DIR=${TEAMTUNE_CUDA_TARGET:-$ROOT/target/cuda}
OUT=${OUT:-$ROOT/target/teamtune-cuda.tar.gz}
SITE=$CACHE/site
CU=$SITE/nvidia/cu13

# Exact pins: 13.0.x toolkits (cudarc 0.19 supports 13.0-13.4; driver 580 = CUDA 13.0).
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)

log() { printf '[build-cuda] %s\n' "$*" >&2; }

# 1. Wheels ------------------------------------------------------------------------------------
stamp=$CACHE/.installed-$(printf '%s\n' "${WHEELS[@]}" | sha1sum | cut -c1-12)
if [[ ! -f $stamp ]]; then
  log "installing ${#WHEELS[@]} CUDA wheels into $SITE (about 700 MB download)"
  rm -rf "$SITE"; mkdir -p "$SITE"
  nice -n 19 python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --target "$SITE" "${WHEELS[@]}"
  touch "$stamp"
else
  log "wheels already in $SITE"
fi
[[ -x $CU/bin/nvcc ]] || { log "no nvcc at $CU/bin/nvcc: wheel layout changed?"; exit 1; }

# 2. A CUDA_HOME the build scripts understand ----------------------------------------------------
# nvcc looks for cicc/libdevice under ../nvvm relative to itself: the nvvm wheel puts them at
# $CU/nvvm already. Linker names (unversioned .so) for what cudarc/candle-kernels link with -l.
link_name() { # link_name libfoo  -> libfoo.so -> libfoo.so.N
  local base=$1 real
  real=$(cd "$CU/lib" && ls "$base".so.* 2>/dev/null | sort | head -n1 || true)
  [[ -n $real ]] || { log "missing $base.so.* in $CU/lib"; exit 1; }
  ln -sfn "$real" "$CU/lib/$base.so"
}
for l in libcudart libcublas libcublasLt libnvrtc libcurand; do link_name "$l"; done
[[ -e $CU/lib64 ]] || ln -sfn lib "$CU/lib64"

# libcuda stub: every driver-API function cudarc declares, as an empty function, soname
# libcuda.so.1 (what the real driver library answers to). Used only at link time.
STUB=$CU/lib/stubs
if [[ ! -f $STUB/libcuda.so ]]; then
  mkdir -p "$STUB"
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -n1 || true)
  if [[ -z $sys ]]; then
    nice -n 19 cargo fetch --locked >/dev/null
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -n1)
  fi
  grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$sys" | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' \
    | sort -u > "$STUB/libcuda_stub.c"
  log "libcuda stub: $(wc -l < "$STUB/libcuda_stub.c") driver symbols from $sys"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so" "$STUB/libcuda_stub.c"
fi

export CUDA_HOME=$CU CUDA_PATH=$CU CUDA_ROOT=$CU
export PATH=$CU/bin:$PATH
export NVCC=$CU/bin/nvcc
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$CU/lib:$STUB${LIBRARY_PATH:+:$LIBRARY_PATH}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
"$NVCC" --version | tail -n2 >&2

# 3. Build ---------------------------------------------------------------------------------------
if [[ -n $REV ]]; then
  SRC=$ROOT/target/cuda-src
  log "building commit $(git -C "$ROOT" rev-parse --short "$REV") from a clean export in $SRC"
  rm -rf "$SRC"; mkdir -p "$SRC"
  git -C "$ROOT" archive "$REV" | tar -x -C "$SRC"
  cd "$SRC"
fi
log "cargo build --release --features cuda -p teamtune, then -p teamtune-train --example gpu (target dir $TARGET_DIR)"
t0=$(date +%s)
nice -n 19 cargo build --locked --release --features cuda -p teamtune --bin teamtune \
  --target-dir "$TARGET_DIR"
nice -n 19 cargo build --locked --release --features cuda -p teamtune-train --example gpu \
  --target-dir "$TARGET_DIR"
log "build took $(( $(date +%s) - t0 )) s"
BIN=$TARGET_DIR/release/teamtune
GPU_BIN=$TARGET_DIR/release/examples/gpu

# 4. Shared-library needs -----------------------------------------------------------------------
for b in "$BIN" "$GPU_BIN"; do
  log "DT_NEEDED of $b:"
  objdump -p "$b" | awk '/NEEDED/ {print "  " $2}' >&2
  log "ldd with the wheels' libraries on LD_LIBRARY_PATH (libcuda.so.1 must come from the driver):"
  LD_LIBRARY_PATH=$CU/lib ldd "$b" | sed 's/^/  /' >&2 || true
done

[[ $PACK == 1 ]] || exit 0

# 5. Pack ---------------------------------------------------------------------------------------
# Default: the binaries, libcudart (small), scripts and the tiny fixture: small enough for a 64 MiB
# carry; cuBLAS(+Lt) and cuRAND are found on the GPU machine (pip nvidia-* wheels of its torch,
# or /usr/local/cuda) by env.sh. --with-libs also packs those from the wheels (about 730 MB:
# for a machine that has only the driver). The linker drops libnvrtc (--as-needed: candle
# loads its kernels as PTX through the driver), so NVRTC is not needed at run time.
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
P=$STAGE/teamtune-cuda
mkdir -p "$P/bin" "$P/lib" "$P/fixtures"
cp "$BIN" "$P/bin/teamtune"
strip "$P/bin/teamtune"
cp "$GPU_BIN" "$P/bin/teamtune-gpu"
strip "$P/bin/teamtune-gpu"
for so in $( (objdump -p "$BIN"; objdump -p "$GPU_BIN") | awk '/NEEDED/ {print $2}' | sort -u); do
  case $so in
    libcuda.so.1|libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|libgcc_s.so.*|ld-linux*|libstdc++.so.*) continue ;;
  esac
  [[ -e $CU/lib/$so ]] || { log "WARNING: $so is not in the wheels; the GPU machine must provide it"; continue; }
  if [[ $so == libcudart.so.* || $WITH_LIBS == 1 ]]; then cp -L "$CU/lib/$so" "$P/lib/$so"; fi
done
if [[ $WITH_LIBS == 1 ]]; then
  # Loaded at run time by the libraries above, not named by the binary.
  for so in libcublasLt.so.13; do
    [[ -e $CU/lib/$so ]] && cp -L "$CU/lib/$so" "$P/lib/$so"
  done
fi
cp scripts/gpu/check.sh scripts/gpu/bench.sh scripts/gpu/env.sh "$P/"
cp -r crates/llama/tests/fixtures/tiny-llama31 "$P/fixtures/"
(cd "$P" && find . -type f ! -name MANIFEST.sha256 | sort | xargs sha256sum > MANIFEST.sha256)
tar -C "$STAGE" -czf "$OUT" teamtune-cuda
log "packed $OUT ($(du -h "$OUT" | cut -f1)):"
tar -tzvf "$OUT" | awk '{printf "  %10s  %s\n", $3, $6}' >&2
log "sizes: wheels $(du -sh "$CACHE" | cut -f1), target dir $(du -sh "$TARGET_DIR" | cut -f1)"
