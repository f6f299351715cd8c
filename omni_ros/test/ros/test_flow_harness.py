"""The harness's service calls hold when a reply is lost, as Fast DDS loses one (``flow_harness.
call_service`` says when and cites where): clients stand in for rclpy's whose first reply never
comes, so the test needs no node and fails the same way every time."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest
from flow_harness import call_service, lifecycle_transition

pytestmark = [pytest.mark.ros, pytest.mark.timeout(60)]


class LosingClient:
    """A client whose first ``lost`` requests are served but never answered (their reply dropped
    by the middleware), and whose later ones are answered with ``reply(request)``."""

    srv_name = "/lossy"

    def __init__(self, reply: Any, lost: int = 1) -> None:
        self.reply = reply
        self.lost = lost
        self.requests: list[Any] = []

    def service_is_ready(self) -> bool:
        return True

    def call_async(self, request: Any) -> Future[Any]:
        self.requests.append(request)
        future: Future[Any] = Future()
        if len(self.requests) > self.lost:
            future.set_result(self.reply(request))
        return future


def test_a_read_whose_reply_is_lost_is_sent_again_and_answered() -> None:
    client = LosingClient(lambda request: ("answer", request))
    assert call_service(client, "q", None, timeout_s=5.0, resend_s=0.2) == ("answer", "q")
    assert client.requests == ["q", "q"]


def test_without_resending_a_lost_reply_is_a_timeout_not_an_answer() -> None:
    client = LosingClient(lambda request: "answer")
    with pytest.raises(AssertionError, match=r"timed out after 0\.5 s waiting for a response"):
        call_service(client, "q", None, timeout_s=0.5)
    assert client.requests == ["q"]


class LifecycleNode:
    """The node's side: change_state moves the state at once, its reply is lost (never resent:
    a repeated ChangeState would fail); get_state answers."""

    def __init__(self, label: str, goal: str | None) -> None:
        self.label = label
        self.goal = goal
        self.change = LosingClient(self._change, lost=10)
        self.get_state = LosingClient(self._get, lost=0)

    def _change(self, request: Any) -> Any:
        raise AssertionError("the reply is lost")

    def _get(self, request: Any) -> Any:
        from lifecycle_msgs.msg import State
        from lifecycle_msgs.srv import GetState

        if self.change.requests and self.goal is not None:
            self.label = self.goal  # the transition took place; only its reply was lost
        return GetState.Response(current_state=State(label=self.label))


def test_a_transition_whose_reply_is_lost_is_settled_by_the_nodes_state() -> None:
    from lifecycle_msgs.msg import Transition

    node = LifecycleNode("unconfigured", goal="inactive")
    took = lifecycle_transition(
        node.change, node.get_state, Transition.TRANSITION_CONFIGURE, None, 5.0, lost_after_s=0.1
    )
    assert took
    assert len(node.change.requests) == 1  # never sent twice


def test_a_transition_that_did_not_take_place_is_not_reported_as_one() -> None:
    from lifecycle_msgs.msg import Transition

    node = LifecycleNode("unconfigured", goal=None)  # the state never moves
    with pytest.raises(AssertionError, match=r"timed out after 1\.5 s waiting for transition 1"):
        lifecycle_transition(
            node.change, node.get_state, Transition.TRANSITION_CONFIGURE, None, 1.5, 0.1
        )
    assert len(node.get_state.requests) >= 1
