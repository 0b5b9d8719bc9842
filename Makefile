# vicifast-agent developer entry points. Every target installs what it needs on a fresh
# Debian 12 machine (as root) and is quick when already set up.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
PY        := $(VENV)/bin/python
APT_PKGS  := nftables python3-nftables python3-systemd python3-venv python3-dev conntrack iproute2 sqlite3 gcc
PROTO     := proto/vicifast/agent/v1/agent.proto
PB_DIR    := agent/rpc/pb
PYTEST_ARGS ?=

.PHONY: help setup lint test unit kernel e2e bench demo gen clean

help:
	@echo "make test   - set up (apt, venv, generated code), lint, run every test"
	@echo "make demo   - the daemon in a network namespace, driven by the control-plane client"
	@echo "make bench  - performance figures -> bench/results.json"
	@echo "make lint   - ruff + mypy --strict on agent/"

# Debian packages: installed only when one is missing, so a set-up machine never calls apt.
.stamp-apt: Makefile
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

# The venv is what the .deb ships: Debian's python3 with the distro bindings for libnftables
# and libsystemd visible (--system-site-packages), everything else pinned wheels.
$(VENV)/.stamp: .stamp-apt requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

# Generated protobuf/gRPC code is never edited by hand; see README "Regenerating code".
$(PB_DIR)/.stamp: $(VENV)/.stamp $(PROTO) tools/gen_proto.sh
	bash tools/gen_proto.sh $(PY) $(PB_DIR)
	@touch $@

gen: $(PB_DIR)/.stamp

setup: $(VENV)/.stamp gen

lint: setup
	$(VENV)/bin/ruff check agent tests bench tools
	$(VENV)/bin/ruff format --check agent tests bench tools
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

kernel: setup
	$(PY) -m pytest -q -ra tests/kernel $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench

# Throwaway namespaces, dev PKI and daemon; everything is removed again, also on Ctrl-C.
demo: setup
	$(PY) -m agent.demo

clean:
	rm -rf $(VENV) $(PB_DIR) .stamp-* .mypy_cache .ruff_cache .pytest_cache
