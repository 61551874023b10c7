# Two commands set up a fresh machine: `make run` (the tiny falsity sweep) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR := cpu
export HF_HUB_OFFLINE := 1
export WANDB_MODE := offline

.PHONY: run test test-fast bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first: a bare `torch` requirement would pull the CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# kronfluence (EK-FAC, LinFAC's comparison arm) without its declared deps: it names torchvision,
	# whose PyPI wheel replaces the CPU torch; it never imports it. Its real needs are pinned here.
	$(BIN)/python -m pip install -q --no-deps kronfluence==1.0.1 einconv==0.1.0 opt_einsum==3.4.0
	touch $@

run: $(BIN)/.installed
	$(BIN)/python -m jobs.falsity_sweep --config configs/falsity_sweep/tiny.yaml

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q --durations=15

# the inner loop: everything but the end-to-end jobs and multi-worker learners (about 2 minutes)
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(BIN)/.installed
	$(BIN)/python -m benchmarks.bench_learner

clean:
	rm -rf runs .pytest_cache
