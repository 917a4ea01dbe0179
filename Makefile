# The two commands of the README: `make demo` and `make test`. Each creates/updates .venv itself.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test soak lint venv clean postgres

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/backbeat demo

# The docs site too: --strict fails on a broken link, anchor, page or API reference. The site goes
# to site/ (ignored); NO_MKDOCS_2_WARNING silences mkdocs-material's end-of-life banner.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/backbeat --help >/dev/null
	$(BIN)/backbeat schemas check --against history
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

postgres:
	bash infra/ensure-postgres.sh

test: venv lint postgres
	$(BIN)/python -m pytest

# The long runs at full size (about 15 minutes): the 1M-event run with five SIGKILLs.
soak: venv
	$(BIN)/python -m pytest -m soak

clean:
	rm -rf $(VENV) var site .pytest_cache .ruff_cache
