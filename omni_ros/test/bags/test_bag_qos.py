"""Bags written here carry each topic's offered QoS, in metadata every supported ``ros2 bag`` reads.

``ros2 bag play`` republishes each topic with the QoS recorded in the bag; with no profile it falls
back to reliable + volatile, so a latched (transient-local) subscriber of ``omni/state`` would get
nothing. The decoders below reproduce ros2/rosbag2's metadata readers (no ``ros2 bag`` here):

- humble ``rosbag2_storage/src/rosbag2_storage/metadata_io.cpp``, ``convert<TopicMetadata>::decode``:
  ``version >= 4``: ``node["offered_qos_profiles"].as<std::string>()``; the string is parsed by
  ``rosbag2_transport/src/rosbag2_transport/qos.cpp`` (``convert<Rosbag2QoS>::decode``) with
  ``as<int>()`` for history / reliability / durability / liveliness and ``as<uint64_t>()`` for the
  ``sec`` / ``nsec`` of deadline, lifespan and lease.
- jazzy / kilted / rolling ``rosbag2_storage/include/rosbag2_storage/yaml.hpp``: ``version >= 9``:
  a YAML list of profiles; ``version >= 4``: the string as above.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from omni_ros.tools.bagio import BAG_VERSION, OutputBag, offered_qos
from omni_ros.tools.replay import replay
from rosbags.interfaces import QosDurability, QosReliability
from rosbags.rosbag2 import Reader

# rmw_qos_*_policy_e values (rmw/types.h), as Humble's qos.cpp casts them.
RELIABLE, BEST_EFFORT = 1, 2
TRANSIENT_LOCAL, VOLATILE = 1, 2


def _humble_profiles(topic_metadata: dict[str, Any], version: int) -> list[dict[str, int]]:
    """Humble's decoder: the profiles must be a YAML string of integer policies."""
    if version < 4:
        return []
    text = topic_metadata["offered_qos_profiles"]
    assert isinstance(text, str), "humble: as<std::string>() throws on a YAML list (version 9)"
    profiles = yaml.safe_load(text) or []
    for profile in profiles:
        for key in ("history", "reliability", "durability", "liveliness", "depth"):
            assert isinstance(profile[key], int), f"humble: {key} is read with as<int>()"
        for key in ("deadline", "lifespan", "liveliness_lease_duration"):
            assert isinstance(profile[key]["sec"], int)
            assert isinstance(profile[key]["nsec"], int)
        assert isinstance(profile["avoid_ros_namespace_conventions"], bool)
    return list(profiles)


def _jazzy_profiles(topic_metadata: dict[str, Any], version: int) -> list[Any]:
    """Jazzy / Kilted's decoder: a list from version 9, the Humble string before."""
    if version >= 9:
        value = topic_metadata["offered_qos_profiles"]
        assert isinstance(value, list)
        return value
    return _humble_profiles(topic_metadata, version)


def _metadata(bag: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    topics = {
        t["topic_metadata"]["name"]: t["topic_metadata"] for t in info["topics_with_message_count"]
    }
    return int(info["version"]), topics


def test_replay_outputs_carry_the_node_publishers_qos_readable_by_humble_and_jazzy(
    clean_bag: Path, schedule_params: Path, tmp_path: Path
) -> None:
    replay(
        clean_bag, tmp_path, mode="direct", params_file=schedule_params, progress=False, plot=False
    )
    version, topics = _metadata(tmp_path / "outputs")
    assert version == BAG_VERSION == 8
    assert set(topics) >= {"/omni/state", "/omni/speech", "/omni/text", "/diagnostics"}
    for name, meta in topics.items():
        for decode in (_humble_profiles, _jazzy_profiles):
            profiles = decode(meta, version)
            assert len(profiles) == 1, f"{name}: no offered QoS (ros2 bag play falls back)"
            assert profiles[0]["reliability"] == RELIABLE
    (state,) = _humble_profiles(topics["/omni/state"], version)
    assert state["durability"] == TRANSIENT_LOCAL, "a latched subscriber must get the last state"
    assert state["depth"] == 1
    (speech,) = _humble_profiles(topics["/omni/speech"], version)
    assert speech["durability"] == VOLATILE


def test_rosbags_reads_the_offered_qos_back_from_the_mcap_file(tmp_path: Path) -> None:
    bag = OutputBag(tmp_path / "out")
    bag.write_raw("/robot1/omni/state", "std_msgs/msg/Bool", 1, b"\x00\x01\x00\x00\x01")
    bag.write_raw("/robot1/audio/mic", "std_msgs/msg/Bool", 2, b"\x00\x01\x00\x00\x01")
    bag.close()
    with Reader(tmp_path / "out") as reader:
        offered = {c.topic: c.ext.offered_qos_profiles for c in reader.connections}
    (state,) = offered["/robot1/omni/state"]
    assert state.durability == QosDurability.TRANSIENT_LOCAL, "namespaced topics match too"
    (mic,) = offered["/robot1/audio/mic"]
    assert mic.reliability == QosReliability.BEST_EFFORT


def test_synthesised_input_bags_carry_sensor_data_qos_for_the_mic_and_camera(
    clean_bag: Path,
) -> None:
    version, topics = _metadata(clean_bag)
    assert version == 8
    for name in ("/audio/mic", "/camera/image_raw"):
        (profile,) = _humble_profiles(topics[name], version)
        assert profile["reliability"] == BEST_EFFORT, name


def test_an_explicit_offer_wins_over_the_table(tmp_path: Path) -> None:
    bag = OutputBag(tmp_path / "out")
    bag.offer("/omni/state", [offered_qos("/omni/speech")])
    bag.write_raw("/omni/state", "std_msgs/msg/Bool", 1, b"\x00\x01\x00\x00\x01")
    bag.close()
    _version, topics = _metadata(tmp_path / "out")
    (profile,) = _humble_profiles(topics["/omni/state"], 8)
    assert profile["durability"] == VOLATILE


@pytest.mark.parametrize("topic", ["/unknown", "/x/diagnostics"])
def test_unknown_topics_get_a_reliable_volatile_profile(topic: str) -> None:
    profile = offered_qos(topic)
    assert profile.reliability == QosReliability.RELIABLE
    assert profile.durability == QosDurability.VOLATILE


def test_every_output_topic_and_the_speakers_reports_have_their_offered_qos() -> None:
    from omni_ros.ros.qos import profile as node_profile  # what the nodes create (test_node_topics)
    from omni_ros.tools.bagio import OFFERED_QOS
    from omni_ros.tools.replay import OUTPUT_TOPICS

    from omni_ros import topics

    missing = [t for t in OUTPUT_TOPICS if t.lstrip("/") not in OFFERED_QOS]
    assert missing == []
    transient = {t for t, q in OFFERED_QOS.items() if q.durability.name == "TRANSIENT_LOCAL"}
    assert {"omni/state", "omni/user_speaking", "speaker/playing"} <= transient
    for topic, profile in (
        ("omni/speech_flush", node_profile(topics.SPEECH_FLUSH)),
        ("omni/user_speaking", node_profile(topics.USER_SPEAKING)),
        ("speaker/playback", node_profile(topics.PLAYBACK)),
        ("speaker/playing", node_profile(topics.PLAYING)),
    ):
        assert OFFERED_QOS[topic].depth == profile.depth, topic
