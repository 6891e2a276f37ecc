# The two commands. Each creates .venv when missing and installs what it needs (CPU JAX).
#   make train   pretrain a tiny BERT on the builtin corpus (Python's own docs), on the CPU
#   make test    the test suite (CPU, 8 fake devices)
# and `make lint`: ruff's lint and format checks (`make format` applies the formatting).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/tiny
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k model -x"`.
PYTEST_ARGS ?=
# pytest-xdist workers; the tests of one file (all of tests/finetune) share a worker.
PYTEST_WORKERS ?= 2

.PHONY: train test lint format clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "bertjax needs Python 3.11 or newer: run make PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install when the dependency list changes.
$(VENV)/.train-deps: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	@touch $@

# The test environment pins torch to a small CPU build (constraints-test.txt); libtpu (the tpu
# extra) lets the suite compile the train step for a TPU slice on this CPU.
$(VENV)/.test-deps: pyproject.toml constraints-test.txt | $(PY)
	$(PY) -m pip install -q -c constraints-test.txt -e '.[dev,hf,tpu]'
	@touch $@

# Tokenizer (trained on first use), pretraining, held-out evaluation, curves, and an export that
# transformers loads. A second run resumes from the newest checkpoint, or just reports.
train: $(VENV)/.train-deps
	$(PY) -m bertjax train --config configs/tiny.py --workdir $(WORKDIR)
	$(PY) -m bertjax plot --workdir $(WORKDIR)
	$(PY) -m bertjax export --workdir $(WORKDIR) --format hf

# BERTJAX_REQUIRE_EXTRAS: a missing torch or transformers fails the suite instead of skipping
# the parity tests.
test: $(VENV)/.test-deps
	BERTJAX_REQUIRE_EXTRAS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: $(VENV)/.test-deps
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.test-deps
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache
