# `make train` / `make test` create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test lint format bench-attention bench-moe clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	# the CPU build of torch first, pinned, so nothing pulls a CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	# DeepSpeed builds against the installed torch: no build isolation
	$(PY) -m pip install --quiet -c constraints.txt --no-build-isolation -e ".[dev]"
	touch $@

train: $(STAMP)
	$(VENV)/bin/leviathan train

test: $(STAMP)
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench-attention: $(STAMP)
	$(PY) benchmarks/attention.py

bench-moe: $(STAMP)
	$(PY) benchmarks/moe.py --threads 1

clean:
	rm -rf $(VENV) data runs wandb
