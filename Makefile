PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test lint fmt clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

# Subprocesses (dvc stages, tests) find `rsllm` and `dvc` in the venv.
export PATH := $(CURDIR)/$(BIN):$(PATH)
# Offline by design: no telemetry from Prefect's (ephemeral) server or BentoML.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export BENTOML_DO_NOT_TRACK := true

# The whole weekly retrain once, on the embedded defaults (demo profile), in Prefect's ephemeral mode.
demo: install
	$(BIN)/python -m flows.retrain --profile demo

test: install browser
	$(BIN)/python -m pytest -q

# Headless Chromium + its driver for the service's UI test (Debian packages: test tools cannot download
# browsers here). Installs only when missing; needs root or sudo.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

lint: install
	$(BIN)/ruff check components flows tests bench
	$(BIN)/ruff format --check components flows tests bench

fmt: install
	$(BIN)/ruff format components flows tests bench
	$(BIN)/ruff check --fix components flows tests bench

clean:
	rm -rf $(VENV)
