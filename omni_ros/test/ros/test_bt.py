"""The py_trees integration over real DDS: ProactiveAction -> blackboard, Ask action as a behaviour.

The Ask server is a test double of omni_flow_node's action (peers/ask_server_double.py) in a
separate process; the tree, its node and the test's publisher live in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

rclpy = pytest.importorskip("rclpy")
py_trees = pytest.importorskip("py_trees")

from omni_ros.bt import AskBehaviour, ProactiveToBlackboard, create_proactive_tree  # noqa: E402
from py_trees.common import Status  # noqa: E402

PEER = Path(__file__).parent / "peers" / "ask_server_double.py"
NS = "/bt_test"


@pytest.fixture(scope="module")
def ask_server() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, str(PEER), "--ros-args", "-r", f"__ns:={NS}"], env=os.environ.copy()
    )
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def node(ask_server: subprocess.Popen[bytes]) -> Iterator[Any]:
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from omni_ros_msgs.msg import OmniText, ProactiveAction

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("bt_test", namespace=NS, context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    node.asked = []
    node.create_subscription(
        OmniText, "omni/ask_received", lambda m: node.asked.append(m.text), qos
    )
    node.proactive_pub = node.create_publisher(ProactiveAction, "omni/proactive", qos)
    yield node
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=context)
    spinner.join(timeout=5)


@pytest.fixture(autouse=True)
def clean_blackboard() -> Iterator[None]:
    py_trees.blackboard.Blackboard.clear()
    yield
    py_trees.blackboard.Blackboard.clear()


def _tick_until(
    tree: Any, done: Callable[[], bool], timeout_s: float = 20.0, period_s: float = 0.02
) -> int:
    ticks = 0
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        tree.tick()
        ticks += 1
        time.sleep(period_s)
    assert done(), "the tree never got there"
    return ticks


def _publish_proactive(node: Any, kind: str, text: str, turn_id: int) -> None:
    from omni_ros_msgs.msg import ProactiveAction

    msg = ProactiveAction(turn_id=turn_id, kind=kind, text=text, confidence=0.75)
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1_700_000_012, 500
    msg.trigger_stamp.sec, msg.trigger_stamp.nanosec = 1_700_000_010, 0
    node.proactive_pub.publish(msg)


def _wait_for_subscriber(node: Any) -> None:
    deadline = time.monotonic() + 15
    while node.proactive_pub.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert node.proactive_pub.get_subscription_count() > 0


def _bb(key: str) -> Any:
    return py_trees.blackboard.Blackboard.get(f"/omni/{key}")


def test_a_published_proactive_action_becomes_a_blackboard_event(node: Any) -> None:
    behaviour = ProactiveToBlackboard()
    tree = py_trees.trees.BehaviourTree(behaviour)
    tree.setup(node=node)
    _wait_for_subscriber(node)
    tree.tick()
    assert _bb("proactive_events") == []
    _publish_proactive(node, "reminder", "take your pills", turn_id=4)
    _tick_until(tree, lambda: bool(_bb("proactive_events")))
    (event,) = _bb("proactive_events")
    assert (event.kind, event.text, event.turn_id) == ("reminder", "take your pills", 4)
    assert event.confidence == pytest.approx(0.75)
    assert event.stamp_ns == 1_700_000_012_000_000_500
    assert event.trigger_stamp_ns == 1_700_000_010_000_000_000
    assert _bb("last_proactive") == event
    assert behaviour.status == Status.SUCCESS
    tree.shutdown()


def test_ask_runs_until_the_reply_arrives_then_succeeds(node: Any) -> None:
    ask = AskBehaviour(question="what do you see?", server_timeout_s=15.0)
    tree = py_trees.trees.BehaviourTree(ask)
    tree.setup(node=node)
    tree.tick()
    assert ask.status == Status.RUNNING, (
        "the first tick only sends the goal (or waits for discovery)"
    )
    _tick_until(tree, lambda: ask.status != Status.RUNNING)
    assert tree.root.status == Status.SUCCESS
    assert _bb("ask_reply") == "answer: what do you see?"
    assert ask.partial_text == "answer:"
    tree.shutdown()


def test_ask_fails_when_the_goal_is_aborted(node: Any) -> None:
    ask = AskBehaviour(question="fail please", server_timeout_s=15.0)
    tree = py_trees.trees.BehaviourTree(ask)
    tree.setup(node=node)
    _tick_until(tree, lambda: ask.status not in (Status.RUNNING, Status.INVALID))
    assert ask.status == Status.FAILURE
    tree.shutdown()


def test_ask_fails_when_the_goal_is_rejected(node: Any) -> None:
    ask = AskBehaviour(question="", server_timeout_s=15.0)
    tree = py_trees.trees.BehaviourTree(ask)
    tree.setup(node=node)
    _tick_until(tree, lambda: ask.status not in (Status.RUNNING, Status.INVALID))
    assert ask.status == Status.FAILURE
    assert ask.feedback_message == "goal rejected"
    tree.shutdown()


def test_ask_fails_when_no_server_appears(node: Any) -> None:
    ask = AskBehaviour(
        question="anyone?", action_name="omni/nobody_serves_this", server_timeout_s=0.3
    )
    tree = py_trees.trees.BehaviourTree(ask)
    tree.setup(node=node)
    _tick_until(tree, lambda: ask.status not in (Status.RUNNING, Status.INVALID))
    assert ask.status == Status.FAILURE
    tree.shutdown()


def _wait_asked(node: Any, text: str, timeout_s: float = 15.0) -> None:
    """Wait until the Ask server double has recorded ``text`` (a goal, or its cancel)."""
    deadline = time.monotonic() + timeout_s
    while text not in node.asked and time.monotonic() < deadline:
        time.sleep(0.02)
    assert text in node.asked, (text, node.asked)


def test_halting_a_running_ask_cancels_its_goal(node: Any) -> None:
    ask = AskBehaviour(question="slow question", server_timeout_s=15.0)
    tree = py_trees.trees.BehaviourTree(ask)
    tree.setup(node=node)
    _tick_until(tree, lambda: "slow question" in node.asked)
    ask.stop(Status.INVALID)
    _wait_asked(node, "canceled: slow question")
    tree.shutdown()


def test_the_example_tree_asks_about_an_alert_and_remembers_the_reply(node: Any) -> None:
    tree = create_proactive_tree(server_timeout_s=15.0)
    tree.setup(node=node)
    _wait_for_subscriber(node)
    tree.tick()
    assert tree.root.status == Status.SUCCESS, "idle without events"
    # A comment is not one of the kinds the tree reacts to; the alert is.
    _publish_proactive(node, "comment", "nice weather", turn_id=1)
    _publish_proactive(node, "alert", "the stove is still on", turn_id=2)
    _tick_until(tree, lambda: bool(_bb("handled")))
    ((event, reply),) = _bb("handled")
    assert (event.kind, event.turn_id) == ("alert", 2)
    assert (
        reply
        == 'answer: You just raised a alert: "the stove is still on". What should the robot do now?'
    )
    assert [e.kind for e in _bb("proactive_events")] == ["comment"], "unhandled events stay queued"
    tree.shutdown()


class _NeverAnswered:
    """A goal future whose reply never comes (Fast DDS dropped it: see AskBehaviour)."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[Any], None]] = []

    def done(self) -> bool:
        return False

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)


