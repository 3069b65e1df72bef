#!/usr/bin/env bash
# Build the native runtime (runtime/cpp -> libstarflow.so) and its example
# consumer.
#
#   scripts/build_cpp.sh <build-dir> [extra cmake args...]
#
# Installs missing system packages with apt (root only), fetches the ONNX
# Runtime C headers from Debian 13's libonnxruntime-dev package (Debian 12 has
# none) into build/cpp-deps/, takes libonnxruntime.so.1.* from the venv's PyPI
# onnxruntime wheel, then configures + builds with CMake/Ninja.
#
# Env: STARFLOW_CPP_SOURCE overrides the source dir (default runtime/cpp).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 <build-dir> [extra cmake args...]" >&2
  exit 2
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

BUILD_DIR="$1"
shift
mkdir -p "$BUILD_DIR"
BUILD_DIR="$(cd "$BUILD_DIR" && pwd)"
SOURCE_DIR="${STARFLOW_CPP_SOURCE:-runtime/cpp}"
SOURCE_DIR="$(cd "$SOURCE_DIR" && pwd)"
VENV_PY="$REPO_ROOT/.venv/bin/python"
DEPS_DIR="$REPO_ROOT/build/cpp-deps"

ORT_DEB_URL="http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb"
ORT_DEB_SHA256="14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08"
ORT_DEB="$DEPS_DIR/$(basename "$ORT_DEB_URL")"
ORT_DEV_DIR="$DEPS_DIR/onnxruntime-dev"

log() { echo "[build_cpp] $*"; }
die() { echo "[build_cpp] error: $*" >&2; exit 1; }

# --- 1. system packages --------------------------------------------------------
source "$REPO_ROOT/scripts/system_packages.sh"
install_missing_packages cmake ninja-build g++ nlohmann-json3-dev libssl-dev libsentencepiece-dev pkg-config curl ca-certificates

# --- 2. ONNX Runtime C headers (Debian 13 libonnxruntime-dev .deb) --------------
sha_ok() { [[ -f "$1" ]] && echo "$ORT_DEB_SHA256  $1" | sha256sum -c --status -; }

mkdir -p "$DEPS_DIR"
if ! sha_ok "$ORT_DEB"; then
  log "downloading $ORT_DEB_URL"
  rm -f "$ORT_DEB" "$ORT_DEB.part"
  curl -fSL --retry 5 --retry-delay 3 --retry-connrefused --connect-timeout 30 \
    -o "$ORT_DEB.part" "$ORT_DEB_URL" || die "download of $ORT_DEB_URL failed"
  actual="$(sha256sum "$ORT_DEB.part" | cut -d' ' -f1)"
  if [[ "$actual" != "$ORT_DEB_SHA256" ]]; then
    rm -f "$ORT_DEB.part"
    die "SHA256 mismatch for $(basename "$ORT_DEB"): expected $ORT_DEB_SHA256, got $actual"
  fi
  mv "$ORT_DEB.part" "$ORT_DEB"
  rm -rf "$ORT_DEV_DIR"
fi

find_ort_header() {
  [[ -d "$ORT_DEV_DIR" ]] || return 0
  find "$ORT_DEV_DIR" -name onnxruntime_c_api.h -type f -print -quit
}
ORT_HEADER="$(find_ort_header)"
if [[ -z "$ORT_HEADER" ]]; then
  log "extracting $(basename "$ORT_DEB") -> $ORT_DEV_DIR"
  rm -rf "$ORT_DEV_DIR" "$ORT_DEV_DIR.tmp"
  dpkg-deb -x "$ORT_DEB" "$ORT_DEV_DIR.tmp"
  mv "$ORT_DEV_DIR.tmp" "$ORT_DEV_DIR"
  ORT_HEADER="$(find_ort_header)"
  [[ -n "$ORT_HEADER" ]] || die "onnxruntime_c_api.h not found in $ORT_DEV_DIR"
fi
ORT_INCLUDE_DIR="$(dirname "$ORT_HEADER")"
log "ONNX Runtime headers: $ORT_INCLUDE_DIR"

# --- 3. ONNX Runtime library (venv's PyPI onnxruntime wheel) --------------------
[[ -x "$VENV_PY" ]] || die "no venv at $REPO_ROOT/.venv (run: make venv)"
ORT_LIB="$("$VENV_PY" - <<'PY'
import pathlib
import sys

try:
    import onnxruntime
except ImportError:
    sys.exit(0)
capi = pathlib.Path(onnxruntime.__file__).resolve().parent / "capi"
libs = sorted(capi.glob("libonnxruntime.so.1.*"))
print(libs[-1] if libs else "")
PY
)"
[[ -n "$ORT_LIB" && -f "$ORT_LIB" ]] ||
  die "the venv has no onnxruntime package with capi/libonnxruntime.so.1.* (run: make venv)"
log "ONNX Runtime library: $ORT_LIB"

# --- 4. configure + build ------------------------------------------------------
log "configuring $SOURCE_DIR -> $BUILD_DIR"
cmake -S "$SOURCE_DIR" -B "$BUILD_DIR" -G Ninja \
  -DONNXRUNTIME_INCLUDE_DIR="$ORT_INCLUDE_DIR" \
  -DONNXRUNTIME_LIBRARY="$ORT_LIB" \
  "$@"
cmake --build "$BUILD_DIR"

# --- 5. example consumer (separate project, via find_package) -------------------
log "building example consumer -> $BUILD_DIR/examples"
cmake -S "$SOURCE_DIR/examples" -B "$BUILD_DIR/examples" -G Ninja \
  -Dstarflow_DIR="$BUILD_DIR"
cmake --build "$BUILD_DIR/examples"

log "done: $BUILD_DIR/libstarflow.so, $BUILD_DIR/starflow-run, $BUILD_DIR/starflow-tests, $BUILD_DIR/examples/sample_c"
