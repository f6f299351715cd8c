"""Every omni_ros_msgs type round-trips between two separate processes over real DDS."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

rclpy = pytest.importorskip("rclpy")

from flow_harness import ResentCall  # noqa: E402
from interface_samples import SAMPLES, build_rclpy  # noqa: E402

PEER = Path(__file__).parent / "peers" / "echo_peer.py"


@pytest.fixture(scope="module")
def echo_peer() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, str(PEER)], env=os.environ.copy())
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def node(echo_peer: subprocess.Popen[bytes]) -> Iterator[Any]:
    from rclpy.executors import SingleThreadedExecutor

    from omni_ros_msgs.msg import OmniState

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("interface_test", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    ready = threading.Event()
    node.create_subscription(OmniState, "/echo_ready", lambda _msg: ready.set(), 10)
    deadline = time.monotonic() + 30
    while not ready.is_set() and time.monotonic() < deadline:
        assert echo_peer.poll() is None, "echo peer died"
        executor.spin_once(timeout_sec=0.1)
    assert ready.is_set(), "echo peer never became visible over DDS"
    node.executor_for_test = executor
    yield node
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=context)


def _spin_until(node: Any, done: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        node.executor_for_test.spin_once(timeout_sec=0.05)


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_every_message_type_round_trips_through_another_process(node: Any, type_name: str) -> None:
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    import omni_ros_msgs.msg as msgs

    msg_type = getattr(msgs, type_name)
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    received: list[Any] = []
    sub = node.create_subscription(msg_type, f"/echo_out/{type_name}", received.append, qos)
    pub = node.create_publisher(msg_type, f"/echo_in/{type_name}", qos)
    sent = build_rclpy(type_name)
    _spin_until(node, lambda: pub.get_subscription_count() > 0 and sub.get_publisher_count() > 0)
    pub.publish(sent)
    _spin_until(node, lambda: bool(received))
    node.destroy_subscription(sub)
    node.destroy_publisher(pub)
    assert received, f"{type_name} never came back"
    assert received[0] == sent


def test_set_prompt_service_round_trips_request_and_response(node: Any) -> None:
    from omni_ros_msgs.srv import SetPrompt

    client = node.create_client(SetPrompt, "/echo/set_prompt")
    _spin_until(node, client.service_is_ready)
    request = SetPrompt.Request(
        system_prompt="Streaming Omni Conversation.", ref_voice_path="/tmp/v.wav"
    )
    # The echo server's reply may be asked for again: a first call on a new client can lose its
    # reply on Fast DDS (flow_harness.call_service says why).
    call = ResentCall(client, request, resend_s=2.0)
    _spin_until(node, call.answered)
    assert call.answered(), "no reply from /echo/set_prompt in 15 s"
    result = call.result()
    assert result.success is True
    assert result.message == "Streaming Omni Conversation.|/tmp/v.wav"


def test_ask_action_round_trips_goal_feedback_and_result(node: Any) -> None:
    from rclpy.action import ActionClient

    from omni_ros_msgs.action import Ask

    client = ActionClient(node, Ask, "/echo/ask")
    _spin_until(node, client.server_is_ready)
    feedback: list[str] = []
    goal_future = client.send_goal_async(
        Ask.Goal(text="what do you see?", timeout_s=2.5),
        feedback_callback=lambda fb: feedback.append(fb.feedback.partial_text),
    )
    _spin_until(node, goal_future.done)
    handle = goal_future.result()
    assert handle.accepted
    result_future = handle.get_result_async()
    _spin_until(node, result_future.done)
    result = result_future.result().result
    assert result.reply == "what do you see?|2.5"
    assert result.spoken is True
    assert feedback[-1] == "what do you see?"
