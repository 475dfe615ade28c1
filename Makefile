# Two commands for people (see README): `make demo` and `make test`. Everything else is plumbing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
SLIDE ?= ../shared/data/slides/CMU-1-Small-Region.svs
OUT ?= out/demo
PYTEST_ARGS ?=

.PHONY: venv sysdeps demo test lint bench lock ui

# Create .venv if missing, reuse it if present; reinstall only when the dependency files change.
# requirements/lock.txt pins every dependency of every extra (the images install with it too).
$(STAMP): pyproject.toml constraints.txt requirements/lock.txt
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip wheel setuptools
	$(VENV)/bin/pip install -c constraints.txt -c requirements/lock.txt -e '.[all]'
	@touch $(STAMP)

venv: $(STAMP)

# Rewrite requirements/lock.txt from the resolved .venv (after changing pyproject.toml: pip install the new
# requirement into .venv, then `make lock`, and commit the lock).
lock:
	@bash requirements/make-lock.sh $(VENV)

# Debian services the integration tests start and stop themselves (root on Debian 12; skipped when present).
sysdeps:
	@bash tests/sysdeps.sh

demo: venv
	$(VENV)/bin/mstar analyze $(SLIDE) --out $(OUT)

test: venv sysdeps
	$(VENV)/bin/ruff check service training tests bench docker
	$(VENV)/bin/ruff format --check service training tests bench docker
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# lint-imports: the import contracts of .importlinter (service <-> training, training's layers, no cycles)
lint: venv
	$(VENV)/bin/ruff check service training tests bench docker
	$(VENV)/bin/ruff format --check service training tests bench docker
	$(VENV)/bin/lint-imports

bench: venv
	$(VENV)/bin/python bench/tiling.py

# The viewer's JavaScript dependencies, pinned by ui/package-lock.json, copied into service/api/ui/static/vendor
# (committed, so the server needs no Node at run time); also installs playwright-core for the browser test.
ui:
	cd ui && npm ci --no-audit --no-fund && npm run build
