"""An example behaviour tree: react to the model's proactive alerts by asking it what to do.

::

    [-] omni (sequence, no memory)
        --> ProactiveToBlackboard          omni/proactive -> /omni/proactive_events
        [o] react (selector, no memory)
            [-] handle alert (sequence, memory)
                --> TakeProactiveEvent(kinds=alert, reminder)   condition: an event is pending
                --> Ask                                          omni/ask: "what should I do?"
                --> Remember reply                               /omni/handled (list of replies)
            --> Idle                                             SUCCESS: nothing to do

Run it against a live omni_flow_node: ``python -m omni_ros.bt.example --ros-args -r __ns:=/robot1``.
"""

from __future__ import annotations

from typing import Any

import py_trees
from py_trees.common import Access, Status

from omni_ros import topics
from omni_ros.bt.behaviours import (
    CURRENT_KEY,
    NAMESPACE,
    REPLY_KEY,
    AskBehaviour,
    ProactiveToBlackboard,
    TakeProactiveEvent,
)
from omni_ros.core.types import ProactiveEvent

HANDLED_KEY = "handled"


class RememberReply(py_trees.behaviour.Behaviour):
    """Appends (event, reply) to ``/omni/handled``: what the robot would act on."""

    def __init__(self, name: str = "Remember reply") -> None:
        super().__init__(name)
        self.blackboard = self.attach_blackboard_client(name=name, namespace=NAMESPACE)
        self.blackboard.register_key(key=CURRENT_KEY, access=Access.READ)
        self.blackboard.register_key(key=REPLY_KEY, access=Access.READ)
        self.blackboard.register_key(key=HANDLED_KEY, access=Access.WRITE)
        self.blackboard.set(HANDLED_KEY, [], overwrite=False)

    def update(self) -> Status:
        handled = [
            *self.blackboard.get(HANDLED_KEY),
            (self.blackboard.get(CURRENT_KEY), self.blackboard.get(REPLY_KEY)),
        ]
        self.blackboard.set(HANDLED_KEY, handled)
        return Status.SUCCESS


def question_about(event: ProactiveEvent | None) -> str:
    """The question the example asks about a proactive event."""
    if event is None:
        return "What should the robot do now?"
    return f'You just raised a {event.kind}: "{event.text}". What should the robot do now?'


def create_proactive_tree(
    kinds: tuple[str, ...] = ("alert", "reminder"),
    ask_action: str = topics.ASK,
    proactive_topic: str = topics.PROACTIVE.name,
    ask_timeout_s: float = 0.0,
    server_timeout_s: float = 2.0,
) -> py_trees.trees.BehaviourTree:
    """Build the example tree (call ``tree.setup(node=node)`` before ticking)."""
    reader = py_trees.blackboard.Client(name="question", namespace=NAMESPACE)
    reader.register_key(key=CURRENT_KEY, access=Access.READ)

    def question() -> str:
        current: Any = reader.get(CURRENT_KEY)
        return question_about(current)

    handle = py_trees.composites.Sequence(
        "handle alert",
        memory=True,
        children=[
            TakeProactiveEvent(kinds=kinds),
            AskBehaviour(
                question=question,
                action_name=ask_action,
                timeout_s=ask_timeout_s,
                server_timeout_s=server_timeout_s,
            ),
            RememberReply(),
        ],
    )
    react = py_trees.composites.Selector(
        "react", memory=False, children=[handle, py_trees.behaviours.Success(name="Idle")]
    )
    root = py_trees.composites.Sequence(
        "omni", memory=False, children=[ProactiveToBlackboard(topic=proactive_topic), react]
    )
    return py_trees.trees.BehaviourTree(root)
