#!/usr/bin/env bash
# Build libstarflow's libFuzzer targets (runtime/cpp/fuzz: the manifest.json and .npy readers) with
# clang -fsanitize=fuzzer,address,undefined and run each for a bounded time from a seed corpus of
# real inputs (the demo exports' manifests, numpy-written .npy files).
#
#   scripts/fuzz_cpp.sh <build-dir> [seconds per target, default 25]
#
# `make cpp-fuzz` (and so `make test`) runs it for 25 s a target. A longer run, e.g. an hour a
# target on 4 cores (the corpus it grows is kept in <build-dir>/corpus and reused next time):
#   STARFLOW_FUZZ_JOBS=4 scripts/fuzz_cpp.sh build/cpp-fuzz 3600
# A finding stops the run with a non-zero exit and leaves its input in <build-dir>/findings/
# (replay one: <build-dir>/fuzz_manifest <build-dir>/findings/crash-...).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 <build-dir> [seconds per target]" >&2
  exit 2
fi
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
BUILD_DIR="$(mkdir -p "$1" && cd "$1" && pwd)"  # absolute: the fuzzers run from inside it
SECONDS_PER_TARGET="${2:-25}"
JOBS="${STARFLOW_FUZZ_JOBS:-1}"
VENV_PY="$REPO_ROOT/.venv/bin/python"

log() { echo "[fuzz_cpp] $*"; }
die() { echo "[fuzz_cpp] error: $*" >&2; exit 1; }

# --- 1. clang and its libFuzzer runtime (Debian's clang, libclang-rt-*-dev) -----------------------
source "$REPO_ROOT/scripts/system_packages.sh"
install_missing_packages clang libclang-rt-14-dev cmake ninja-build nlohmann-json3-dev libssl-dev

# --- 2. build --------------------------------------------------------------------------------------
cmake -S runtime/cpp/fuzz -B "$BUILD_DIR" -G Ninja -DCMAKE_CXX_COMPILER=clang++ >/dev/null
cmake --build "$BUILD_DIR"

# --- 3. seed corpus: real inputs -------------------------------------------------------------------
[[ -x "$VENV_PY" ]] || die "no venv at $REPO_ROOT/.venv (run: make venv)"
SEEDS="$BUILD_DIR/seeds"
mkdir -p "$SEEDS/manifest" "$SEEDS/npy" "$BUILD_DIR/corpus/manifest" "$BUILD_DIR/corpus/npy" "$BUILD_DIR/findings"
"$VENV_PY" - "$SEEDS" <<'PY'
import shutil
import sys
from pathlib import Path

import numpy as np

from starflow.export.cache import demo_artifacts

seeds = Path(sys.argv[1])
for video in (False, True):
    shutil.copy(demo_artifacts(video=video) / "manifest.json", seeds / "manifest" / f"demo-video{video}.json")
arrays = {
    "noise": np.random.default_rng(0).standard_normal((1, 1, 8, 8), dtype=np.float32),
    "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
    "half": np.ones((2, 2), np.float16),
    "scalar": np.float32(1.5),
    "empty": np.zeros((0, 4), np.float32),
}
for name, array in arrays.items():
    np.save(seeds / "npy" / f"{name}.npy", array)
PY

# --- 4. run ----------------------------------------------------------------------------------------
# one job runs in this process (its exit status is the verdict); more write fuzz-N.log files, kept
# in the build folder
parallel=()
[[ $JOBS -gt 1 ]] && parallel=(-jobs="$JOBS" -workers="$JOBS")
for target in manifest npy; do
  log "fuzz_$target: $SECONDS_PER_TARGET s, $JOBS job(s)"
  (cd "$BUILD_DIR" && "./fuzz_$target" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
    "${parallel[@]}" -print_final_stats=1 -artifact_prefix="$BUILD_DIR/findings/" \
    "$BUILD_DIR/corpus/$target" "$SEEDS/$target") > "$BUILD_DIR/fuzz_$target.log" 2>&1 ||
    { tail -n 40 "$BUILD_DIR/fuzz_$target.log"; die "fuzz_$target found a crash, hang or sanitizer report: see $BUILD_DIR/findings/"; }
  grep -E "^(Done|stat::)" "$BUILD_DIR/fuzz_$target.log"
done
log "done: no crash, hang or sanitizer report"
