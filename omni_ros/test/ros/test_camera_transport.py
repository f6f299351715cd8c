"""Camera-size frames arrive between two processes with the shipped Fast DDS profile.

With Fast DDS's builtin transports a 640x480 rgb8 frame (921,600 B) exceeds the default 512 KB
shared-memory segment and travels as 64 KB UDP fragments; best effort loses the frame with any
fragment (measured here: 6 of 150 at 640x480, 21 of 150 at 1280x720). The shipped profile
(config/fastdds_camera.xml) must deliver them. Both peers are fresh processes: Fast DDS reads
the profile when a process creates its first participant.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

from flow_harness import REPO, fresh_domain_id

pytestmark = [pytest.mark.ros, pytest.mark.timeout(180)]

PEER = Path(__file__).parent / "peers" / "camera_peer.py"
PROFILE = REPO / "omni_ros" / "config" / "fastdds_camera.xml"


def delivered(width: int, height: int, fps: int, count: int, profile: Path | None) -> int:
    env = {**os.environ, "ROS_DOMAIN_ID": str(fresh_domain_id())}
    variables = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")  # FastDDS 3 / 2
    for variable in variables:
        env.pop(variable, None)
        if profile is not None:
            env[variable] = str(profile)
    topic = f"/camera_test_{os.getpid()}/image_raw"
    counter = subprocess.Popen(
        [sys.executable, str(PEER), "count", topic, "3.0"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert counter.stdout is not None
        assert counter.stdout.readline().strip() == "ready"
        sender = subprocess.run(
            [sys.executable, str(PEER), "pub", topic, str(width), str(height), str(fps),
             str(count)],
            capture_output=True, text=True, env=env, timeout=120, check=True,
        )  # fmt: skip
        assert f"sent {count}" in sender.stdout
        out, _ = counter.communicate(timeout=90)
    finally:
        if counter.poll() is None:
            counter.kill()
            counter.wait()
    return int(out.strip().split()[-1])


@pytest.mark.parametrize(("width", "height"), [(640, 480), (1280, 720)])
def test_camera_frames_at_30_fps_arrive_with_the_shipped_profile(width: int, height: int) -> None:
    count = 90
    received = delivered(width, height, 30, count, PROFILE)
    print(f"{width}x{height} rgb8 @ 30 fps: {received} of {count} delivered (shipped profile)")
    assert received >= 0.95 * count


def test_the_profile_is_installed_next_to_the_params_files() -> None:
    from ament_index_python.packages import get_package_share_directory

    installed = Path(get_package_share_directory("omni_ros")) / "config" / PROFILE.name
    assert installed.read_bytes() == PROFILE.read_bytes()
