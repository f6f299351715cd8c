"""A forward clock jump of any size costs constant memory (issue 16).

Every place that keeps samples on an absolute time grid is fed across a +10 days jump (a
sim-time clock restarted from another epoch, a bag recorded days later) and its peak traced
memory is measured with tracemalloc: deterministic, not timed. Before the fix the echo
canceller's reference and the timeline's sample buffer zero-filled the whole jump (16 kHz float32:
220 MB per hour; +10 days tried to allocate 51.5 GiB and raised MemoryError).

Checked and found bounded without a change (no test of their own): the VAD and the flow's mic
resampler restart on any stamp discontinuity (O(1)), the session schedules from the unit's end
(no buffer), and speaker_node plays a chunk stamped more than ``max_ahead_s`` ahead at once.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from omni_ros.core.aec import AecConfig, EchoCanceller
from omni_ros.core.timeline import Timeline, TimelineConfig
from omni_ros.core.types import AudioBlock, Counters, RawAudio, SpeechOut
from unit.core.scripted_backend import ScriptedBackendDouble
from unit.core.test_flow import Harness, speak

S = 1_000_000_000
T0 = 100 * S
DAYS_10 = 10 * 86_400 * S
RATE = 16_000
BOUND = 32_000_000  # bytes: well above a few seconds of audio, far below one hour (220 MB)


def _peak(fn: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _tone(seconds: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_the_echo_reference_across_a_ten_day_jump_costs_no_memory_and_keeps_both_sides() -> None:
    echo = EchoCanceller(AecConfig(estimate_delay=False))
    try:
        before = _tone(1.0)
        echo.push_reference(T0, before, RATE)
        after = _tone(1.0) * 0.5

        def leap() -> None:
            echo.push_reference(T0 + DAYS_10, after, RATE)
            echo.reference_window(T0 + DAYS_10, RATE)

        assert _peak(leap) < BOUND
        # What was written on both sides of the jump reads back; the jump itself is silence.
        got_after = echo.reference_window(T0 + DAYS_10 + S // 4, RATE // 2)
        assert float(np.abs(got_after).max()) > 0.1
        assert float(np.abs(echo.reference_window(T0 + S // 4, RATE // 2)).max()) > 0.2
        assert not np.any(echo.reference_window(T0 + DAYS_10 // 2, RATE))
        # The mic follows the jump: cancelling there needs no memory either, and the stale run is
        # trimmed away once the mic has moved past it.
        mic = np.zeros(320, np.float32)

        def process() -> None:
            for k in range(100):
                echo.process(AudioBlock(T0 + DAYS_10 + k * 20_000_000, RATE, mic))

        assert _peak(process) < BOUND
        assert len(echo.state.ref_segments) == 1
    finally:
        echo.close()


def test_small_reference_gaps_read_back_exactly_as_one_zero_filled_buffer() -> None:
    # The same writes, with gaps from 0.5 s to beyond the run limit, read identically to a dense
    # buffer: samples where written, zeros in the gaps, later writes winning on overlaps.
    echo = EchoCanceller(AecConfig(estimate_delay=False))
    rng = np.random.default_rng(3)
    dense = np.zeros(60 * RATE, np.float32)
    try:
        writes = [(0.0, 1.0), (1.5, 1.0), (14.0, 2.0), (15.5, 1.0), (8.0, 1.0), (40.0, 0.5)]
        for start_s, dur_s in writes:
            x = rng.uniform(-0.5, 0.5, int(dur_s * RATE)).astype(np.float32)
            echo._write_reference(T0 + round(start_s * S), x)
            i = round(start_s * RATE)
            dense[i : i + len(x)] = x
        got = echo.reference_window(T0, 60 * RATE)
        np.testing.assert_array_equal(got, dense)
        echo.drop_reference_after(T0 + 15 * S)
        dense[15 * RATE :] = 0
        np.testing.assert_array_equal(echo.reference_window(T0, 60 * RATE), dense)
    finally:
        echo.close()


def test_the_timeline_skips_a_ten_day_leap_without_zero_filling_it() -> None:
    counters = Counters()
    tl = Timeline(TimelineConfig(), counters)
    chunk = np.full(320, 0.1, np.float32)
    for k in range(50):
        tl.push_audio(AudioBlock(T0 + k * 20_000_000, RATE, chunk))
    assert len(tl.poll(T0 + 2 * S)) == 1
    units: list[int] = []  # indices returned after the leap

    def leap() -> None:
        # The clock leapt: audio stamped on it is accepted (judged against the clock now).
        tl.observe_clock(T0 + DAYS_10 + S)
        for k in range(100):
            tl.push_audio(AudioBlock(T0 + DAYS_10 + k * 20_000_000, RATE, chunk))
        units.extend(u.index for u in tl.poll(T0 + DAYS_10 + 3 * S))

    assert _peak(leap) < BOUND
    # The units of the leap are skipped as overrun (as the poll alone would skip them), the
    # catch-up ones are delivered in order, every index accounted for.
    assert len(units) >= tl.config.max_catchup_units
    assert units == list(range(units[0], units[0] + len(units)))
    assert units[-1] == counters.units_dropped_overrun + len(units)
    assert counters.units_dropped_overrun > 10 * 86_400 - 100


@pytest.fixture
def backend() -> Iterator[ScriptedBackendDouble]:
    b = ScriptedBackendDouble()
    yield b
    b.close()


def test_the_flow_with_echo_cancelling_and_vad_crosses_a_ten_day_jump_in_constant_memory(
    backend: ScriptedBackendDouble,
) -> None:
    # The robot is speaking (so the echo reference is written) when the clock leaps 10 days.
    backend.script = [speak("hello", level=0.2)] * 100
    h = Harness(backend, aec={"enabled": True}, session={"output_latency_ms": 200})
    h.silence(4.0)
    h.run_to(T0 + 4 * S + 200_000_000)
    units_before = len(backend.units)
    pcm = np.zeros(320, "<i2").tobytes()
    t1 = T0 + 4 * S + DAYS_10

    def leap() -> None:
        for k in range(150):
            stamp = t1 + k * 20_000_000
            h.clock.set_ns(stamp + 20_000_000)
            h.flow.push_audio(RawAudio(stamp, RATE, 1, "S16LE", pcm))
            h.flow.run_until_idle(h.clock.now_ns())

    assert _peak(leap) < BOUND
    assert len(backend.units) > units_before  # units flow again on the new time
    assert h.flow.counters.units_dropped_overrun > 10 * 86_400 - 100


def test_the_speech_kept_for_playback_reports_is_forgotten_when_a_bag_loops(
    backend: ScriptedBackendDouble,
) -> None:
    """``make soak`` found RSS growing by the robot's speech (+115 MB/h direct, +330 MB/h graph)
    once a looping bag first jumped back: the flow keeps its emitted speech for 30 s to match
    playback reports, pruned from the front by stamp, and after the jump the front held the old
    pass's latest stamps, so nothing was ever pruned again."""
    backend.script = [speak("la", level=0.2)] * 1000
    h = Harness(backend, session={"output_latency_ms": 200})
    kept = []
    for _ in range(8):  # a 10 s bag played 8 times
        h.next_sample = 0
        h.clock.set_ns(T0)
        h.flow.run_until_idle(T0)
        h.silence(10.0)
        h.run_to(T0 + 10 * S + 500_000_000)
        kept.append(len(h.flow._speech_log))
    assert h.flow.counters.clock_jumps == 7
    assert len(h.of(SpeechOut)) > 60
    assert max(kept) <= 12, kept  # one pass of speech (10 units), never more
