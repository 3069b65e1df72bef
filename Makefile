# Stamp lives inside .venv so deleting .venv also forces a reinstall.
VENV := .venv
STAMP := $(VENV)/.installed
BIN := $(VENV)/bin

.PHONY: venv demo test lint format clean cpp cpp-asan cpp-tsan cpp-fuzz

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[torch,onnx,components,dev,tensorrt-rtx,video,serve]'
	touch $@

demo: venv
	$(BIN)/starflow demo

test: venv cpp cpp-asan cpp-fuzz
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/python scripts/check_layers.py && $(BIN)/pytest -q --durations=25

cpp: venv
	scripts/build_cpp.sh build/cpp

cpp-asan: venv
	scripts/build_cpp.sh build/cpp-asan -DSTARFLOW_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo

# libFuzzer (clang; ASan + UBSan) on libstarflow's manifest.json and .npy readers, STARFLOW_FUZZ_SECONDS
# a target (default 25; scripts/fuzz_cpp.sh documents a longer run)
cpp-fuzz: venv
	scripts/fuzz_cpp.sh build/cpp-fuzz $${STARFLOW_FUZZ_SECONDS:-25}

# ThreadSanitizer: concurrent pipelines in threads (not part of `make test`: docs/benchmarks.md
# has its last result)
cpp-tsan: venv
	scripts/build_cpp.sh build/cpp-tsan -DSTARFLOW_SANITIZE_THREAD=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
	for video in False True; do \
	  export_dir="$$($(BIN)/python -c "from starflow.export.cache import demo_artifacts; print(demo_artifacts(video=$$video))")" && \
	  TSAN_OPTIONS=suppressions=runtime/cpp/tests/tsan.supp build/cpp-tsan/starflow-threads-test "$$export_dir" 4 2 || exit 1; \
	done

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/python scripts/check_layers.py

format: venv
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache artifacts
	rm -f starflow-generate.png starflow-demo.png
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
