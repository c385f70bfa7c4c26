# User-facing targets: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install --disable-pip-version-check -q -c requirements/constraints.txt
PGML_TEST_PG ?= 18

.PHONY: run test lint pytest bench venv

run: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then echo "note: running as root; the proxy should run as an unprivileged OS user that can read only its model and data directories (README: Security model)" >&2; fi
	$(BIN)/pgml-proxy $(ARGS)

test: $(STAMP) lint
	PGML_TEST_PG=18 $(BIN)/pytest $(PYTEST_ARGS)
	PGML_TEST_PG=15 $(BIN)/pytest -m "pg_matrix" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check proxy engine tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/passthrough.py
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/ml.py
	$(BIN)/python bench/hf.py
	$(BIN)/python bench/fairness.py

venv: $(STAMP)

# Re-install only when the dependency declarations change.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[dev]'
	touch $(STAMP)
