"""speaker_node keeps the device fed between turns (``keep_alive``), so a turn after a pause
starts exactly where the silence before it ended, and its Playback report is exact.

A device that ran dry starts again when the next write comes; the player can only report that
start from the clock it read before writing (measured in the conversation benchmark: reports
25-440 us early, a new value every turn). The echo canceller's filter learned the previous
turn's alignment, so each turn's first syllable leaked past it (docs/BENCHMARKS.md, "Turn
onsets"). With keep-alive, only the very first write of a run starts the device.

The sink models a sound card with a 40 ms buffer (like the benchmark's room sink) that starts
25-425 us after the write call reads the clock, a different lag each time: the player's own
report of a fresh start is that much early, as measured.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from omni_ros.core.clock import NS_PER_S

rclpy = pytest.importorskip("rclpy")

from omni_ros.audio_io import AudioFormat  # noqa: E402
from omni_ros.core.errors import ConfigError  # noqa: E402
from pcm_samples import speech_chunk  # noqa: E402

RATE = 24_000
FMT = AudioFormat(RATE, 1, "S16LE")
BUFFER_NS = 40_000_000


def _read_lag_ns(k: int) -> int:
    """How long after the player read the clock the device starts, at its ``k``-th write."""
    return 25_000 + (k * 137_000) % 400_000


class _Device:
    """A blocking sound card: a write that follows on (within 5 ms) plays after what it holds;
    one after the device ran dry plays ``BUFFER_NS`` after the write, :func:`_read_lag_ns` late."""

    def __init__(self) -> None:
        self.format = FMT
        self.heard: list[tuple[int, bytes, bool]] = []  # (heard from, data, silence) per write
        self.starts = 0  # writes that found the device dry
        self.silence_of: Any = None  # the node, once built (its writing_silence flag)
        self._end = 0
        self._closed = threading.Event()

    def write(self, data: bytes) -> None:
        now = time.time_ns() + _read_lag_ns(len(self.heard))
        if self._end and now - self._end <= 5_000_000:
            start = self._end
        else:
            start = now + BUFFER_NS
            self.starts += 1
        self._end = start + FMT.duration_ns(FMT.frames(data))
        silence = bool(self.silence_of is not None and self.silence_of.writing_silence)
        self.heard.append((start, data, silence))
        remaining = self._end - BUFFER_NS - time.time_ns()
        if remaining > 0:
            self._closed.wait(remaining / NS_PER_S)

    def flush(self) -> None:
        pass

    def drain(self) -> None:
        remaining = self._end - time.time_ns()
        if remaining > 0:
            self._closed.wait(remaining / NS_PER_S)

    @property
    def latency_ns(self) -> int:
        return BUFFER_NS

    def close(self) -> None:
        self._closed.set()


def _two_turns(keep_alive: str) -> tuple[_Device, list[tuple[int, int]], list[int]]:
    """Two turns of two 100 ms chunks, 300 ms apart, through a node on the wall clock; returns the
    device, the (stamp, heard) of every Playback report, and each chunk's stamp."""
    from omni_ros.ros.speaker_node import SpeakerNode
    from rclpy.parameter import Parameter

    reports: list[tuple[int, int]] = []

    class _Node(SpeakerNode):
        def _report(self, item: Any, heard_ns: int, samples: int, late: bool, cut: bool) -> None:
            reports.append((item.stamp_ns, heard_ns))
            super()._report(item, heard_ns, samples, late, cut)

    context = rclpy.Context()
    rclpy.init(context=context)
    sink = _Device()
    node = _Node(
        sink=sink,
        context=context,
        parameter_overrides=[Parameter("keep_alive", value=keep_alive)],
    )
    sink.silence_of = node
    try:
        t0 = time.time_ns() + 150_000_000
        stamps = [t0, t0 + NS_PER_S // 10, t0 + 500_000_000, t0 + 600_000_000]
        for k, stamp in enumerate(stamps):
            node._on_speech(speech_chunk(stamp, k * 2400, 2400, FMT, turn_id=1 + k // 2))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and time.time_ns() < t0 + 900_000_000:
            time.sleep(0.02)
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)
    return sink, reports, stamps


def _speech_heard(sink: _Device) -> dict[int, int]:
    """First frame index of each speech write -> when it was heard."""
    return {
        int(np.frombuffer(data[:2], "<i2")[0]): start
        for start, data, silence in sink.heard
        if not silence
    }


def _report_errors(sink: _Device, reports: list[tuple[int, int]], stamps: list[int]) -> list[int]:
    """Heard minus reported: the first turn's second chunk (the first one's report precedes
    its publish; the canceller moves it, omni_ros.core.aec), the second turn's two chunks."""
    heard, reported = _speech_heard(sink), dict(reports)
    return [heard[k * 2400] - reported[stamps[k]] for k in (1, 2, 3)]


def test_with_keep_alive_a_turn_after_a_pause_follows_on_and_is_reported_like_the_first() -> None:
    sink, reports, stamps = _two_turns("on")
    assert sink.starts == 1, "only the first write started the device"
    assert any(silence for _, _, silence in sink.heard), "silence kept it fed"
    # The silence ran up to the second turn's stamp, so it is reported on its stamp, and the
    # device plays it off by exactly what the first turn was (a constant the canceller's filter
    # learns once), not by a new lag.
    assert abs(dict(reports)[stamps[2]] - stamps[2]) <= NS_PER_S // RATE
    first, *second = _report_errors(sink, reports, stamps)
    assert all(abs(e - first) <= 1_000 for e in second), (first, second)


def test_without_keep_alive_each_turn_restarts_the_device_and_its_report_moves() -> None:
    sink, reports, stamps = _two_turns("off")
    assert sink.starts == 2
    assert not any(silence for _, _, silence in sink.heard)
    first, _, second = _report_errors(sink, reports, stamps)
    assert abs(second - first) >= 50_000, (first, second)  # what keep-alive removes


def test_keep_alive_is_validated_and_auto_leaves_a_passed_sink_alone() -> None:
    from omni_ros.ros.speaker_node import SpeakerNode
    from rclpy.parameter import Parameter

    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        with pytest.raises(ConfigError, match="keep_alive"):
            SpeakerNode(
                sink=_Device(),
                context=context,
                parameter_overrides=[Parameter("keep_alive", value="sometimes")],
            )
        node = SpeakerNode(sink=_Device(), context=context)
        try:
            assert node._keep_alive is False  # auto: on for sink=pyaudio only
        finally:
            node.destroy_node()
    finally:
        rclpy.shutdown(context=context)
    from omni_ros.ros.speaker_node import keep_alive_enabled

    assert keep_alive_enabled("auto", "pyaudio", sim_time=False)
    assert not keep_alive_enabled("auto", "pyaudio", sim_time=True)  # a bag's clock, not the card's
    assert not keep_alive_enabled("auto", "wav", sim_time=False)
    assert keep_alive_enabled("on", "", sim_time=True)
    assert not keep_alive_enabled("off", "pyaudio", sim_time=False)


def test_a_cut_chunk_is_reported_as_far_as_it_reached_the_device() -> None:
    # A flush stops the writes; the device still plays what it holds (40 ms here; PyAudio has no
    # abort). The cut report is the echo canceller's reference: it must cover that audio too,
    # or the echo of the device's last 40 ms goes uncancelled (reported only until "now").
    from omni_ros.ros.speaker_node import SpeakerNode

    reports: list[tuple[int, int, bool]] = []

    class _Node(SpeakerNode):
        def _report(self, item: Any, heard_ns: int, samples: int, late: bool, cut: bool) -> None:
            reports.append((heard_ns, samples, cut))
            super()._report(item, heard_ns, samples, late, cut)

    context = rclpy.Context()
    rclpy.init(context=context)
    sink = _Device()
    node = _Node(sink=sink, context=context)
    sink.silence_of = node
    try:
        t0 = time.time_ns() + 100_000_000
        node._on_speech(speech_chunk(t0, 0, RATE // 2, FMT))  # 500 ms
        while time.time_ns() < t0 + 150_000_000:
            time.sleep(0.005)
        node.flush()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(cut for *_, cut in reports):
            time.sleep(0.01)
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)
    cut = [samples for _, samples, c in reports if c]
    assert cut, reports
    written = sum(FMT.frames(data) for _, data, silence in sink.heard if not silence)
    assert written < RATE // 2, "the flush cut the chunk"
    assert abs(cut[0] - written) <= RATE // 1000, (cut[0], written)  # within 1 ms
