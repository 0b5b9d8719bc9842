# vicifast-agent developer entry points. Every target installs what it needs on a fresh
# Debian 12 or 13 machine (as root) and is quick when already set up.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
PY        := $(VENV)/bin/python
APT_PKGS  := nftables python3-nftables python3-systemd python3-venv python3-dev conntrack iproute2 sqlite3 gcc prometheus
PROTO     := proto/vicifast/agent/v1/agent.proto
PB_DIR    := agent/rpc/pb
PYTEST_ARGS ?=

.PHONY: help setup lint test unit kernel e2e bench soak demo gen clean

help:
	@echo "make test   - set up (apt, venv, generated code), lint, run every test"
	@echo "make demo   - the daemon in a network namespace, driven by the control-plane client"
	@echo "make bench  - performance figures -> bench/results.json"
	@echo "make soak   - long runs (idle-connection flood, 300 watchers, a watcher that never reads)"
	@echo "make lint   - ruff + mypy --strict on agent/"
	@echo "make deb    - dist/vicifast-agent_<version>~deb12u1_amd64.deb (RELEASE=trixie: ~deb13u1)"
	@echo "make test-package - build, lint, install/upgrade/purge each release's .deb in a booted one"
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

# Endurance runs against real daemons in scratch namespaces (minutes): a table on stdout.
# SOAK_ARGS=watchers runs only the named scenarios.
soak: setup
	$(PY) -m bench.soak $(SOAK_ARGS)

# Throwaway namespaces, dev PKI and daemon; everything is removed again, also on Ctrl-C.
demo: setup
	$(PY) -m agent.demo

clean:
	rm -rf $(VENV) $(PB_DIR) .stamp-* .mypy_cache .ruff_cache .pytest_cache

# --- packaging (issue 6, 20): one .deb per Debian release, its install test in a booted system ---
# Version: agent/__init__.py's __version__; `make deb VERSION=0.1.0+1` builds another (newer) one.
# RELEASE: the Debian release the package is for (packaging/releases; default: this machine's).
# The package's version is VERSION plus that release's suffix: 0.1.0~deb12u1, 0.1.0~deb13u1.
# Another release than this machine's is built inside a debootstrapped root of it.
VERSION      := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' agent/__init__.py)
DEB_ARCH     := $(shell dpkg --print-architecture)
HOST_RELEASE := $(shell . /etc/os-release && echo $$VERSION_CODENAME)
RELEASES     := $(shell awk '!/^\#/ && NF { print $$1 }' packaging/releases)
RELEASE      ?= $(HOST_RELEASE)
deb_suffix    = $(shell awk -v r='$(1)' '$$1 == r { print $$3 }' packaging/releases)
# $(call deb_file,VERSION,RELEASE) and $(call build_deb,VERSION,RELEASE)
deb_file      = dist/vicifast-agent_$(1)$(call deb_suffix,$(2))_$(DEB_ARCH).deb
build_deb     = $(if $(filter $(2),$(HOST_RELEASE)),bash packaging/build-deb.sh $(PY) $(1) $(WHEEL_CACHE) $(2),bash packaging/build-in-root.sh $(2) $(1) $(WHEEL_CACHE))
DEB          := $(call deb_file,$(VERSION),$(RELEASE))
# Wheels downloaded once and reused by every build (the package build itself is offline).
WHEEL_CACHE ?= /var/cache/vicifast-agent-build/wheels
# Tools only the packaging targets need; `make test` does not install them. build-essential:
# dpkg-buildpackage checks it (build-essential:native) before any Build-Depends.
PACKAGE_APT_PKGS := build-essential debhelper dpkg-dev lintian python3-venv debootstrap systemd-container
# The releases `make test-package` builds and tests (CI runs one at a time, to time each).
TEST_RELEASES ?= $(RELEASES)

.PHONY: deb lint-package test-package check-release

.stamp-apt-package: Makefile
	@missing=$$(for p in $(PACKAGE_APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

check-release:
	@for r in $(RELEASE) $(TEST_RELEASES); do \
	  case " $(RELEASES) " in *" $$r "*) ;; \
	  *) echo "RELEASE '$$r' is not one of: $(RELEASES) (packaging/releases)" >&2; exit 2 ;; esac; \
	done

# The build on this machine's release uses the dev venv's pip for the wheel cache.
deb: check-release .stamp-apt-package $(if $(filter $(RELEASE),$(HOST_RELEASE)),setup)
	$(call build_deb,$(VERSION),$(RELEASE))

# lintian: no error and no warning (overrides, each with its reason: debian/*.lintian-overrides);
# the unit's sandbox exposure must stay <= 1.5 (--threshold counts tenths).
lint-package: check-release .stamp-apt-package
	@test -f $(DEB) || { echo "no $(DEB): run make deb RELEASE=$(RELEASE) first" >&2; exit 1; }
	lintian --fail-on error,warning --display-info $(DEB)
	set -o pipefail; systemd-analyze security --offline=yes --threshold=15 systemd/vicifast-agent.service | tail -1

# For each of TEST_RELEASES: builds this version and a newer one, lints them, then installs,
# upgrades, removes and purges them in a booted container of that release (systemd-nspawn) on
# a private network: see tests/package/.
test-package: check-release setup .stamp-apt-package
	@set -e; for r in $(TEST_RELEASES); do \
	  if [ "$$r" = "$(HOST_RELEASE)" ]; then \
	    bash packaging/build-deb.sh $(PY) $(VERSION) $(WHEEL_CACHE) $$r; \
	    bash packaging/build-deb.sh $(PY) $(VERSION)+pkgtest1 $(WHEEL_CACHE) $$r; \
	  else \
	    bash packaging/build-in-root.sh $$r $(VERSION) $(WHEEL_CACHE); \
	    bash packaging/build-in-root.sh $$r $(VERSION)+pkgtest1 $(WHEEL_CACHE); \
	  fi; \
	  $(MAKE) --no-print-directory lint-package RELEASE=$$r; \
	done
	VICIFAST_DEB="$(foreach r,$(TEST_RELEASES),$(call deb_file,$(VERSION),$(r)))" \
	VICIFAST_DEB_NEWER="$(foreach r,$(TEST_RELEASES),$(call deb_file,$(VERSION)+pkgtest1,$(r)))" \
	  $(PY) -m pytest -x -q -ra -p no:cacheprovider tests/package $(PYTEST_ARGS)

# --- the releases' own kernels (issue 20): qemu VMs built from the Debian archive ---------------
# Each release's base image (debootstrap + linux-image-amd64) is cached under
# /var/cache/vicifast-agent-test/vm-*; one boot per release runs tests/vm/guest.py with its .deb.
VM_APT_PKGS := qemu-system-x86 qemu-utils debootstrap e2fsprogs
# The releases whose own kernel boots; each with its own package (built when missing: CI's
# package step has built them already).
VM_RELEASES ?= $(RELEASES)

.PHONY: test-vm

.stamp-apt-vm: Makefile
	@missing=$$(for p in $(VM_APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

test-vm: setup .stamp-apt-package .stamp-apt-vm
	@set -e; $(foreach r,$(VM_RELEASES),test -f $(call deb_file,$(VERSION),$(r)) || $(call build_deb,$(VERSION),$(r));)
	VICIFAST_VM_DEBS="$(foreach r,$(VM_RELEASES),$(r)=$(call deb_file,$(VERSION),$(r)))" \
	  $(PY) -m pytest -q -ra -p no:cacheprovider tests/vm $(PYTEST_ARGS)
