"""A 64 MB camera frame is refused from its serialized header, counted and logged (issue 16).

On main the node deserialized every Image into a Python message and copied its pixels again
before the size check (measured: ~300 ms of executor time per 64 MB frame, lifecycle get_state
held meanwhile). Now the camera is subscribed serialized (``raw=True``) and the size read from the
bytes (ros/_camera.py): ``oversize_images`` counts frames refused that way, which only the
serialized path can do. Both processes use the shipped Fast DDS profile, as a camera must.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

from flow_harness import REPO, NodeProcess, diag_values, running, wait_for

pytestmark = [pytest.mark.ros, pytest.mark.timeout(240)]

PEER = Path(__file__).parent / "peers" / "camera_peer.py"
PROFILE = REPO / "omni_ros" / "config" / "fastdds_camera.xml"
PROFILE_ENV = {
    "FASTDDS_DEFAULT_PROFILES_FILE": str(PROFILE),  # Fast DDS 3 (Kilted)
    "FASTRTPS_DEFAULT_PROFILES_FILE": str(PROFILE),  # Fast DDS 2 (Jazzy)
}


def test_a_64_mb_image_is_refused_counted_and_logged_while_get_state_answers(
    tmp_path: Path,
) -> None:
    from lifecycle_msgs.srv import GetState

    control = tmp_path / "control"
    control.mkdir()
    params = {
        "backend": "faulty_double",
        "faulty_double.control_dir": str(control),
        "diagnostics.period_s": 0.2,
    }
    proc = NodeProcess.with_doubles(params, tmp_path / "node.log", env=PROFILE_ENV)
    with running(proc) as probe:
        get_state = probe.node.create_client(GetState, f"{proc.namespace}/omni_flow_node/get_state")
        assert probe.call(
            get_state, GetState.Request(), proc, timeout_s=60, resend_s=2.0
        ).current_state.label
        wait_for(lambda: probe.count("diag") > 0, 60, "diagnostics", proc)

        def oversize() -> int:
            found = [v for v in map(diag_values, probe.snapshot("diag")) if v]
            return int(found[-1].get("oversize_images", "0")) if found else 0

        assert oversize() == 0
        side = 4624  # 4624 x 4624 rgb8 = 64.1 MB, 21 MP > the 3840 x 2160 limit
        env = {**os.environ, **PROFILE_ENV, "ROS_DOMAIN_ID": str(proc.domain_id)}
        sender = subprocess.Popen(
            [sys.executable, str(PEER), "pub", f"{proc.namespace}/camera/image_raw", str(side),
             str(side), "1", "4"],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            # The node keeps answering while the frames arrive, and counts them as refused from
            # the serialized header.
            while sender.poll() is None:
                probe.call(get_state, GetState.Request(), proc, timeout_s=10, resend_s=2.0)
            wait_for(lambda: oversize() >= 1, 30, "a frame counted as oversize", proc)
        finally:
            if sender.poll() is None:
                sender.kill()
            sender.wait()
        probe.call(get_state, GetState.Request(), proc, timeout_s=10, resend_s=2.0)
        log = proc.log()
        assert "refused a frame before deserializing it" in log, log
        assert f"image {side}x{side} exceeds max_pixels" in log, log
        assert proc.interrupt_and_wait() == 0
        assert "Traceback" not in proc.log()
