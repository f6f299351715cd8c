"""omni_live_view's bridge finds the node's topics in the ROS graph by itself: a topic under omni/
that did not exist when it started (any type) is served to a Foxglove client once published."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("rclpy")

from foxglove_client import Client, node_executable

pytestmark = [pytest.mark.ros, pytest.mark.timeout(120)]


def test_a_new_topic_under_omni_is_served_with_its_ros2msg_schema() -> None:
    import rclpy
    from omni_ros.ros.omni_live_view import TopicBridge
    from omni_ros.tools.live_view import LiveView
    from rclpy.executors import SingleThreadedExecutor
    from std_msgs.msg import String

    node_executable()
    context = rclpy.Context()
    rclpy.init(context=context)
    bridge_node = rclpy.create_node("live_view_under_test", context=context)
    talker = rclpy.create_node("future_topic_talker", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(bridge_node)
    executor.add_node(talker)
    view = LiveView(port=0)
    bridge = TopicBridge(bridge_node, view, period_s=0.2)
    spinning = threading.Event()
    spinning.set()

    def spin() -> None:
        while spinning.is_set():
            executor.spin_once(timeout_sec=0.05)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    client = Client(view.url, idle_ms=3000, max_ms=90_000)
    try:
        # The client is connected and subscribed to every channel before the topic exists. (A
        # fixed sleep was not enough under load: the client connected while the view's channels
        # were being advertised, and foxglove-sdk sends an advertisement before it records the
        # channel for that client (ConnectedClient::advertise_channels,
        # rust/foxglove/src/websocket/connected_client.rs), so a fast subscribe was refused as
        # "unknown channel" and never retried. See docs/LIVE_VIEW.md.)
        assert view.wait_for_clients(60), "".join(client.stderr)
        pub = talker.create_publisher(String, "/omni/not_yet_invented", 10)
        deadline = time.monotonic() + 30
        while "/omni/not_yet_invented" not in bridge.subscriptions:
            assert time.monotonic() < deadline, "the bridge never found the new topic"
            time.sleep(0.1)
        assert view.wait_for_clients(30), "the client never subscribed: " + "".join(client.stderr)
        deadline = time.monotonic() + 30
        while pub.get_subscription_count() == 0:
            assert time.monotonic() < deadline, "the bridge's subscription never matched"
            time.sleep(0.05)
        for k in range(5):
            pub.publish(String(data=f"hello {k}"))
            time.sleep(0.1)
        seen = client.result(timeout_s=60)
    finally:
        spinning.clear()
        thread.join(5)
        bridge.close()
        view.close()
        executor.shutdown()
        talker.destroy_node()
        bridge_node.destroy_node()
        rclpy.try_shutdown(context=context)
    channel = seen["channels"]["/omni/not_yet_invented"]
    assert channel["schemaName"] == "std_msgs/msg/String"
    assert channel["schemaEncoding"] == "ros2msg"
    assert [m["data"] for m in channel["messages"]] == [f"hello {k}" for k in range(5)]
