"""The topic table (omni_ros.topics) is the one list: what records, replays and bags derive."""

from __future__ import annotations

import ast
from pathlib import Path

from omni_ros.tools.bagio import OFFERED_QOS, offered_qos

from omni_ros import topics


def _outputs() -> set[str]:
    return {"/" + t.name.lstrip("/") for t in topics.TOPICS if t.publisher == "omni_flow_node"}


def test_names_are_unique_and_relative_except_diagnostics() -> None:
    names = [t.name for t in topics.TOPICS]
    assert len(names) == len(set(names))
    assert [n for n in names if n.startswith("/")] == ["/diagnostics"]


def test_omni_ros_record_takes_every_output_of_the_node_by_default() -> None:
    from omni_ros.tools.record import DEFAULT_TOPICS

    # The hand-written list lacked omni/speech_flush and omni/user_speaking.
    assert _outputs() <= set(DEFAULT_TOPICS)
    assert {"/omni/speech_flush", "/omni/user_speaking"} <= set(DEFAULT_TOPICS)
    assert "/audio/mic" in DEFAULT_TOPICS


def test_replay_records_every_output_and_the_speakers_reports() -> None:
    from omni_ros.tools.replay import LATCHED_TOPICS, OUTPUT_TOPICS, SPEAKER_TOPICS

    assert set(OUTPUT_TOPICS) == _outputs()
    assert set(SPEAKER_TOPICS) == {"/speaker/playback", "/speaker/playing"}
    assert set(LATCHED_TOPICS) == {"/omni/state", "/omni/user_speaking", "/speaker/playing"}


def test_bags_offer_what_the_table_says_under_any_namespace() -> None:
    for topic in topics.TOPICS:
        profile = offered_qos("/robot1/" + topic.name.strip("/"))
        assert profile is OFFERED_QOS[topic.name.strip("/")]
        assert profile.depth == topic.depth
        assert (profile.durability.name == "TRANSIENT_LOCAL") == topic.latched
        assert (profile.reliability.name == "RELIABLE") == topic.reliable


#: The nodes' modules: every topic and service they create is named and profiled from the table.
NODE_MODULES = ("omni_flow_node.py", "speaker_node.py", "mic_node.py")
CREATE_CALLS = {
    "create_publisher",
    "create_lifecycle_publisher",
    "create_subscription",
    "create_service",
}


def test_nodes_hand_write_no_topic_name_and_no_qos() -> None:
    """A string literal as the name of a created publisher, subscription or service, or a QoS
    built by hand (``QoSProfile``, rclpy's predefined profiles, a bare depth), fails here; the live
    check of what they create is test/ros/test_node_topics.py."""
    ros = Path(__file__).resolve().parents[2] / "omni_ros" / "ros"
    found = []
    for module in NODE_MODULES:
        tree = ast.parse((ros / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "rclpy.qos":
                found.append(f"{module}:{node.lineno} imports rclpy.qos (use omni_ros.ros.qos)")
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if node.func.attr not in CREATE_CALLS:
                continue
            for arg in node.args[1:]:
                if isinstance(arg, ast.Constant):
                    found.append(f"{module}:{node.lineno} {node.func.attr}(..., {arg.value!r})")
    assert found == []
