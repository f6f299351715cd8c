"""The topic table (omni_ros.topics) is the one list: what records, replays and bags derive."""

from __future__ import annotations

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
