#!/usr/bin/env bash
# Exercise every GPU path this machine offers, in well under 8 minutes, and say which ran.
#
#   scripts/gpu_check.sh            (from the repository root, in the project's environment)
#
# Paths: the PyTorch reference on CUDA (pytest -m gpu, model tests), ONNX Runtime's CUDA and
# TensorRT execution providers, and the native TensorRT backend (engines built here with
# `tensorrt` or `tensorrt_rtx`, run through cuda-python). A path whose library or GPU is
# missing is reported as skipped with the reason; the exit status is non-zero only when a path
# that ran failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
failed=0
summary=()

probe() { # probe PYTHON-EXPRESSION -> prints the reason a path cannot run, or nothing
    "$PYTHON" - "$1" <<'PY' 2>/dev/null || echo "probe failed"
import sys
try:
    reason = eval(sys.argv[1])
except Exception as err:  # a missing module is a reason, not an error
    reason = f"{type(err).__name__}: {err}"
print(reason or "", end="")
PY
}

path() { # path NAME REASON-EXPRESSION PYTEST-ARGS...
    local name=$1 why
    why=$(probe "$2")
    shift 2
    if [[ -n $why ]]; then
        summary+=("skipped  $name: $why")
        return
    fi
    local log
    log=$(mktemp)
    if timeout 240 "$PYTHON" -m pytest -q -rs -p no:cacheprovider "$@" >"$log" 2>&1; then
        summary+=("ran      $name: $(tail -n 1 "$log") (skips and their reasons: SKIPPED lines above)")
    else
        failed=1
        summary+=("FAILED   $name: $(tail -n 1 "$log")")
    fi
    cat "$log"
    rm -f "$log"
}

CUDA='None if __import__("torch").cuda.is_available() else "torch sees no CUDA GPU"'
path "reference model on CUDA (pytest -m gpu)" "$CUDA" -m gpu tests --ignore=tests/runtime/test_trt_backend.py
path "onnxruntime CUDA/TensorRT providers" \
    '"onnxruntime has no CUDA provider (install starflow[gpu])" if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers() else None' \
    -m gpu tests/runtime/test_trt_backend.py -k onnxruntime
path "TensorRT backend (native engines)" \
    '__import__("importlib").util.find_spec("tensorrt") is None and __import__("importlib").util.find_spec("tensorrt_rtx") is None and "neither tensorrt nor tensorrt_rtx is installed" or __import__("importlib").util.find_spec("cuda") is None and "cuda-python is not installed" or None' \
    -m gpu tests/runtime/test_trt_backend.py -k tensorrt_backend

echo
echo "GPU paths on $(nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'):"
printf '  %s\n' "${summary[@]}"
exit $failed
