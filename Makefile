# fedstr-escrow developer commands. Every target does its own set-up.
#   make demo   the main job: local regtest network + relay + the service + a whole market round
#   make run    the service alone against the local network (Ctrl-C stops the service)
#   make test   the whole test suite against a real regtest network (started and stopped by the tests)
#   make lint   ruff check, ruff format --check and mypy (pyproject.toml)
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The service, its tests and linters (dev) and the reference agents the e2e tests and the demo
# run (agents: numpy, scikit-learn; lm: JAX, optax, flax for the DiLoCo task). The stamp names
# the extras: changing them re-installs.
comma := ,
EXTRAS := dev,agents,lm
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install build up down status run demo test lint bench drills openapi clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

build:
	devstack/stack build

up: build
	devstack/stack up

down:
	devstack/stack down

status:
	devstack/stack status

run: install up
	@echo "starting the service; the regtest stack stays up afterwards (make down stops it)"
	eval "$$(devstack/stack env)" && exec $(BIN)/fedstr-escrow serve

demo: install
	$(BIN)/fedstr-escrow demo $(DEMO_ARGS)

test: install build
	devstack/system-deps.sh
	$(BIN)/pytest $(PYTEST_ARGS)

# Each benchmark is a ratio against a baseline measured in the same run; one bench network
# (ports 29900+) is brought up once for all of them and stopped at the end.
bench: install build
	$(BIN)/python -m bench.run

drills: install build
	devstack/system-deps.sh
	FEDSTR_BENCH_PORT_BASE=$${FEDSTR_BENCH_PORT_BASE:-30100} $(BIN)/python -m bench.drills all

# ruff (lint, then formatting) and mypy, configured in pyproject.toml; all three run, any failure fails.
lint: install
	@rc=0; \
	$(BIN)/ruff check . || rc=1; \
	$(BIN)/ruff format --check . || rc=1; \
	$(BIN)/mypy || rc=1; \
	exit $$rc

openapi: install
	$(BIN)/fedstr-escrow openapi

clean: down
	rm -rf .devstack build *.egg-info
