"""The nodes create exactly the topics and services of the topic table (``omni_ros/topics.py``), with
its QoS (:func:`omni_ros.ros.qos.profile`): a node that hand-wrote a name the table lacks, or a
depth, reliability or durability other than the table's, fails here (the bags, ``omni-ros
record``/``replay`` and the live view all derive from that table)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("rclpy")

import rclpy
from omni_ros.audio_io import AudioFormat, NullSink
from omni_ros.ros.qos import profile
from rclpy.lifecycle import TransitionCallbackReturn

from omni_ros import topics

#: Entities rclpy creates for every (lifecycle) node, not the node's own.
BUILT_IN_TOPICS = {"/rosout", "/parameter_events"}
BUILT_IN_SERVICE_SUFFIXES = (
    "/describe_parameters",
    "/get_parameter_types",
    "/get_parameters",
    "/get_type_description",
    "/list_parameters",
    "/set_parameters",
    "/set_parameters_atomically",
    "/change_state",
    "/get_state",
    "/get_available_states",
    "/get_available_transitions",
    "/get_transition_graph",
)


@pytest.fixture
def context() -> Iterator[Any]:
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.try_shutdown(context=ctx)


def _qos(qos: Any) -> tuple[int, str, str]:
    return qos.depth, qos.reliability.name, qos.durability.name


def _table_entry(name: str, node_name: str) -> topics.Topic:
    topic = next((t for t in topics.TOPICS if "/" + t.name.lstrip("/") == name), None)
    assert topic is not None, f"{node_name} uses {name}, which omni_ros/topics.py does not list"
    return topic


def _check_node(node: Any, publishes: set[str], subscribes: set[str], services: set[str]) -> None:
    name = node.get_name()
    published: set[str] = set()
    for pub in node.publishers:
        if pub.topic_name in BUILT_IN_TOPICS or pub.topic_name.endswith("/transition_event"):
            continue
        topic = _table_entry(pub.topic_name, name)
        assert topic.publisher == name, f"{name} publishes {pub.topic_name}; the table says {topic}"
        assert _qos(pub.qos_profile) == _qos(profile(topic)), pub.topic_name
        published.add(topic.name)
    subscribed: set[str] = set()
    for sub in node.subscriptions:
        if sub.topic_name in BUILT_IN_TOPICS:
            continue
        topic = _table_entry(sub.topic_name, name)
        assert _qos(sub.qos_profile) == _qos(profile(topic, subscriber=True)), sub.topic_name
        subscribed.add(topic.name)
    own_services = {
        s.srv_name.lstrip("/")
        for s in node.services
        if not s.srv_name.endswith(BUILT_IN_SERVICE_SUFFIXES)
    }
    assert own_services <= set(topics.SERVICES), f"{name}: {own_services - set(topics.SERVICES)}"
    assert (published, subscribed, own_services) == (publishes, subscribes, services)


def test_omni_flow_node_creates_the_tables_topics_with_the_tables_qos(context: Any) -> None:
    from omni_ros.ros.omni_flow_node import OmniFlowNode

    node = OmniFlowNode(context=context)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        outputs = {t.name for t in topics.TOPICS if t.publisher == "omni_flow_node"}
        inputs = {topics.CAMERA.name, topics.MIC.name, topics.ROBOT_SPEAKING.name}
        _check_node(
            node,
            publishes=outputs,
            subscribes=inputs | {topics.PLAYBACK.name},
            services={topics.INTERRUPT, topics.RESET},
        )
        # omni/set_prompt is served by the omni/ask companion (its own executor).
        companion = node._ask_host.node
        served = {s.srv_name.lstrip("/") for s in companion.services}
        assert topics.SET_PROMPT in served
    finally:
        node.trigger_cleanup()
        node.destroy_node()


def test_the_compressed_camera_input_is_the_tables_too(context: Any) -> None:
    from omni_ros.ros.omni_flow_node import OmniFlowNode
    from rclpy.parameter import Parameter

    node = OmniFlowNode(
        context=context, parameter_overrides=[Parameter("camera.compressed", value=True)]
    )
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        names = {s.topic_name for s in node.subscriptions}
        assert "/" + topics.CAMERA_COMPRESSED.name in names
        assert "/" + topics.CAMERA.name not in names
        camera = next(s for s in node.subscriptions if s.topic_name.endswith("compressed"))
        assert _qos(camera.qos_profile) == _qos(profile(topics.CAMERA_COMPRESSED, subscriber=True))
    finally:
        node.trigger_cleanup()
        node.destroy_node()


def test_speaker_node_creates_the_tables_topics_with_the_tables_qos(context: Any) -> None:
    from omni_ros.ros.speaker_node import SpeakerNode

    node = SpeakerNode(sink=NullSink(AudioFormat(24_000)), context=context)
    try:
        _check_node(
            node,
            publishes={topics.PLAYING.name, topics.PLAYBACK.name},
            subscribes={topics.SPEECH.name, topics.SPEECH_FLUSH.name},
            services={topics.SPEAKER_FLUSH},
        )
    finally:
        node.destroy_node()


def test_a_drivers_latched_topic_is_subscribed_volatile_so_any_driver_matches() -> None:
    # A transient-local subscription would refuse a driver that publishes robot_speaking volatile.
    assert topics.ROBOT_SPEAKING.latched
    assert profile(topics.ROBOT_SPEAKING, subscriber=True).durability.name == "VOLATILE"
    assert profile(topics.ROBOT_SPEAKING).durability.name == "TRANSIENT_LOCAL"
    assert profile(topics.STATE, subscriber=True).durability.name == "TRANSIENT_LOCAL"
