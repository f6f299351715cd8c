# omni_ros: one command each. See README.md.
#   make test   set up from nothing (Debian packages, venv with ROS 2 wheels), build, lint, test
#   make demo   set up, build, synthesise a bag, replay it through omni_flow_node, summarise
# DISTRO=kilted (default: Python 3.11, .venv, build/, install/) or DISTRO=jazzy (Python 3.12,
# .venv-jazzy, build-jazzy/, install-jazzy/): one venv, build and install tree per ROS distro, so
# `make test DISTRO=jazzy` never touches the Kilted workspace (see README "ROS 2 distributions").
SHELL := /bin/bash
DISTRO ?= kilted
ifeq ($(DISTRO),kilted)
TREE_SUFFIX :=
else ifeq ($(DISTRO),jazzy)
TREE_SUFFIX := -jazzy
else
$(error DISTRO=$(DISTRO) unknown: use DISTRO=kilted (default) or DISTRO=jazzy)
endif
VENV ?= .venv$(TREE_SUFFIX)
BUILD_BASE := build$(TREE_SUFFIX)
INSTALL_BASE := install$(TREE_SUFFIX)
LOG_BASE := log$(TREE_SUFFIX)
PY := $(VENV)/bin/python
export DISTRO VENV
# Every ROS-facing step runs in a shell that sourced the built workspace (it chains the venv).
IN_WS := set -eo pipefail; . $(INSTALL_BASE)/setup.sh;
PYTEST_ARGS ?=

.PHONY: all setup build lint test test-unit test-transformers-range test-py310 demo bench clean node-deps soak faults

all: test

setup:
	@bash scripts/setup_env.sh

# Foxglove's own WebSocket client + ROS 2 CDR decoder (npm, pinned by package-lock.json) for the
# live-view test; without node the test skips and says so.
FOXGLOVE_CLIENT := omni_ros/test/foxglove
node-deps:
	@if ! command -v npm >/dev/null; then \
	  echo "[setup] npm not found: the Foxglove live-view test will skip (apt-get install nodejs npm)"; \
	elif [ ! -f $(FOXGLOVE_CLIENT)/node_modules/.package-lock.json ] || \
	     [ $(FOXGLOVE_CLIENT)/package-lock.json -nt $(FOXGLOVE_CLIENT)/node_modules/.package-lock.json ]; then \
	  echo "[setup] npm ci in $(FOXGLOVE_CLIENT): @foxglove/ws-protocol, @foxglove/rosmsg, @foxglove/rosmsg2-serialization, ws"; \
	  npm ci --no-audit --no-fund --prefix $(FOXGLOVE_CLIENT); \
	fi

build: setup node-deps
	@set -eo pipefail; . $(VENV)/local_setup.sh; \
	  colcon --log-base $(LOG_BASE) build --symlink-install \
	    --build-base $(BUILD_BASE) --install-base $(INSTALL_BASE) \
	    --event-handlers console_cohesion- summary+ \
	    --cmake-args -DBUILD_TESTING=OFF 2>&1 | grep -v '^WARNING: Location' ; \
	  test -f $(INSTALL_BASE)/setup.sh

lint: setup
	$(VENV)/bin/ruff check omni_ros benchmarks scripts
	$(VENV)/bin/ruff format --check --quiet omni_ros benchmarks scripts
	$(VENV)/bin/mypy omni_ros/omni_ros

test: build lint
	@$(IN_WS) export OMNI_ROS_REQUIRE_ROS=1; rc=0; python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# MiniCPM-o 4.5 pins transformers 4.51.0 (the default environment tests exactly that); setup.py
# promises <6, so the transformers-facing tests also run against the newest release we allow.
TRANSFORMERS_NEWEST ?= 5.23.0
test-transformers-range: build
	@$(IN_WS) dir=.cache/transformers-$(TRANSFORMERS_NEWEST)$(TREE_SUFFIX); \
	  if [ ! -d $$dir/transformers ]; then \
	    python -m pip install -q --disable-pip-version-check --target $$dir \
	      "transformers==$(TRANSFORMERS_NEWEST)" 2>&1 | grep -v '^WARNING: Location' || true; fi; \
	  PYTHONPATH=$$PWD/$$dir:$$PYTHONPATH python -c "import transformers as t; print('transformers', t.__version__)"; \
	  PYTHONPATH=$$PWD/$$dir:$$PYTHONPATH python -m pytest -q -p no:cacheprovider \
	    omni_ros/test/unit/backends/test_reference.py omni_ros/test/unit/trt

# Python 3.10 (Humble's): no ROS wheels, no torch; the pins of requirements/py310.txt. Every module
# must import (or need only ROS / torch / TensorRT), the ROS-free tests pass, ruff targets py310.
PY310_TESTS := omni_ros/test/unit/test_imports.py omni_ros/test/unit/core \
  omni_ros/test/unit/test_audio_io.py omni_ros/test/unit/ros/test_audio_common.py \
  omni_ros/test/unit/test_core_is_ros_free.py \
  omni_ros/test/unit/test_launch_files.py omni_ros/test/unit/test_python_versions.py
test-py310:
	@DISTRO=py310 VENV=.venv-py310 bash scripts/setup_env.sh
	@set -eo pipefail; .venv-py310/bin/python --version; \
	  .venv-py310/bin/python -m compileall -q omni_ros/omni_ros omni_ros/launch benchmarks scripts; \
	  .venv-py310/bin/ruff check --target-version py310 omni_ros benchmarks scripts; \
	  .venv-py310/bin/python -m pytest -q -p no:cacheprovider $(PY310_TESTS) $(PYTEST_ARGS)

test-unit: build
	@$(IN_WS) python -m pytest omni_ros/test/unit $(PYTEST_ARGS)

demo: build
	@$(IN_WS) omni-ros demo --out demo_out

# Reliability suites (docs/RELIABILITY.md), kept out of `make test`: `make soak` runs one hour of
# robot time in direct mode (accelerated clock) + 10 minutes of graph replay and writes
# soak_out/soak.json; `make faults` runs every fault scenario OMNI_ROS_FAULT_SCALE (10) times longer
# than `make test` does, localhost only.
SOAK_ARGS ?= --robot-hours 1 --graph-min 10
soak: build
	@$(IN_WS) nice -n 10 python -m omni_ros.tools.soak --out soak_out $(SOAK_ARGS)

OMNI_ROS_FAULT_SCALE ?= 10
faults: build
	@$(IN_WS) export OMNI_ROS_FAULT_SCALE=$(OMNI_ROS_FAULT_SCALE); \
	  python -m pytest -q -s -p no:cacheprovider omni_ros/test/ros/test_faults.py \
	    omni_ros/test/ros/test_reliability.py 2>&1 | grep -E '^FAULT|passed|failed|Error'

bench: build
	@$(IN_WS) for b in benchmarks/*_bench.py; do python "$$b"; done

clean:
	rm -rf $(BUILD_BASE) $(INSTALL_BASE) $(LOG_BASE) demo_out
