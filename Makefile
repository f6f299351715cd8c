# omni_ros: one command each. See README.md.
#   make test   set up from nothing (Debian packages, venv with ROS 2 wheels), build, lint, test
#   make demo   set up, build, synthesise a bag, replay it through omni_flow_node, summarise
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Every ROS-facing step runs in a shell that sourced the built workspace (it chains the venv).
IN_WS := set -eo pipefail; . install/setup.sh;
PYTEST_ARGS ?=

.PHONY: all setup build lint test test-unit test-ros demo bench clean

all: test

setup:
	@bash scripts/setup_env.sh

build: setup
	@set -eo pipefail; . $(VENV)/local_setup.sh; \
	  colcon build --symlink-install --event-handlers console_cohesion- summary+ \
	    --cmake-args -DBUILD_TESTING=OFF 2>&1 | grep -v '^WARNING: Location' ; \
	  test -f install/setup.sh

lint: setup
	$(VENV)/bin/ruff check omni_ros benchmarks scripts
	$(VENV)/bin/ruff format --check --quiet omni_ros benchmarks scripts
	$(VENV)/bin/mypy omni_ros/omni_ros

test: build lint
	@$(IN_WS) export OMNI_ROS_REQUIRE_ROS=1; rc=0; python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

test-unit: build
	@$(IN_WS) python -m pytest omni_ros/test/unit $(PYTEST_ARGS)

demo: build
	@$(IN_WS) omni-ros demo --out demo_out

bench: build
	@$(IN_WS) for b in benchmarks/*_bench.py; do python "$$b"; done

clean:
	rm -rf build install log demo_out
