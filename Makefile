# vicifast-agent developer entry points. Every target installs what it needs on a fresh
# Debian 12 machine (as root) and is quick when already set up.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
PY        := $(VENV)/bin/python
APT_PKGS  := nftables python3-nftables python3-systemd python3-venv python3-dev conntrack iproute2 sqlite3 gcc prometheus
PROTO     := proto/vicifast/agent/v1/agent.proto
PB_DIR    := agent/rpc/pb
PYTEST_ARGS ?=

.PHONY: help setup lint test unit kernel e2e bench demo gen clean

help:
	@echo "make test   - set up (apt, venv, generated code), lint, run every test"
	@echo "make demo   - the daemon in a network namespace, driven by the control-plane client"
	@echo "make bench  - performance figures -> bench/results.json"
	@echo "make lint   - ruff + mypy --strict on agent/"
	@echo "make deb    - dist/vicifast-agent_<version>_amd64.deb (VERSION=... for another version)"
	@echo "make test-package - build, lint and install/upgrade/purge the .deb in a booted Debian 12"
	@echo "make test-vm - the kernel-facing checks in qemu VMs on Debian 12's and 13's own kernels"

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

# --- packaging (issue 6): the .deb, its install test in a booted Debian 12, lint ------------------
# Version: agent/__init__.py's __version__; `make deb VERSION=0.1.0+1` builds another (newer) one.
VERSION     := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' agent/__init__.py)
DEB_ARCH    := $(shell dpkg --print-architecture)
DEB         := dist/vicifast-agent_$(VERSION)_$(DEB_ARCH).deb
# Wheels downloaded once and reused by every build (the package build itself is offline).
WHEEL_CACHE ?= /var/cache/vicifast-agent-build/wheels
# Tools only the packaging targets need; `make test` does not install them.
PACKAGE_APT_PKGS := debhelper dpkg-dev lintian python3-venv debootstrap systemd-container

.PHONY: deb lint-package test-package

.stamp-apt-package: Makefile
	@missing=$$(for p in $(PACKAGE_APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

deb: setup .stamp-apt-package
	bash packaging/build-deb.sh $(PY) $(VERSION) $(WHEEL_CACHE)

# lintian: no error and no warning (overrides, each with its reason: debian/*.lintian-overrides);
# the unit's sandbox exposure must stay <= 1.5 (--threshold counts tenths).
lint-package: .stamp-apt-package
	@test -f $(DEB) || { echo "no $(DEB): run make deb first" >&2; exit 1; }
	lintian --fail-on error,warning --display-info $(DEB)
	set -o pipefail; systemd-analyze security --offline=yes --threshold=15 systemd/vicifast-agent.service | tail -1

# Builds this version and a newer one, then installs, upgrades, removes and purges them in a
# booted Debian 12 container (systemd-nspawn) on a private network: see tests/package/.
test-package: deb
	bash packaging/build-deb.sh $(PY) $(VERSION)+pkgtest1 $(WHEEL_CACHE)
	$(MAKE) --no-print-directory lint-package
	VICIFAST_DEB=$(DEB) VICIFAST_DEB_NEWER=dist/vicifast-agent_$(VERSION)+pkgtest1_$(DEB_ARCH).deb \
	  $(PY) -m pytest -x -q -ra -p no:cacheprovider tests/package $(PYTEST_ARGS)

# --- the releases' own kernels (issue 20): qemu VMs built from the Debian archive ---------------
# Each release's base image (debootstrap + linux-image-amd64) is cached under
# /var/cache/vicifast-agent-test/vm-*; one boot per release runs tests/vm/guest.py with its .deb.
VM_APT_PKGS := qemu-system-x86 qemu-utils debootstrap e2fsprogs
VM_DEBS     ?= bookworm=$(DEB)

.PHONY: test-vm

.stamp-apt-vm: Makefile
	@missing=$$(for p in $(VM_APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

test-vm: deb .stamp-apt-vm
	VICIFAST_VM_DEBS="$(VM_DEBS)" $(PY) -m pytest -q -ra -p no:cacheprovider tests/vm $(PYTEST_ARGS)
