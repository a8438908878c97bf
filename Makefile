# Every target does the set-up it needs; `make setup` is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ROWS ?= 1000000
OUT ?= out/rehearsal
FAULT ?=
ENGINE ?= logical
MIGRATION ?= migrations/example.yaml
APT_PACKAGES := postgresql postgresql-15-pgaudit pgbouncer pgcopydb openjdk-17-jre-headless
export PYTHONPATH := $(CURDIR)
export JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION := 1

.PHONY: setup system-packages test lint unit integration infrastructure e2e rehearse synth bench bench-copy bench-cutover bench-validate bench-apply clean

setup: system-packages $(VENV)/.installed node_modules/.installed

# Debian packages, only those missing (apt-get needs root; CI and sessions run as root).
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  $$SUDO mkdir -p /usr/share/man/man1; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: requirements.txt requirements-local.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json
	npm install --no-audit --no-fund --silent
	touch $@

lint: setup
	$(VENV)/bin/ruff check lambdas stacks rehearsal bench tests app.py
	$(VENV)/bin/ruff format --check lambdas stacks rehearsal bench tests app.py
	$(VENV)/bin/mypy lambdas stacks rehearsal

# The README's test command: linters, then every test tier. Unit, infrastructure and integration run on two
# workers, a whole test file each (each worker starts its own servers; about 8 minutes instead of 15); the
# rehearsals run one at a time, since each measures lag, pauses and failed writes on a machine it has to itself.
test: lint
	$(PY) -m pytest tests/unit tests/infrastructure tests/integration -q -p no:cacheprovider --timeout 900 \
	  -n 2 --dist loadfile
	$(PY) -m pytest tests/e2e -q -p no:cacheprovider --timeout 900

unit: setup
	$(PY) -m pytest tests/unit -q

integration: setup
	$(PY) -m pytest tests/integration -q

infrastructure: setup
	$(PY) -m pytest tests/infrastructure -q

rehearse: setup
	$(PY) -m rehearsal --rows $(ROWS) --out $(OUT) --engine $(ENGINE) $(if $(FAULT),--fault $(FAULT),)

SYNTH_MIGRATIONS ?= migrations/example.yaml migrations/serverless-proxy.yaml migrations/debezium.yaml

# Synthesizes every file in SYNTH_MIGRATIONS (no AWS credentials needed), then cfn-lint
# (exit 4 = warnings only). cdk-nag runs inside the synth and fails it on any finding.
synth: setup
	@for m in $(SYNTH_MIGRATIONS); do \
	  out=cdk.out/$$(basename $$m .yaml); \
	  npx cdk synth -q -c migration=$$m -o $$out > /dev/null || exit 1; \
	  echo "synthesized $$m -> $$(ls $$out/*.template.json)"; \
	done
	$(VENV)/bin/cfn-lint cdk.out/*/*.template.json || [ $$? -eq 4 ]

# Each prints a table with the ratio against the named external tool (JSON with --json).
bench: bench-copy bench-cutover bench-validate bench-apply

bench-copy: setup
	$(PY) -m bench.copy --rows $(or $(BENCH_ROWS),5000000)

bench-cutover: setup
	$(PY) -m bench.cutover --clients $(or $(CLIENTS),16) --seconds $(or $(BENCH_SECONDS),10)

bench-validate: setup
	$(PY) -m bench.validate --rows $(or $(BENCH_ROWS),10000000)

bench-apply: setup
	$(PY) -m bench.apply --events $(or $(BENCH_EVENTS),100000)

clean:
	rm -rf cdk.out out .pytest_cache .mypy_cache .ruff_cache
