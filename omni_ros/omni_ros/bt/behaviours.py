"""py_trees behaviours that connect a behaviour tree to omni_flow_node.

Like py_trees_ros, every behaviour gets its ROS node in ``setup(node=...)`` (``tree.setup(node=node)``)
and never spins it: the application spins the node in an executor thread and ticks the tree. ROS
callbacks only store; ``update()`` moves what they stored onto the blackboard.

Blackboard keys (namespace ``/omni``):
    ``/omni/proactive_events`` (list[ProactiveEvent]): events not handled yet, oldest first.
    ``/omni/last_proactive`` (ProactiveEvent | None): the newest event received.
    ``/omni/current_proactive`` (ProactiveEvent | None): the event :class:`TakeProactiveEvent` took.
    ``/omni/ask_reply`` (str): the reply of the last successful :class:`AskBehaviour` (its
        ``reply_key`` argument changes the key).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import py_trees
from py_trees.common import Access, Status

from omni_ros import topics
from omni_ros.core.types import ProactiveEvent

NAMESPACE = "/omni"
EVENTS_KEY = "proactive_events"
LAST_KEY = "last_proactive"
CURRENT_KEY = "current_proactive"
REPLY_KEY = "ask_reply"


def _require_node(kwargs: dict[str, Any], owner: str) -> Any:
    node = kwargs.get("node")
    if node is None:
        raise KeyError(f"{owner}.setup() needs the ROS node: call tree.setup(node=node)")
    return node


def proactive_from_msg(msg: Any) -> ProactiveEvent:
    """``omni_ros_msgs/ProactiveAction`` -> :class:`ProactiveEvent` (published at turn end)."""
    from omni_ros.ros.conversions import stamp_to_ns

    return ProactiveEvent(
        stamp_ns=stamp_to_ns(msg.header.stamp),
        turn_id=int(msg.turn_id),
        trigger_stamp_ns=stamp_to_ns(msg.trigger_stamp),
        kind=str(msg.kind),
        text=str(msg.text),
        confidence=float(msg.confidence),
        completed=True,
    )


class ProactiveToBlackboard(py_trees.behaviour.Behaviour):
    """Subscribes ``omni/proactive`` and appends every ProactiveAction to the blackboard.

    Always returns SUCCESS (it never blocks the tree); put it first in the root sequence, like
    py_trees_ros's "topics to blackboard" subtree.

    Args:
        name: behaviour name.
        topic: the ProactiveAction topic (relative names follow the node's namespace).
        max_events: unhandled events kept; older ones are dropped (a tree that never handles
            events must not grow without bound).
    """

    def __init__(
        self,
        name: str = "ProactiveToBlackboard",
        topic: str = topics.PROACTIVE.name,
        max_events: int = 16,
    ) -> None:
        super().__init__(name)
        self.topic = topic
        self.max_events = max_events
        self._inbox: collections.deque[ProactiveEvent] = collections.deque()
        self._lock = threading.Lock()
        self._subscription: Any = None
        self.blackboard = self.attach_blackboard_client(name=name, namespace=NAMESPACE)
        self.blackboard.register_key(key=EVENTS_KEY, access=Access.WRITE)
        self.blackboard.register_key(key=LAST_KEY, access=Access.WRITE)
        self.blackboard.set(EVENTS_KEY, [], overwrite=False)
        self.blackboard.set(LAST_KEY, None, overwrite=False)

    def setup(self, **kwargs: Any) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        from omni_ros_msgs.msg import ProactiveAction

        node = _require_node(kwargs, type(self).__name__)
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self._subscription = node.create_subscription(ProactiveAction, self.topic, self._store, qos)

    def _store(self, msg: Any) -> None:
        event = proactive_from_msg(msg)
        with self._lock:
            self._inbox.append(event)

    def update(self) -> Status:
        with self._lock:
            new = list(self._inbox)
            self._inbox.clear()
        if new:
            events = [*self.blackboard.get(EVENTS_KEY), *new][-self.max_events :]
            self.blackboard.set(EVENTS_KEY, events)
            self.blackboard.set(LAST_KEY, new[-1])
            self.feedback_message = f"{len(new)} new proactive event(s), {len(events)} pending"
        return Status.SUCCESS


class TakeProactiveEvent(py_trees.behaviour.Behaviour):
    """Condition: SUCCESS if an unhandled event (of ``kinds``, if given) is pending; it is moved to
    ``/omni/current_proactive``. FAILURE otherwise."""

    def __init__(
        self, name: str = "TakeProactiveEvent", kinds: Iterable[str] | None = None
    ) -> None:
        super().__init__(name)
        self.kinds = None if kinds is None else frozenset(kinds)
        self.blackboard = self.attach_blackboard_client(name=name, namespace=NAMESPACE)
        self.blackboard.register_key(key=EVENTS_KEY, access=Access.WRITE)
        self.blackboard.register_key(key=CURRENT_KEY, access=Access.WRITE)
        self.blackboard.set(CURRENT_KEY, None, overwrite=False)

    def update(self) -> Status:
        events: list[ProactiveEvent] = list(self.blackboard.get(EVENTS_KEY) or [])
        for index, event in enumerate(events):
            if self.kinds is None or event.kind in self.kinds:
                del events[index]
                self.blackboard.set(EVENTS_KEY, events)
                self.blackboard.set(CURRENT_KEY, event)
                self.feedback_message = f"took {event.kind!r} turn {event.turn_id}"
                return Status.SUCCESS
        return Status.FAILURE


class AskBehaviour(py_trees.behaviour.Behaviour):
    """Sends an ``omni_ros_msgs/Ask`` goal; RUNNING until the result, then SUCCESS or FAILURE.

    SUCCESS writes the reply to ``/omni/<reply_key>``. FAILURE when the server does not appear
    within ``server_timeout_s``, rejects the goal, does not answer it within
    ``goal_response_timeout_s``, or the goal ends other than SUCCEEDED (aborted by the node's
    timeout, canceled). A halted (preempted) behaviour cancels its goal.

    An unanswered goal is canceled by its id. The server may well have accepted it: Fast DDS drops
    a reply when the server has not yet matched the client's reply reader 100 ms after the request
    (ros2/rmw_fastrtps, rmw_fastrtps_shared_cpp/src/rmw_response.cpp, ``rmw_send_response``
    returns ``RMW_RET_TIMEOUT``; the server logs "failed to send response (timeout): client will
    not receive response"), which a client created just before its first goal can meet. Without a
    limit the behaviour would stay RUNNING forever while the model answered a question nobody
    waits for.

    Args:
        name: behaviour name.
        question: the text, or a function returning it when the behaviour starts (e.g. built from
            ``/omni/current_proactive``).
        action_name: the Ask action (relative names follow the node's namespace).
        timeout_s: the goal's ``timeout_s`` (0: the node's default).
        server_timeout_s: how long to wait for the action server to be discovered.
        goal_response_timeout_s: how long to wait for the server to accept or reject the goal.
        reply_key: blackboard key (under ``/omni``) for the reply.
    """

    def __init__(
        self,
        name: str = "Ask",
        question: str | Callable[[], str] = "",
        action_name: str = topics.ASK,
        timeout_s: float = 0.0,
        server_timeout_s: float = 2.0,
        reply_key: str = REPLY_KEY,
        goal_response_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(name)
        self.question = question
        self.action_name = action_name
        self.timeout_s = timeout_s
        self.server_timeout_s = server_timeout_s
        self.goal_response_timeout_s = goal_response_timeout_s
        self.reply_key = reply_key
        self._client: Any = None
        self._cancel_client: Any = None
        self._goal_id: Any = None
        self._sent_at = 0.0
        self._goal_future: Any = None
        self._result_future: Any = None
        self._handle: Any = None
        self._started = 0.0
        self._sent = False
        #: Partial replies of the current goal (from the action's feedback).
        self.partial_text = ""
        self.blackboard = self.attach_blackboard_client(name=name, namespace=NAMESPACE)
        self.blackboard.register_key(key=reply_key, access=Access.WRITE)

    def setup(self, **kwargs: Any) -> None:
        from action_msgs.srv import CancelGoal
        from rclpy.action import ActionClient

        from omni_ros_msgs.action import Ask

        node = _require_node(kwargs, type(self).__name__)
        self._client = ActionClient(node, Ask, self.action_name)
        # The action's own cancel service (the ROS 2 action protocol: <action>/_action/cancel_goal),
        # for a goal whose acceptance never reached us and so has no goal handle.
        self._cancel_client = node.create_client(
            CancelGoal, f"{self.action_name}/_action/cancel_goal"
        )

    def initialise(self) -> None:
        self._goal_future = self._result_future = self._handle = None
        self._started = time.monotonic()
        self._sent = False
        self.partial_text = ""

    def _send(self) -> None:
        import uuid

        from unique_identifier_msgs.msg import UUID

        from omni_ros_msgs.action import Ask

        text = self.question() if callable(self.question) else self.question
        goal = Ask.Goal(text=text, timeout_s=float(self.timeout_s))
        self._goal_id = UUID(uuid=list(uuid.uuid4().bytes))
        self._goal_future = self._client.send_goal_async(
            goal, feedback_callback=self._on_feedback, goal_uuid=self._goal_id
        )
        self._sent = True
        self._sent_at = time.monotonic()
        self.feedback_message = f"asked {text!r}"

    def _give_up_on_goal(self) -> None:
        """Cancel the unanswered goal: by its id now, and through its handle if the acceptance
        still comes."""
        from action_msgs.msg import GoalInfo
        from action_msgs.srv import CancelGoal

        self._goal_future.add_done_callback(_cancel_when_accepted)
        if self._cancel_client.service_is_ready():
            request = CancelGoal.Request(goal_info=GoalInfo(goal_id=self._goal_id))
            self._cancel_client.call_async(request)
        self.feedback_message = (
            f"no answer to the goal within {self.goal_response_timeout_s:g} s "
            "(its reply may have been lost); canceled it"
        )
        self.logger.warning(self.feedback_message)

    def _on_feedback(self, feedback: Any) -> None:
        self.partial_text = str(feedback.feedback.partial_text)

    def update(self) -> Status:
        if self._client is None:
            raise RuntimeError(f"{self.name}: call tree.setup(node=node) before ticking")
        if not self._sent:
            if not self._client.server_is_ready():
                if time.monotonic() - self._started > self.server_timeout_s:
                    self.feedback_message = f"no {self.action_name} action server"
                    return Status.FAILURE
                return Status.RUNNING
            self._send()
        if self._result_future is None:
            if not self._goal_future.done():
                if time.monotonic() - self._sent_at > self.goal_response_timeout_s:
                    self._give_up_on_goal()
                    self._goal_future = None  # settled: terminate() has nothing left to cancel
                    return Status.FAILURE
                return Status.RUNNING
            self._handle = self._goal_future.result()
            if not self._handle.accepted:
                self.feedback_message = "goal rejected"
                return Status.FAILURE
            self._result_future = self._handle.get_result_async()
        if not self._result_future.done():
            return Status.RUNNING
        from action_msgs.msg import GoalStatus

        response = self._result_future.result()
        if response.status != GoalStatus.STATUS_SUCCEEDED:
            self.feedback_message = f"goal ended with status {response.status}"
            return Status.FAILURE
        self.blackboard.set(self.reply_key, str(response.result.reply))
        self.feedback_message = f"reply {response.result.reply!r}"
        return Status.SUCCESS

    def terminate(self, new_status: Status) -> None:
        # Preempted while the goal runs: cancel it so the model stops working on it.
        if new_status != Status.INVALID:
            return
        if self._result_future is not None:
            if not self._result_future.done():
                self._handle.cancel_goal_async()
                self.feedback_message = "canceled"
        elif self._goal_future is not None:
            # Sent but not yet seen accepted by update(): cancel as soon as it is.
            self._goal_future.add_done_callback(_cancel_when_accepted)
            self.feedback_message = "canceled"


def _cancel_when_accepted(future: Any) -> None:
    handle = future.result()
    if handle is not None and handle.accepted:
        handle.cancel_goal_async()