class _SilentActionClient:
    def __init__(self) -> None:
        self.sent: list[tuple[Any, Any]] = []
        self.future = _NeverAnswered()

    def server_is_ready(self) -> bool:
        return True

    def send_goal_async(self, goal: Any, feedback_callback: Any = None, goal_uuid: Any = None):
        self.sent.append((goal, goal_uuid))
        return self.future


class _CancelService:
    def __init__(self) -> None:
        self.requests: list[Any] = []

    def service_is_ready(self) -> bool:
        return True

    def call_async(self, request: Any) -> None:
        self.requests.append(request)


def test_ask_gives_up_on_a_goal_never_answered_and_cancels_it_by_its_id() -> None:
    # Without the limit the behaviour stayed RUNNING forever when the acceptance was lost.
    ask = AskBehaviour(question="hello?", goal_response_timeout_s=0.2)
    ask._client, ask._cancel_client = _SilentActionClient(), _CancelService()
    tree = py_trees.trees.BehaviourTree(ask)
    tree.tick()
    assert ask.status == Status.RUNNING
    ((goal, goal_id),) = ask._client.sent
    assert goal.text == "hello?"
    deadline = time.monotonic() + 5
    while ask.status == Status.RUNNING and time.monotonic() < deadline:
        tree.tick()
        time.sleep(0.02)
    assert ask.status == Status.FAILURE
    assert ask.feedback_message.startswith("no answer to the goal within 0.2 s")
    (request,) = ask._cancel_client.requests
    assert bytes(request.goal_info.goal_id.uuid) == bytes(goal_id.uuid)
    assert len(ask._client.future.callbacks) == 1, "a late acceptance is canceled too"
    tree.tick()  # a fresh start sends a new goal with a new id
    assert len(ask._client.sent) == 2
    assert bytes(ask._client.sent[1][1].uuid) != bytes(goal_id.uuid)


def test_ask_that_gives_up_on_the_reply_cancels_the_goal_on_the_server(node: Any) -> None:
    # A zero limit gives up on the first tick, as if the acceptance had been lost; the server
    # accepted the goal and holds it ("slow ..."): the cancel by id or through the late handle
    # must reach it.
    ask = AskBehaviour(question="slow question", goal_response_timeout_s=0.0, server_timeout_s=15)
    tree = py_trees.trees.BehaviourTree(ask)
    tree.setup(node=node)
    node.asked.clear()
    _tick_until(tree, lambda: ask.status not in (Status.RUNNING, Status.INVALID))
    assert ask.status == Status.FAILURE
    _wait_asked(node, "canceled: slow question")
    tree.shutdown()
