"""Camera-size frames between two processes, with sensor-data QoS (what camera drivers use).

``python camera_peer.py pub TOPIC WIDTH HEIGHT FPS COUNT``: once a subscriber matched, publishes
``COUNT`` rgb8 frames at ``FPS`` (frame_id = the frame's index); prints ``sent N``.
``python camera_peer.py count TOPIC SECONDS``: counts distinct frames for ``SECONDS`` after the
first one (or until stdin closes); prints ``received N``.
"""

from __future__ import annotations

import array
import sys
import time

import rclpy
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image


def count(topic: str, seconds: float) -> None:
    rclpy.init()
    node = rclpy.create_node("camera_counter")
    seen: set[str] = set()
    node.create_subscription(
        Image, topic, lambda msg: seen.add(msg.header.frame_id), qos_profile_sensor_data
    )
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
        if seen and deadline - time.monotonic() > seconds:
            deadline = time.monotonic() + seconds
    print(f"received {len(seen)}", flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


def main() -> None:
    if sys.argv[1] == "count":
        count(sys.argv[2], float(sys.argv[3]))
        return
    topic, width, height, fps, count_ = sys.argv[2], *map(int, sys.argv[3:7])
    rclpy.init()
    node = rclpy.create_node("camera_peer")
    pub = node.create_publisher(Image, topic, qos_profile_sensor_data)
    deadline = time.monotonic() + 30
    while pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # let the match settle on both sides
    data = array.array("B", bytes(width * height * 3))
    start = time.monotonic()
    for i in range(count_):
        msg = Image(width=width, height=height, encoding="rgb8", step=width * 3)
        msg.header.stamp = node.get_clock().now().to_msg()
        msg.header.frame_id = str(i)
        msg.data = data
        pub.publish(msg)
        time.sleep(max(0.0, start + (i + 1) / fps - time.monotonic()))
    time.sleep(1.0)  # keep the writer alive while the last frames drain
    print(f"sent {count_}", flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()
