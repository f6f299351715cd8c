"""``AskHost``: the ``omni/ask`` action server, on a companion node with its own executor."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import rclpy
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.qos import QoSProfile, ReliabilityPolicy

from omni_ros import topics
from omni_ros_msgs.action import Ask


def prestart_pool(executor: MultiThreadedExecutor, num_threads: int) -> int:
    """Start every worker thread of ``executor``'s pool now, so the process's thread count is
    fixed once the node is up (no thread is created while it runs; a leak check can count).

    rclpy's MultiThreadedExecutor runs callbacks in a ``concurrent.futures.ThreadPoolExecutor``
    (``self._executor``, rclpy/executors.py ``MultiThreadedExecutor.__init__``), which starts a
    worker only when a task finds none idle: measured, 0 threads after construction, 4 after a
    burst of 4 concurrent requests. Each warm-up task waits for all the others, so every
    submission finds no idle worker and starts one. Returns the workers running afterwards (0
    when the pool is not a ThreadPoolExecutor: the executor is left as it is).
    """
    pool = getattr(executor, "_executor", None)
    if not isinstance(pool, ThreadPoolExecutor):
        return 0
    barrier = threading.Barrier(num_threads)

    def hold() -> None:
        try:
            barrier.wait(timeout=5.0)
        except threading.BrokenBarrierError:
            pass

    for future in [pool.submit(hold) for _ in range(num_threads)]:
        future.result(timeout=10.0)
    return len(getattr(pool, "_threads", ()))


class AskHost:
    """Serves the ``omni/ask`` action from a small companion node with its own executor thread.

    At most ``max_goals`` goals run at once; a goal beyond that (or while the node is inactive) is
    rejected at once and counted in :attr:`rejected`.

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

    def __init__(self, node: Any, execute: Any, accepting: Any, max_goals: int = 2) -> None:
        self.max_goals = max(1, int(max_goals))
        #: goals refused (inactive node, or ``max_goals`` already running).
        self.rejected = 0
        self._running = 0
        self._lock = threading.Lock()
        self._execute, self._accepting = execute, accepting
        name = node.resolve_topic_name(topics.ASK)
        self.node = rclpy.create_node(
            f"{node.get_name()}_ask",
            namespace=node.get_namespace(),
            context=node.context,
            use_global_arguments=False,
            start_parameter_services=False,
        )
        self.server = ActionServer(
            self.node, Ask, name, self._run_goal, callback_group=ReentrantCallbackGroup(),
            goal_callback=self._on_goal, cancel_callback=lambda _goal: CancelResponse.ACCEPT,
            # A burst of requests must each get an answer (accept or reject), not be overwritten
            # in a depth-10 request queue before the executor takes them.
            goal_service_qos_profile=QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE),
        )  # fmt: skip
        # One thread per goal that may run, plus one that always answers goal and cancel requests
        # (with every thread blocked in a goal, new requests were left pending, never answered).
        # (+1 more for omni/set_prompt, which the main node serves here and which waits for the
        # backend's prepare.)
        self.executor = MultiThreadedExecutor(num_threads=self.max_goals + 2, context=node.context)
        #: threads of the executor's pool, all started here (see :func:`prestart_pool`).
        self.pool_threads = prestart_pool(self.executor, self.max_goals + 2)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self._spin, name="omni-ask", daemon=True)
        self.thread.start()

    def _on_goal(self, _goal: Any) -> GoalResponse:
        """Accept while the node is active and fewer than ``max_goals`` goals run (counted at
        acceptance, so a burst of requests cannot all slip in before the first one starts)."""
        with self._lock:
            if self._accepting() and self._running < self.max_goals:
                self._running += 1
                return GoalResponse.ACCEPT
            self.rejected += 1
            return GoalResponse.REJECT

    def _run_goal(self, goal_handle: Any) -> Any:
        try:
            return self._execute(goal_handle)
        finally:
            with self._lock:
                self._running -= 1

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
