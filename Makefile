# The README's two commands are `make run` and `make test`; both install on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test test-fast bench benchmark-table lint format clean

install: $(STAMP)

# torch/torchvision are pinned by constraints.txt: an unpinned resolve would pull a newer torch
# and GBs of CUDA wheels.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: install  ## the embedded default, end to end (DPDM at eps=10 on MNIST-5k)
	$(BIN)/python -m dpgen $(ARGS)

test: install  ## the whole suite (slow end-to-end checks included)
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install  ## DP-SGD step vs non-private step, time and memory (outputs/bench.json)
	$(BIN)/python -m dpgen.bench $(ARGS)

benchmark-table: install  ## every method at eps 1 and 10, same training seconds, table into README
	$(BIN)/python -m dpgen.benchmark $(ARGS)

lint: install
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .

clean:
	rm -rf outputs multirun .cache .pytest_cache
