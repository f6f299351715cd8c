"""The node's ROS-free helpers: parameters derived from FlowConfig, and Ask reply matching."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from omni_ros.core.errors import ConfigError
from omni_ros.core.flow import FlowConfig
from omni_ros.core.types import SpeechOut, TextOut
from omni_ros.ros._ask import AskTracker
from omni_ros.ros._params import build_config, config_params, nested_configs


def test_every_flow_config_field_becomes_exactly_one_parameter() -> None:
    names = [spec.name for spec in config_params(FlowConfig)]
    assert len(names) == len(set(names))
    nested = nested_configs(FlowConfig)
    assert set(nested) == {"timeline", "session", "vad", "aec"}
    expected = {f"flow.{f.name}" for f in dataclasses.fields(FlowConfig) if f.name not in nested}
    for namespace, cls in nested.items():
        expected |= {f"{namespace}.{f.name}" for f in dataclasses.fields(cls)}
    assert set(names) == expected


def test_parameter_defaults_rebuild_the_default_config() -> None:
    values = {spec.name: spec.default for spec in config_params(FlowConfig)}
    assert build_config(FlowConfig, values) == FlowConfig()


def test_parameters_land_in_their_nested_config() -> None:
    config = build_config(
        FlowConfig,
        {"timeline.watermark_ns": 500_000_000, "vad.history_s": 12, "flow.max_queued_units": 4},
    )
    assert config.timeline.watermark_ns == 500_000_000
    assert config.vad.history_s == 12.0
    assert config.max_queued_units == 4
    assert config.session == FlowConfig().session


def test_descriptions_come_from_the_attribute_docstrings() -> None:
    specs = {spec.name: spec for spec in config_params(FlowConfig)}
    assert specs["timeline.watermark_ns"].description.startswith("late-arrival slack")
    assert specs["timeline.watermark_ns"].type_name == "int"


@pytest.mark.parametrize(
    "values",
    [
        {"timeline.no_such_key": 1},
        {"flow.max_queued_units": "four"},
        {"flow.overrun_policy": "queue_forever"},
    ],
)
def test_unknown_keys_wrong_types_and_bad_values_are_config_errors(
    values: dict[str, object],
) -> None:
    with pytest.raises(ConfigError):
        build_config(FlowConfig, values)


def _text(turn: int, text: str, end: bool = False) -> TextOut:
    return TextOut(
        stamp_ns=0, turn_id=turn, unit_index=0, text=text, end_of_turn=end, proactive=False
    )


def test_ask_waits_for_the_next_turn_not_the_one_in_progress() -> None:
    tracker = AskTracker()
    tracker.on_text(_text(3, "old turn "))
    waiter = tracker.open()
    tracker.on_text(_text(3, "still old", end=True))
    tracker.on_speech(SpeechOut(0, 4, 0, 24_000, np.zeros(10, np.float32)))
    tracker.on_text(_text(4, "Hello "))
    assert (waiter.text, waiter.done) == ("Hello ", False)
    tracker.on_text(_text(4, "there.", end=True))
    tracker.on_text(_text(5, "next turn"))
    assert (waiter.text, waiter.done, waiter.spoken) == ("Hello there.", True, True)


def test_ask_reply_without_speech_is_not_spoken_and_closed_waiters_stop_listening() -> None:
    tracker = AskTracker()
    waiter = tracker.open()
    other = tracker.open()
    tracker.close(other)
    tracker.on_text(_text(1, "quiet", end=True))
    assert (waiter.text, waiter.spoken, waiter.done) == ("quiet", False, True)
    assert other.text == ""


def test_ask_waiters_are_woken_from_another_thread() -> None:
    tracker = AskTracker()
    waiter = tracker.open()
    feeder = threading.Thread(target=lambda: tracker.on_text(_text(1, "hi", end=True)))
    with tracker.condition:
        feeder.start()
        woke = tracker.condition.wait_for(lambda: waiter.done, timeout=10)
    feeder.join()
    assert woke


def test_ask_wait_streams_partials_and_returns_the_finished_turn() -> None:
    tracker = AskTracker()
    waiter = tracker.open()
    partials: list[str] = []

    def feed() -> None:
        tracker.on_text(_text(1, "Hel"))
        tracker.on_text(_text(1, "lo", end=True))

    feeder = threading.Thread(target=feed)
    feeder.start()
    reply = tracker.wait(waiter, 30.0, lambda: False, partials.append, poll_s=0.001)
    feeder.join()
    assert reply == ("Hello", False, True)
    assert all("Hello".startswith(p) for p in partials)


def test_ask_wait_gives_up_on_timeout_or_stop_with_the_partial_reply() -> None:
    tracker = AskTracker()
    waiter = tracker.open()
    tracker.on_text(_text(1, "partial"))
    assert tracker.wait(waiter, 0.0, lambda: False, lambda _t: None) == ("partial", False, False)
    stopped = tracker.open()
    assert tracker.wait(stopped, 30.0, lambda: True, lambda _t: None) == ("", False, False)
    tracker.on_text(_text(2, "after close", end=True))
    assert stopped.text == ""  # closed waiters are no longer fed
