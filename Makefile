# Two entry points for a fresh Debian 12 machine (run as root):
#   make demo   install everything, then run the demo
#   make test   install everything, then run the test suite
# Both are idempotent: a second run installs nothing.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
APT_PACKAGES := qemu-system-x86 qemu-utils fuse3 libfuse3-dev pkg-config busybox-static linux-image-amd64 gcc libc6-dev cpio iproute2 debootstrap e2fsprogs haproxy
# what only the tests drive: a real Prometheus, and Debian's headless Chromium with its driver (the dashboard)
TEST_APT_PACKAGES := prometheus chromium chromium-driver
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install apt lint clean

demo: install
	$(VENV)/bin/vmstream demo --clones 10

test: install
	@$(MAKE) --no-print-directory apt APT_PACKAGES="$(TEST_APT_PACKAGES)"
	$(VENV)/bin/pytest

install: apt $(VENV)/.installed

# Installs only what is missing, so it costs a dpkg query when all is there. Packages that
# ship a service (haproxy, prometheus) must not start it: vmstream runs its own instances on
# loopback, so a policy-rc.d forbids starts during the install (one already there is kept).
apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  policy=/usr/sbin/policy-rc.d; ours=; \
	  if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy && chmod 755 $$policy && ours=1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; rc=$$?; \
	  if [ -n "$$ours" ]; then rm -f $$policy; fi; \
	  exit $$rc; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# ruff, mypy, and import-linter's layering contracts (pyproject.toml [tool.importlinter])
lint: install
	$(VENV)/bin/ruff check vmstream tests
	$(VENV)/bin/mypy vmstream tests/host
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) *.egg-info
