"""omni_flow_node listens to a live audio_common microphone of either fork (``mic.type``).

The two ``audio_common_msgs`` layouts are built from ``test/interfaces`` into separate prefixes
(fixture ``audio_common_prefix``): the node and a publisher peer run with that prefix sourced,
exactly as on a robot where the fork's package is installed. The node's ``OmniFlow.push_audio`` is
spied on (``peers/flow_node_runner.py``): each chunk it was handed leaves a file with its stamp,
rate, channels, encoding and size.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from flow_harness import NodeProcess, stop_process, wait_for

pytest.importorskip("rclpy")

PEER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from std_msgs.msg import Header
    from sensor_msgs.msg import Image
    from audio_common_msgs import msg as ac

    fork, namespace = sys.argv[1], sys.argv[2]
    rclpy.init()
    node = rclpy.create_node("audio_common_peer", namespace=namespace)
    camera = node.create_publisher(Image, "camera/camera/color/image_raw", qos_profile_sensor_data)
    rate, chunk = 16000, 800
    t = np.arange(chunk) / rate
    pcm = (0.01 * np.sin(2 * np.pi * 200 * t) * 32767).astype(np.int16)
    if fork == "mgonzs13":
        pub = node.create_publisher(ac.AudioStamped, "audio", qos_profile_sensor_data)
    else:
        pub = node.create_publisher(ac.AudioDataStamped, "audio_stamped", qos_profile_sensor_data)
        info_pub = node.create_publisher(ac.AudioInfo, "audio_info", 1)
    end = time.monotonic() + 90
    last_info = 0.0
    while time.monotonic() < end:
        header = Header(stamp=node.get_clock().now().to_msg(), frame_id="robot_mic")
        if fork == "mgonzs13":
            msg = ac.AudioStamped(header=header)
            msg.audio.info = ac.AudioInfo(format=8, channels=1, rate=rate, chunk=chunk)
            msg.audio.audio_data.int16_data = pcm.tolist()
        else:
            if time.monotonic() - last_info > 2.0:  # audio_capture: every 5 s
                info_pub.publish(ac.AudioInfo(channels=1, sample_rate=rate, sample_format="S16LE",
                                              bitrate=0, coding_format="wave"))
                last_info = time.monotonic()
            msg = ac.AudioDataStamped(header=header)
            msg.audio.data = pcm.tobytes()
        pub.publish(msg)
        camera.publish(Image(header=header, height=2, width=2, encoding="rgb8", step=6, data=bytes(12)))
        time.sleep(chunk / rate)
    """
)


def _spied(spy: Path) -> list[list[str]]:
    return [p.read_text().split() for p in spy.glob("audio_*") if p.read_text()]


@pytest.mark.parametrize(
    ("fork", "mic_type", "topic"),
    [
        ("mgonzs13", "audio_common_msgs/msg/AudioStamped", "audio"),
        ("ros_drivers", "audio_common_msgs/msg/AudioDataStamped", "audio_stamped"),
    ],
)
def test_a_live_audio_common_mic_reaches_the_flow_and_a_realsense_topic_is_pointed_out(
    fork: str, mic_type: str, topic: str, audio_common_prefix, tmp_path: Path
) -> None:
    env = audio_common_prefix(fork)
    spy = tmp_path / "spy"
    spy.mkdir()
    params = {"backend": "reference", "reference.size": "tiny", "mic.type": mic_type}
    proc = NodeProcess.with_doubles(
        params,
        tmp_path / "node.log",
        extra=["-r", f"audio/mic:={topic}"],
        env={**env, "OMNI_TEST_SPY_DIR": str(spy)},
    )
    peer = subprocess.Popen(
        [sys.executable, "-c", PEER, fork, proc.namespace],
        env={**proc_env(env), "ROS_DOMAIN_ID": str(proc.domain_id)},
    )
    try:
        wait_for(lambda: len(_spied(spy)) >= 10, 120.0, "audio_common chunks in the flow", proc)
        wait_for(lambda: "RealSense" in proc.log_path.read_text(), 30.0, "the camera advice", proc)
        assert peer.poll() is None
    finally:
        stop_process(peer)  # kills it if it outlives SIGTERM by 10 s (the peer is not under test)
        proc.stop()
    for rate, channels, encoding, size in _spied(spy):
        assert (rate, channels, encoding, size) == ("16000", "1", "S16LE", str(2 * 800))
    log = proc.log_path.read_text()
    assert f"camera/image_raw:={proc.namespace}/camera/camera/color/image_raw" in log


def proc_env(extra: dict[str, str]) -> dict[str, str]:
    import os

    return {**os.environ, **extra}


def test_an_audio_common_type_that_is_not_installed_fails_configure_naming_the_fix(
    tmp_path: Path,
) -> None:
    params = {"backend": "reference", "mic.type": "audio_common_msgs/msg/AudioDataStamped"}
    proc = NodeProcess.with_doubles(params, tmp_path / "node.log")
    try:
        wait_for(lambda: "configure failed" in proc.log_path.read_text(), 120.0, "configure", proc)
        time.sleep(0.2)
    finally:
        proc.stop()
    log = proc.log_path.read_text()
    assert "ros-$ROS_DISTRO-audio-common-msgs" in log
    assert "not installed" in log


# ----------------------------------------------------------------------------------- fixture
INTERFACES = Path(__file__).resolve().parents[1] / "interfaces"
REPO = Path(__file__).resolve().parents[3]


def _build(fork: str) -> Path:
    """Build ``test/interfaces/<fork>/audio_common_msgs`` with colcon (cached per venv + sources)."""
    import hashlib
    import os

    src = INTERFACES / fork
    digest = hashlib.sha256(sys.prefix.encode())
    for path in sorted(src.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    base = REPO / ".cache" / "test_interfaces" / f"{fork}-{digest.hexdigest()[:12]}"
    install = base / "install"
    if (install / "audio_common_msgs" / "share" / "audio_common_msgs" / "package.xml").exists() or (
        install / "share" / "audio_common_msgs" / "package.xml"
    ).exists():
        return install
    result = subprocess.run(
        ["colcon", "--log-base", str(base / "log"), "build", "--merge-install",
         "--base-paths", str(src), "--build-base", str(base / "build"),
         "--install-base", str(install), "--cmake-args", "-DBUILD_TESTING=OFF"],
        capture_output=True, text=True, timeout=900, env=os.environ.copy(), check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(
            f"building {src} failed:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
        )
    return install


@pytest.fixture(scope="session")
def audio_common_prefix():  # type: ignore[no-untyped-def]
    """fork -> the environment additions that make that fork's audio_common_msgs importable."""
    import os

    built: dict[str, dict[str, str]] = {}

    def env(fork: str) -> dict[str, str]:
        if fork not in built:
            install = _build(fork)
            site = next(install.glob("lib/python3*/site-packages"))
            join = lambda *parts: os.pathsep.join(p for p in parts if p)  # noqa: E731
            built[fork] = {
                "PYTHONPATH": join(str(site), os.environ.get("PYTHONPATH", "")),
                "LD_LIBRARY_PATH": join(
                    str(install / "lib"), os.environ.get("LD_LIBRARY_PATH", "")
                ),
                "AMENT_PREFIX_PATH": join(str(install), os.environ.get("AMENT_PREFIX_PATH", "")),
            }
        return built[fork]

    return env
