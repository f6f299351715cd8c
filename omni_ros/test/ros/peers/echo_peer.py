"""A separate process that echoes every omni_ros_msgs interface back over DDS.

Topics ``/echo_in/<Type>`` are republished unchanged on ``/echo_out/<Type>``; the ``/echo/set_prompt``
service answers with the prompt it received; the ``/echo/ask`` action sends the goal text back as two
feedback messages and the result. Runs until killed.
"""

from __future__ import annotations

import time

import rclpy
from rclpy.action import ActionServer
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from omni_ros_msgs.action import Ask
from omni_ros_msgs.msg import (
    AudioChunk,
    OmniState,
    OmniText,
    Playback,
    ProactiveAction,
    SpeechFlush,
)
from omni_ros_msgs.srv import SetPrompt

QOS = QoSProfile(
    depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE
)


class EchoPeer(Node):
    def __init__(self) -> None:
        super().__init__("echo_peer")
        self._keep = []
        for msg_type in (AudioChunk, OmniText, ProactiveAction, OmniState, SpeechFlush, Playback):
            name = msg_type.__name__
            pub = self.create_publisher(msg_type, f"/echo_out/{name}", QOS)
            self._keep.append(pub)
            self._keep.append(
                self.create_subscription(msg_type, f"/echo_in/{name}", pub.publish, QOS)
            )
        self.create_service(SetPrompt, "/echo/set_prompt", self._set_prompt)
        self._ask = ActionServer(self, Ask, "/echo/ask", self._execute)
        self.ready = self.create_publisher(OmniState, "/echo_ready", QOS)
        self.create_timer(0.1, lambda: self.ready.publish(OmniState(backend="echo")))

    def _set_prompt(
        self, request: SetPrompt.Request, response: SetPrompt.Response
    ) -> SetPrompt.Response:
        response.success = bool(request.system_prompt)
        response.message = f"{request.system_prompt}|{request.ref_voice_path}"
        return response

    def _execute(self, goal_handle):  # type: ignore[no-untyped-def]
        text = goal_handle.request.text
        for part in (text[: len(text) // 2], text):
            goal_handle.publish_feedback(Ask.Feedback(partial_text=part))
        # Feedback and result travel on different topics, and rclpy's ActionClient forgets a
        # goal's feedback callback once its result is in (rclpy/action/client.py,
        # ActionClient._remove_pending_result_request): a feedback that lands after the result is
        # dropped (seen under load: 'what do ' was the last one). Leave the feedback time first.
        time.sleep(0.3)
        goal_handle.succeed()
        return Ask.Result(reply=f"{text}|{goal_handle.request.timeout_s:.1f}", spoken=True)


def main() -> None:
    rclpy.init()
    node = EchoPeer()
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
