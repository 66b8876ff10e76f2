# make demo / make test: each installs what is missing (apt packages, .venv, the
# native build) and is quick the second time. See README.md.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Everything the code, the tests and the benchmarks need from Debian 12.
APT_PACKAGES := gcc make pkg-config libxxhash-dev xxhash python3-dev python3-venv \
	python3-guestfs libguestfs-tools python3-libnbd linux-image-amd64 qemu-system-x86 qemu-utils \
	debootstrap openssh-server openssh-client rsync initramfs-tools-core zstd kmod util-linux \
	e2fsprogs fuse3 time ovmf libvirt-daemon-system libvirt-clients python3-libvirt
# Nested KVM hangs on our build machines: tests use TCG (users' hosts get KVM).
TEST_ENV := LIBGUESTFS_BACKEND_SETTINGS=$${LIBGUESTFS_BACKEND_SETTINGS:-force_tcg}
PYTEST_ARGS ?=
# Every core (make test TEST_WORKERS=0 runs in one process); groups: tests/conftest.py.
TEST_WORKERS ?= auto

.PHONY: help deps apt pyc venv demo test test-fast lint bench bench-sync bench-remote bench-formats bench-replicate bench-blocksync bench-rekernel clean

help:
	@echo "make demo       set up, then sync a built-in sample image and show what changed"
	@echo "make test       set up, then run lint, type checks and the whole test suite"
	@echo "make test-fast  the suite without the slow, guestfs and boot tests"
	@echo "make bench      the engine benchmarks (docs/native.md)"
	@echo "make bench-sync / bench-remote / bench-formats / bench-replicate / bench-rekernel   beside the peers (docs/sync.md, remote.md, formats.md, replicate.md, rekernel.md)"
	@echo "make bench-blocksync [BLOCKSYNC_SRC=DIR|URL]   warm and cold, beside blocksync-fast built from its source (docs/sync.md)"

deps: apt $(VENV)/.installed pyc

# The package's bytecode, up to date. Where PYTHONDONTWRITEBYTECODE is set (this machine kind)
# Python never writes it, and every `python -m vimgtools.…` a test or the demo starts compiles ~40
# modules first (~70 ms each time; three CLI-heavy sync test files took 38 s instead of 28-32).
pyc: $(VENV)/.installed
	@env -u PYTHONDONTWRITEBYTECODE $(PY) -m compileall -q src

apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "make: these Debian packages are missing and installing them needs root:" $$missing; exit 1; fi; \
		echo "make: installing" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml setup.py src/vimgtools/_blockdiff.pyx src/vimgtools/_linux.pyx
	$(PY) -m pip install -q --upgrade pip 'setuptools>=77' wheel 'Cython>=3.0' numpy pkgconfig
	$(PY) -m pip install -q --no-build-isolation -e '.[test]'
	$(PY) -c 'import vimgtools, vimgtools.guest.bindings as b, vimgtools.bindings as s; b.load_guestfs(); s.load_nbd(); print("vimgtools", vimgtools.__version__, "built; guestfs and libnbd bindings found")'
	touch $@

venv: $(VENV)/.installed

demo: deps
	$(TEST_ENV) $(PY) scripts/demo.py

lint: deps
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy

# pytest exits 5 when it collected no test: that is a failure here.
test: deps lint
	$(TEST_ENV) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=25 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc = 5 ]; then echo "make test: no tests were collected"; exit 1; fi; exit $$rc

test-fast: deps
	$(PY) -m pytest -m 'not slow and not guestfs and not boot' $(PYTEST_ARGS)

bench: deps
	$(PY) -m pytest benchmarks --benchmark-enable --benchmark-only -p no:randomly
	$(PY) benchmarks/engine_vs_c.py

bench-sync: deps
	$(PY) benchmarks/sync_vs_peers.py --repeat 3

bench-remote: deps
	$(PY) benchmarks/remote_vs_peers.py --repeat 3

bench-replicate: deps
	$(PY) benchmarks/replicate_vs_peers.py --repeat 3

bench-formats: deps
	$(PY) benchmarks/formats_vs_peers.py --repeat 3

# blocksync-fast is built from BLOCKSYNC_SRC (a source tree, git directory or URL) in a temporary directory.
BLOCKSYNC_SRC ?= https://github.com/nethappen/blocksync-fast
bench-blocksync: deps
	$(PY) benchmarks/vs_blocksync.py --blocksync-src $(BLOCKSYNC_SRC) --repeat 3

bench-rekernel: deps
	$(TEST_ENV) $(PY) benchmarks/bench_rekernel.py --boot

clean:
	rm -rf $(VENV) build src/vimgtools/*.so src/vimgtools/_blockdiff.c src/vimgtools/_linux.c .pytest_cache .mypy_cache
