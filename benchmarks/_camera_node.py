"""What the camera benchmarks share (``big_image_bench``, ``camera_rss_bench``): the real
omni_flow_node and a camera process (``test/ros/peers/camera_peer.py``) publishing rgb8 frames,
both with the shipped Fast DDS profile (``config/fastdds_camera.xml``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "omni_ros" / "test" / "ros")]

from flow_harness import NodeProcess, running  # noqa: E402

PEER = ROOT / "omni_ros" / "test" / "ros" / "peers" / "camera_peer.py"
PROFILE = ROOT / "omni_ros" / "config" / "fastdds_camera.xml"
#: The shipped Fast DDS profile, for the node and the camera alike.
FASTDDS_ENV = {
    "FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILE),
    "FASTRTPS_DEFAULT_PROFILES_FILE": str(PROFILE),
}


@contextmanager
def camera_node(params: dict[str, Any], tmp: Path) -> Iterator[tuple[NodeProcess, Any]]:
    """omni_flow_node (with the test backend doubles available) and a probe on its domain."""
    proc = NodeProcess.with_doubles(params, tmp / "node.log", env=FASTDDS_ENV)
    with running(proc) as probe:
        yield proc, probe


def start_camera(
    proc: NodeProcess, width: int, height: int, fps: int, count: int
) -> subprocess.Popen[str]:
    """The camera process: ``count`` rgb8 frames at ``fps`` on the node's camera/image_raw."""
    env = {**os.environ, **FASTDDS_ENV, "ROS_DOMAIN_ID": str(proc.domain_id)}
    topic = f"{proc.namespace}/camera/image_raw"
    argv = [sys.executable, str(PEER), "pub", topic, str(width), str(height), str(fps), str(count)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
