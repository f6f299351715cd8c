"""The omni/ask companion's executor starts all its worker threads when the node starts: a burst
of goals creates no thread (rclpy's MultiThreadedExecutor pool otherwise grows on demand, which
made test_faults' thread-leak check see +2 threads in a CI run)."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("rclpy")

pytestmark = [pytest.mark.ros, pytest.mark.timeout(60)]


def test_a_burst_of_goals_starts_no_thread_in_the_ask_executor() -> None:
    import rclpy
    from omni_ros.ros._ask_server import AskHost
    from rclpy.action import ActionClient
    from rclpy.executors import SingleThreadedExecutor

    from omni_ros_msgs.action import Ask

    context = rclpy.Context()
    rclpy.init(context=context)
    main = rclpy.create_node("ask_pool_main", context=context)

    def execute(goal_handle: object) -> object:
        time.sleep(0.3)  # a goal holds its worker, as a real reply turn does
        goal_handle.succeed()  # type: ignore[attr-defined]
        return Ask.Result(reply="ok", spoken=False)

    host = AskHost(main, execute, lambda: True, max_goals=2)
    client_node = rclpy.create_node("ask_pool_client", context=context)
    client = ActionClient(client_node, Ask, main.resolve_topic_name("omni/ask"))
    spin = SingleThreadedExecutor(context=context)
    spin.add_node(client_node)
    try:
        assert host.pool_threads == host.max_goals + 2
        assert client.wait_for_server(timeout_sec=10)
        time.sleep(0.5)
        before = threading.active_count()
        for _round in range(2):
            sent = [client.send_goal_async(Ask.Goal(text=f"hi {k}")) for k in range(4)]
            for future in sent:
                spin.spin_until_future_complete(future, timeout_sec=10)
            results = [f.result().get_result_async() for f in sent if f.result().accepted]
            assert len(results) == 2  # max_goals at once; the other two refused
            for future in results:
                spin.spin_until_future_complete(future, timeout_sec=10)
                assert future.result().result.reply == "ok"
        assert threading.active_count() == before
    finally:
        client.destroy()
        host.close()
        spin.shutdown()
        client_node.destroy_node()
        main.destroy_node()
        rclpy.try_shutdown(context=context)
