# adpulse: one entry point. `make help` lists the targets.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv kafka prometheus test test-long unit integration reproductions lint demo bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,train]'
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install adpulse with its dev tools

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/mypy adpulse schemas scoring streams

# The embedded Apache Kafka's jars, once, from Maven Central into ~/.cache/adpulse (or
# $ADPULSE_KAFKA_LIBS): deploy/kafka/pom.xml through `mvn dependency:copy-dependencies`.
# With ADPULSE_EMBEDDED=tansu (no Java or Maven) nothing is fetched.
kafka: $(STAMP) ## fetch Apache Kafka's jars for the embedded broker (Maven; once)
	@if [ "$${ADPULSE_EMBEDDED:-kafka}" = tansu ]; then echo "ADPULSE_EMBEDDED=tansu: no Kafka jars needed"; \
	else $(BIN)/adpulse broker --fetch-only; fi

# Debian's prometheus package gives the Prometheus tests a real server and promtool.
# Installed only as root with apt (CI, containers); anyone else gets those tests skipped.
prometheus: ## install Prometheus + promtool for their tests (root with apt; else a note)
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's prometheus package for the Prometheus tests"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
	  || { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
	  || echo "could not install prometheus: its tests will be skipped"; \
	else echo "prometheus is not installed (needs root with apt): its tests will be skipped"; fi

test: $(STAMP) kafka prometheus ## lint, unit, integration (real embedded Kafka); not the long ones
	$(BIN)/ruff check .
	$(BIN)/mypy adpulse schemas scoring streams
	$(BIN)/python -m pytest -m "not reproduction and not long" $(PYTEST_ARGS)

test-long: $(STAMP) kafka prometheus ## the long end-to-end checks: faults, bench smokes, TLS (CI runs them)
	$(BIN)/python -m pytest -m "long and not reproduction" $(PYTEST_ARGS)

reproductions: $(STAMP) kafka ## the findings' reproductions (bench eos, bench startup smokes; minutes)
	$(BIN)/python -m pytest -m reproduction $(PYTEST_ARGS)

unit: $(STAMP) ## fast tests without a broker
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: $(STAMP) kafka ## tests against the real embedded broker
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

bench: $(STAMP) kafka ## every benchmark at its defaults: prints a table, writes var/bench/all.json
	$(BIN)/adpulse bench all --json var/bench/all.json

demo: $(STAMP) kafka ## run the engine on the real sample data (../shared/data)
	$(BIN)/adpulse demo

clean: ## remove the venv and local state
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
