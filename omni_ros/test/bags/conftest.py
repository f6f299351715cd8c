"""Synthesised input bags shared by the replay tests (built once per session, a few seconds each)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bag_samples import short_config
from omni_ros.tools.synth import write_bag

SCHEDULE_PARAMS = """\
omni_flow_node:
  ros__parameters:
    backend: reference
    reference:
      size: tiny
      seed: 3
      num_threads: 1
      speak_schedule: "LLSELLLL"
    session:
      proactive_silence_units: 2
"""


@pytest.fixture(scope="session")
def clean_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bag(tmp_path_factory.mktemp("bags") / "clean", short_config())


@pytest.fixture(scope="session")
def messy_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bag(tmp_path_factory.mktemp("bags") / "messy", short_config(messy=True))


@pytest.fixture(scope="session")
def sqlite_bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bag(
        tmp_path_factory.mktemp("bags") / "clean_sqlite", short_config(storage="sqlite3")
    )


@pytest.fixture(scope="session")
def schedule_params(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("params") / "schedule.yaml"
    path.write_text(SCHEDULE_PARAMS)
    return path
