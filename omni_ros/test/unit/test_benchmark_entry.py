"""The ROS-free benchmarks start the way docs/BENCHMARKS.md says to run them: ``.venv/bin/python
benchmarks/NAME.py`` from the repository, without ``install/setup.sh`` (each puts the package
source on ``sys.path`` itself, before its first ``omni_ros`` import)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
#: Benchmarks documented as ``.venv/bin/python benchmarks/...`` (the others need a ROS overlay).
ROS_FREE = [
    "aec_bench.py",
    "backend_bench.py",
    "core_bench.py",
    "engines_bench.py",
    "flow_bench.py",
    "vllm_omni_bench.py",
]


def test_every_ros_free_benchmark_is_listed_by_the_docs() -> None:
    docs = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    for name in ROS_FREE:
        assert f"benchmarks/{name}" in docs, name


@pytest.mark.parametrize("name", ROS_FREE)
def test_a_ros_free_benchmark_starts_without_the_overlay(name: str) -> None:
    env = {k: v for k, v in os.environ.items() if k in ("HOME", "PATH", "LANG", "TMPDIR")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
