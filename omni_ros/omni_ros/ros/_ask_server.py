"""``AskHost``: the ``omni/ask`` action server, on a companion node with its own executor."""

from __future__ import annotations

import threading
from typing import Any

import rclpy
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

from omni_ros_msgs.action import Ask


class AskHost:
    """Serves the ``omni/ask`` action from a small companion node with its own executor thread.

    Why not the main node: an Ask goal blocks until the model's reply turn ends (seconds), so it
    needs a multi-threaded executor, and rclpy's MultiThreadedExecutor behaves badly with
    high-rate subscriptions. With the 50 Hz mic, /clock and camera it either busy-waits holding the
    GIL (mutually exclusive groups) or queues thousands of duplicate handlers (reentrant groups);
    measured in graph replay on 2 cores, both starved the backend thread for 1.5-7 s per unit
    (BackendTimeout, late and dropped input). So the main node spins a SingleThreadedExecutor
    (its callbacks never block) and only this node, which has nothing else, is multi-threaded.

    The companion ignores global ROS arguments (a launch file's ``__node`` remap must not rename
    it to the main node's name); it gets the main node's namespace and the action name the main
    node resolved, so namespaces and remaps of ``omni/ask`` still apply.
    """

    def __init__(self, node: Any, execute: Any, accepting: Any) -> None:
        name = node.resolve_topic_name("omni/ask")
        self.node = rclpy.create_node(
            f"{node.get_name()}_ask",
            namespace=node.get_namespace(),
            context=node.context,
            use_global_arguments=False,
            start_parameter_services=False,
        )
        self.server = ActionServer(
            self.node, Ask, name, execute, callback_group=ReentrantCallbackGroup(),
            goal_callback=lambda _goal: GoalResponse.ACCEPT if accepting() else GoalResponse.REJECT,
            cancel_callback=lambda _goal: CancelResponse.ACCEPT,
        )  # fmt: skip
        self.executor = MultiThreadedExecutor(num_threads=2, context=node.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, name="omni-ask", daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except (ExternalShutdownException, RuntimeError):
            pass  # the context shut down under us at process exit

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.server.destroy()
        self.node.destroy_node()
        self.thread.join(timeout=2.0)
