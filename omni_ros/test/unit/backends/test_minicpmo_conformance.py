"""Opt-in: the ``minicpmo`` adapter against the model's own remote code (tiny random weights, CPU).

Runs when ``OMNI_ROS_MINICPMO_CODE`` names a MiniCPM-o 4.5 remote-code folder (a downloaded Hugging
Face snapshot; weights not needed) and the remote code's CPU packages are installed
(``requirements/minicpmo.txt``); skips with the reason otherwise. Setting the variable is the opt-in
to execute that folder's Python code. ``OMNI_ROS_MINICPMO_REVISION`` records the commit you reviewed
(default: the folder's name, which is the commit for a Hugging Face cache snapshot).

It builds the model as ``omni-ros check-model`` does (``omni_ros.tools.check_model``: 2-layer LLM,
tiny encoders and TTS, the folder's tokenizer, the vocoder a named double), runs the shared backend
contract against it and every check-model scenario::

    OMNI_ROS_MINICPMO_CODE=/models/MiniCPM-o-4_5 pytest omni_ros/test/unit/backends/test_minicpmo_conformance.py
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from unit.backends.contract import BackendContract

_CODE = os.environ.get("OMNI_ROS_MINICPMO_CODE", "")


def _skip_reason() -> str | None:
    if not _CODE:
        return (
            "set OMNI_ROS_MINICPMO_CODE to a MiniCPM-o 4.5 remote-code folder to run the adapter "
            "against the model's own code (tiny random weights, CPU)"
        )
    if not os.path.isdir(os.path.expanduser(_CODE)):
        return f"OMNI_ROS_MINICPMO_CODE={_CODE!r} is not a folder"
    from omni_ros.backends.minicpmo import missing_runtime_packages
    from omni_ros.tools.check_model import CHECK_PACKAGES

    missing = missing_runtime_packages(CHECK_PACKAGES)
    if missing:
        return "missing (pip install -r requirements/minicpmo.txt): " + "; ".join(missing)
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

_DIR = Path(os.path.expanduser(_CODE)) if _CODE else Path()
_REVISION = os.environ.get("OMNI_ROS_MINICPMO_REVISION") or _DIR.name or "local"


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    from omni_ros.tools.check_model import build_tiny_model

    return build_tiny_model(_DIR)


def _backend(model: Any) -> Any:
    from omni_ros.backends.minicpmo import MiniCPMOBackend, MiniCPMOConfig

    config = MiniCPMOConfig.from_mapping(
        {
            "model": str(_DIR),
            "revision": _REVISION,
            "trust_remote_code": True,
            "device": "cpu",
            "force_listen_count": 0,
            "decode_mode": "greedy",
            "prefill_timeout_s": 120.0,
            "generate_timeout_s": 120.0,
            "prepare_timeout_s": 120.0,
        }
    )
    return MiniCPMOBackend(config, model=model)


class TestRemoteCodeContract(BackendContract):
    """The shared backend contract, the adapter on the model's own code."""

    @pytest.fixture
    def backend(self, tiny_model: Any) -> Iterator[Any]:
        backend = _backend(tiny_model)
        yield backend
        backend.close()


@pytest.fixture(scope="module")
def report() -> Any:
    from omni_ros.tools.check_model import run_checks

    return run_checks(_DIR, revision=_REVISION, units=10)


def test_every_check_model_scenario_passes(report: Any) -> None:
    from omni_ros.tools.check_model import format_report

    failed = [check for check in report.checks if not check.passed]
    assert report.checks, "check-model ran no checks"
    assert not failed, format_report(report)
