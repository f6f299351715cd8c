"""A test double of omni_flow_node's ``omni/ask`` action server, run as a separate process.

Replies ``answer: <goal text>`` after one feedback message. Goals whose text starts with ``fail``
are aborted, an empty text is rejected, and text starting with ``slow`` is held until canceled (or
10 s). Also publishes ``omni/ask_received`` (OmniText) with every accepted goal's text, so a test
can see exactly what its tree asked. Namespace via ``--ros-args -r __ns:=/x``. Runs until killed.
"""

from __future__ import annotations

import time

import rclpy
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy

from omni_ros_msgs.action import Ask
from omni_ros_msgs.msg import OmniText


class AskServerDouble(Node):  # type: ignore[misc]  # rclpy is untyped
    def __init__(self) -> None:
        super().__init__("ask_server_double")
        group = ReentrantCallbackGroup()
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.received = self.create_publisher(OmniText, "omni/ask_received", qos)
        self.server = ActionServer(
            self,
            Ask,
            "omni/ask",
            self._execute,
            goal_callback=lambda goal: GoalResponse.ACCEPT if goal.text else GoalResponse.REJECT,
            cancel_callback=lambda _handle: CancelResponse.ACCEPT,
            callback_group=group,
        )

    def _execute(self, goal_handle):  # type: ignore[no-untyped-def]
        text = goal_handle.request.text
        self.received.publish(OmniText(text=text))
        goal_handle.publish_feedback(Ask.Feedback(partial_text="answer:"))
        if text.startswith("fail"):
            goal_handle.abort()
            return Ask.Result(reply="", spoken=False)
        if text.startswith("slow"):
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline:
                if goal_handle.is_cancel_requested:
                    goal_handle.canceled()
                    self.received.publish(OmniText(text=f"canceled: {text}"))
                    return Ask.Result(reply="", spoken=False)
                time.sleep(0.01)
        goal_handle.succeed()
        return Ask.Result(reply=f"answer: {text}", spoken=True)


def main() -> None:
    rclpy.init()
    node = AskServerDouble()
    executor = MultiThreadedExecutor()
    try:
        rclpy.spin(node, executor=executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
