"""A node whose construction takes long (a device or a model opening), run through the package's
``spin_node`` like mic_node and speaker_node (a test peer process).

Usage: ``python slow_start_node.py SECONDS``; prints ``building`` when construction begins.
"""

from __future__ import annotations

import sys
import time

from omni_ros.ros._run import spin_node
from rclpy.node import Node
from std_msgs.msg import String


class SlowStartNode(Node):
    def __init__(self) -> None:
        super().__init__("slow_start_node")
        print("building", flush=True)
        time.sleep(float(sys.argv[1]))
        self.pub = self.create_publisher(String, "slow_start/out", 10)


if __name__ == "__main__":
    spin_node(SlowStartNode, "slow_start_node", sys.argv[2:])
