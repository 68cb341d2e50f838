PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint fmt clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/python -m components.demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check components flows tests bench
	$(BIN)/ruff format --check components flows tests bench

fmt: install
	$(BIN)/ruff format components flows tests bench
	$(BIN)/ruff check --fix components flows tests bench

clean:
	rm -rf $(VENV)
