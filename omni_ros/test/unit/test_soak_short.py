"""A short ``make soak`` (direct mode): the reference backend through OmniFlow on an accelerated
clock, with speech, silence, frames and a clock jump; every input sample must be accounted for and
nothing may be counted as an error (the full hour: ``make soak``, docs/RELIABILITY.md)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from omni_ros.tools.soak import MIC_RATE, run_direct


def counters_of(result: dict[str, object]) -> dict[str, int]:
    counters = result["counters"]
    assert isinstance(counters, dict)
    return counters


def test_two_minutes_of_robot_time_account_for_every_sample_and_leak_no_thread() -> None:
    params = {"size": "tiny", "num_threads": 1, "speak_schedule": "LLSSSELLLL"}
    result = run_direct(120.0, 45.0, params)  # clock jumps back at 45 s and 90 s
    assert result["problems"] == []
    fed = result["fed"]
    assert fed["audio_samples"] >= 120 * MIC_RATE
    assert fed["clock_jumps"] == 2
    assert counters_of(result)["clock_jumps"] == 2
    counters = counters_of(result)
    accounted = result["samples_in_units_not_gap"] + counters["dropped_audio_samples"]
    assert accounted == fed["audio_samples"]
    # By cause: the drops are the pending units and buffers at the two clock jumps (reset),
    # nothing else; fed = used + dropped + held exactly, with nothing held after the flush.
    acc = result["audio_accounting"]
    assert acc["in"] == fed["audio_samples"]
    assert acc["used"] + acc["dropped"] + acc["held"] == acc["in"]
    assert acc["held"] == 0
    assert acc["dropped"] == acc["dropped_reset"] == counters["dropped_audio_samples"] > 0
    assert result["threads_start_end"][1] <= result["threads_start_end"][0]
