"""The real omni_flow_node refuses the same parameters with the same message as both replay modes
(one configuration path: ``omni_ros.ros._setup.node_setup``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("rclpy")

from flow_harness import NodeProcess, wait_for
from omni_ros.core.errors import ConfigError
from omni_ros.ros._setup import node_setup

pytestmark = [pytest.mark.ros, pytest.mark.timeout(120)]


@pytest.mark.parametrize(
    "bad",
    [
        {"sesion.output_latency_ms": 80.0},
        {"sytem_prompt": "hello"},
        {"speech.chunk_ms": "hundred"},
        {"speech.encoding": "S24LE"},
    ],
    ids=["namespace-typo", "top-level-typo", "wrong-type", "bad-encoding"],
)
def test_the_node_fails_configure_with_the_replay_modes_message(
    tmp_path: Path, bad: dict[str, Any]
) -> None:
    params = {"backend": "reference", "reference.size": "tiny", **bad}
    with pytest.raises(ConfigError) as expected:
        node_setup(params)
    proc = NodeProcess.installed(params, tmp_path / "node.log")
    try:
        wait_for(
            lambda: "configure failed" in proc.log_path.read_text(errors="replace"),
            60,
            "the configure error",
            proc,
        )
        log = proc.log_path.read_text(errors="replace")
        assert f"configure failed: {expected.value}" in log, log
        assert "Traceback" not in log
        assert proc.poll() is None  # still up, unconfigured
    finally:
        proc.stop()
