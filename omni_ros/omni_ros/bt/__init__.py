"""Behaviour-tree integration (py_trees): proactive events onto the blackboard, the Ask action as a
behaviour, and an example tree. Needs ``pip install py-trees`` (the ``bt`` extra)."""

from omni_ros.bt.behaviours import (
    AskBehaviour,
    ProactiveToBlackboard,
    TakeProactiveEvent,
    proactive_from_msg,
)
from omni_ros.bt.trees import create_proactive_tree

__all__ = [
    "AskBehaviour",
    "ProactiveToBlackboard",
    "TakeProactiveEvent",
    "create_proactive_tree",
    "proactive_from_msg",
]
