# The two commands: `make demo` (run the embedded default end to end) and `make test`.
# Both create or refresh the virtual environment first; nothing is installed by hand.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# The stamp is keyed on the dependency pins: an unchanged pyproject.toml installs nothing.
STAMP := $(VENV)/.stamp-$(shell sha256sum pyproject.toml | cut -c1-16)

export MGD3_HOME ?= $(CURDIR)/mgd3_home
export DAGSTER_HOME ?= $(CURDIR)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONUNBUFFERED := 1

.PHONY: help env test test-portability demo cluster-demo ui bench rehearsal browser-deps clean-home

help:
	@echo "make demo   - run the whole asset graph on configs/embedded.yaml (MGD3_CONFIG=... for another)"
	@echo "make cluster-demo - the same graph on a local PostgreSQL + Dask cluster + Dagster daemon"
	@echo "make test   - run the test suite"
	@echo "make test-portability - the suite at 1 and 2 threads, native and default (no AVX) CPU kernels"
	@echo "make ui     - start the Dagster UI on http://127.0.0.1:3000"
	@echo "make bench  - run the CPU benchmarks in bench/"
	@echo "make rehearsal - the paper-scale path (DiT-XL/2 + SD VAE shapes, 256 px) end to end, with peak memory"

env: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (first time: a few minutes)"
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
	@rm -f $(VENV)/.stamp-* && touch $@

# Headless Chromium for the browser test of the UI (tests/test_ui_browser.py): $(CHROMIUM) if set,
# else `chromium` on PATH. As root, Debian's package is installed when missing; without root this
# says how to get one, and the suite runs on: the browser test fails (never skips) until there is one.
# Nothing else in `make test` needs root or a system package (PostgreSQL comes from a pip wheel).
define NO_CHROMIUM
The UI test (tests/test_ui_browser.py) needs headless Chromium: a `chromium` on PATH, or
CHROMIUM=/path/to/chromium-or-chrome. None was found, and only root can install Debian's package.
Without root:
  - a system one: ask for Debian/Ubuntu's `chromium` package, or put an installed Chromium/Chrome
    on PATH as `chromium` (a symlink in ~/.local/bin, say) or name it in CHROMIUM;
  - Playwright's build, into your home (needs Chromium's shared libraries on the system):
      $(VENV)/bin/pip install playwright && $(VENV)/bin/python -m playwright install chromium
      export CHROMIUM=$$(find ~/.cache/ms-playwright -type f -name chrome | head -1)
The suite runs on; the browser test fails until Chromium is there.
endef
export NO_CHROMIUM

browser-deps:
	@if [ -n "$$CHROMIUM" ]; then \
		[ -f "$$CHROMIUM" ] && [ -x "$$CHROMIUM" ] || { echo "CHROMIUM=$$CHROMIUM is not an executable file" >&2; exit 1; }; \
	elif command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "$$NO_CHROMIUM" >&2; fi

test: env browser-deps
	$(PY) -m pytest -q

# The suite as another machine would run it: 1 and 2 torch threads (MGD3_TEST_THREADS,
# tests/conftest.py), each with ATen's native CPU kernels and with ATEN_CPU_CAPABILITY=default
# (no AVX). A test comparing different model instances, kernels, thread counts or batch
# compositions bit for bit fails here. Four runs of ~2-4 min each, so not part of `make test`
# (10-minute budget); .ci/run runs both. The browser test does not depend on the CPU kernels.
PORTABILITY_RUNS := 1:native 2:native 1:default 2:default
test-portability: env
	@for run in $(PORTABILITY_RUNS); do \
		threads=$${run%%:*}; kernels=$${run##*:}; \
		if [ "$$kernels" = default ]; then export ATEN_CPU_CAPABILITY=default; else unset ATEN_CPU_CAPABILITY; fi; \
		echo "== portability: $$threads torch thread(s), $$kernels CPU kernels" \
			"($$($(PY) -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'))"; \
		MGD3_TEST_THREADS=$$threads OMP_NUM_THREADS=$$threads $(PY) -m pytest -q -p no:cacheprovider -m "not browser" \
			|| { echo "portability run failed: $$threads thread(s), $$kernels CPU kernels"; exit 1; }; \
	done

demo: env
	$(PY) -m mgd3_assets.demo

ui: env
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: env
	@for s in bench/encode.py bench/sampling.py bench/modes.py bench/incremental.py bench/gpu_dit.py; do \
		echo "== $$s"; $(PY) $$s; done

# DiT-XL/2 (random weights, --depth 1 on CPU) + SD VAE on a generated 256 px ImageNet-style tree,
# through `python -m mgd3_assets.demo`, at N and 4N images per class (~10 min on 2 CPU cores).
rehearsal: env
	$(PY) bench/rehearsal.py $(REHEARSAL_ARGS)

clean-home:
	rm -rf "$(MGD3_HOME)"

# The graph on a local cluster: PostgreSQL, a Dask scheduler + 2 single-thread workers and the
# Dagster daemon on 127.0.0.1, all stopped at the end (mgd3_assets/cluster_demo.py).
# Its storage root is CLUSTER_HOME, beside make demo's, so the two can be compared (--compare).
CLUSTER_HOME ?= $(CURDIR)/mgd3_home_cluster
cluster-demo: env
	MGD3_HOME="$(CLUSTER_HOME)" $(PY) -m mgd3_assets.cluster_demo $(CLUSTER_DEMO_ARGS)
