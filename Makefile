# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both set up .venv on first use: torch (the CUDA 13.0 build, which also runs on CPU-only
# machines), the build and test tools, and hzo_ext built in place.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
BUILD_DEPS := numpy pytest ninja pybind11 cmake setuptools wheel scikit-learn matplotlib tqdm
# Models users bring, for the front-end tests (python_tests/test_graph.py): torchvision matching TORCH_SPEC.
MODEL_DEPS ?= torchvision==0.29.1 timm
# CUDA kernels are built when FORCE_CUDA=1 (CI does) or a GPU and a toolkit are present.
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/lib64),/usr/local/cuda,)
export MAX_JOBS ?= 2

.PHONY: setup build demo test test-python test-cpp gtest bench clean

setup: $(VENV)/.deps

$(VENV)/.deps: Makefile  # re-run (idempotent) when the dependency lists change
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) $(BUILD_DEPS) $(MODEL_DEPS)
	touch $@

build: setup
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m hzo_ext info

demo: build
	rm -rf runs/demo-hzo runs/demo-backprop  # a fresh demo each time (a run folder is never reused silently)
	$(VENV)/bin/hzo-ext train --out runs/demo-hzo
	$(VENV)/bin/hzo-ext train --out runs/demo-backprop --estimator bp
	@for run in hzo backprop; do awk -F, -v run=$$run 'NR == 1 {for (i = 1; i <= NF; i++) if ($$i == "test_acc") c = i} \
	  END {printf "final test accuracy on digits: %s %.4f\n", run, $$c}' runs/demo-$$run/metrics.csv; done

test: build test-python test-cpp

# The whole Python suite, then once more on the pure-PyTorch fallback (extension disabled).
test-python:
	$(PY) -m pytest -q python_tests
	HZO_EXT_DISABLE=1 $(PY) -m pytest -q python_tests

# GoogleTest comes from the system (Debian's libgtest-dev): installed here when run as root with
# apt-get, else the one command to run is printed and make stops.
gtest:
	@if [ -e /usr/include/gtest/gtest.h ] || [ -e /usr/local/include/gtest/gtest.h ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "GoogleTest missing: apt-get install libgtest-dev"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev; \
	else \
	  echo "GoogleTest is missing; install it with: sudo apt-get install libgtest-dev" >&2; exit 1; \
	fi

test-cpp: setup gtest
	$(VENV)/bin/cmake -S . -B build/cpp -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja
	$(VENV)/bin/cmake --build build/cpp
	cd build/cpp && $(abspath $(VENV))/bin/ctest --output-on-failure

bench: build
	$(PY) benchmarks/bench_contract.py

clean:
	rm -rf build dist *.egg-info hzo_ext/_C*.so
