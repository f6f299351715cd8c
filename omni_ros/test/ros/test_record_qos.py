"""``omni-ros record`` keeps the QoS the live publishers offered, as ``ros2 bag record`` does."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from omni_ros.tools.record import record
from rosbags.interfaces import QosDurability, QosHistory, QosReliability
from rosbags.rosbag2 import Reader

PUBLISHER = textwrap.dedent(
    """
    import time
    import rclpy
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import Bool

    rclpy.init()
    node = rclpy.create_node("qos_probe_publisher")
    qos = QoSProfile(depth=3, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
    pub = node.create_publisher(Bool, "/qos_probe", qos)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        pub.publish(Bool(data=True))
        time.sleep(0.05)
    """
)


def test_a_recorded_topic_keeps_its_publishers_transient_local_qos(tmp_path: Path) -> None:
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER])
    try:
        counts = record(tmp_path / "bag", ["/qos_probe"], duration_s=1.5, discover_s=20.0)
    finally:
        publisher.terminate()
        publisher.wait(timeout=10)
    assert counts["/qos_probe"] > 0
    with Reader(tmp_path / "bag") as reader:
        (conn,) = reader.connections
        (profile,) = conn.ext.offered_qos_profiles
    assert profile.durability == QosDurability.TRANSIENT_LOCAL
    assert profile.reliability == QosReliability.RELIABLE
    # Discovery does not carry history / depth (the graph says UNKNOWN, 0): keep-last 10.
    assert profile.history == QosHistory.KEEP_LAST
    assert profile.depth == 10
    meta = yaml.safe_load((tmp_path / "bag" / "metadata.yaml").read_text())
    (topic,) = meta["rosbag2_bagfile_information"]["topics_with_message_count"]
    assert isinstance(topic["topic_metadata"]["offered_qos_profiles"], str), "Humble-readable"
