"""The microphone path's parts (omni_ros.core.mic_stream) on their own, without OmniFlow."""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omni_ros.core.aec import AecConfig, EchoCanceller, RobotSpeakingGate
from omni_ros.core.bargein import BargeInDetector
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.mic_stream import (
    BargeInDecision,
    BargeInState,
    MicStream,
    MicStreamState,
    ReorderState,
    ResamplerState,
    VoiceActivityReport,
    VoiceActivityState,
)
from omni_ros.core.timeline import Timeline
from omni_ros.core.types import AudioBlock, Counters, RawAudio, VoiceActivity
from omni_ros.core.vad import VadConfig, VoiceActivityDetector

T0 = 100 * NS_PER_S
CHUNK_NS = 20_000_000


class TimelineDouble:
    """Records what the mic stream places on the timeline; nothing is from the future."""

    def __init__(self) -> None:
        self.blocks: list[AudioBlock] = []

    def is_future(self, stamp_ns: int, now_ns: int | None = None) -> bool:
        return False

    def push_audio(self, block: AudioBlock, received_ns: int = 0) -> None:
        self.blocks.append(block)


class Log:
    def __init__(self) -> None:
        self.kinds: list[str] = []

    def warning(self, kind: str, message: str) -> None:
        self.kinds.append(kind)


def mic_stream(
    aec: bool = True, rate: int = 16_000, reorder_ms: int = 60
) -> tuple[MicStream, TimelineDouble, Counters]:
    timeline, counters = TimelineDouble(), Counters()
    stream = MicStream(
        cast(Timeline, timeline),
        EchoCanceller(AecConfig()) if aec else None,
        None,
        None,
        mic_rate=rate,
        reorder_ms=reorder_ms,
        max_chunk_ms=5_000,
        counters=counters,
        log=Log(),
        on_heard=lambda now_ns: None,
    )
    return stream, timeline, counters


def chunks(rate: int, count: int, seed: int = 0) -> list[RawAudio]:
    rng = np.random.default_rng(seed)
    n = rate * CHUNK_NS // NS_PER_S
    return [
        RawAudio(
            T0 + i * CHUNK_NS,
            rate,
            1,
            "S16LE",
            (rng.standard_normal(n) * 2000).astype("<i2").tobytes(),
            received_ns=T0 + i * CHUNK_NS,
        )
        for i in range(count)
    ]


def feed(stream: MicStream, raws: list[RawAudio], release_ns: int) -> None:
    for raw in raws:
        stream.push(raw, raw.stamp_ns + CHUNK_NS)
        stream.release(raw.stamp_ns + CHUNK_NS)
    stream.release(release_ns)


def joined(blocks: list[AudioBlock]) -> tuple[int, np.ndarray]:
    return blocks[0].stamp_ns, np.concatenate([b.samples for b in blocks])


@settings(max_examples=15, deadline=None)
@given(swaps=st.sets(st.integers(0, 28), max_size=8))
def test_chunks_swapped_within_the_hold_reach_the_timeline_as_the_in_order_stream(
    swaps: set[int],
) -> None:
    """48 kHz through reorder, resampler and canceller: swapping neighbours changes nothing.

    Each chunk moves by one place at most (20 ms, inside the 60 ms hold): chained swaps such as
    6, 7, 8, 9 would carry chunk 6 four places (80 ms) late, which the hold rightly drops as late.
    """
    raws = chunks(48_000, 30)
    shuffled = list(raws)
    swapped: set[int] = set()
    for i in sorted(swaps):
        if i - 1 in swapped:  # overlaps the previous swap: would move a chunk two places
            continue
        swapped.add(i)
        shuffled[i], shuffled[i + 1] = shuffled[i + 1], shuffled[i]
    in_order, timeline_a, counters_a = mic_stream()
    reordered, timeline_b, counters_b = mic_stream()
    end_ns = T0 + 31 * CHUNK_NS + NS_PER_S
    feed(in_order, raws, end_ns)
    feed(reordered, shuffled, end_ns)
    stamp_a, audio_a = joined(timeline_a.blocks)
    stamp_b, audio_b = joined(timeline_b.blocks)
    assert stamp_a == stamp_b == T0
    np.testing.assert_array_equal(audio_a, audio_b)
    assert counters_a == counters_b
    assert counters_b.dropped_audio_samples == 0
    assert reordered.held_samples() == in_order.held_samples()


def test_a_gap_restarts_the_resampler_and_flushes_its_tail_first() -> None:
    """48 kHz with 40 ms missing: the mic-rate stream (what the canceller and VAD hear) keeps
    every sample, and the stream after the gap is stamped from its own first sample."""
    stream, timeline, counters = mic_stream(aec=False, reorder_ms=0)
    heard: list[AudioBlock] = []
    stream.vad = cast(VoiceActivityDetector, VadRecorder(heard))
    raws = chunks(48_000, 10)
    for raw in raws[:5] + raws[7:]:
        stream.push(raw, raw.stamp_ns + CHUNK_NS)
    resampler = stream.state.resampler
    assert resampler.anchor_ns == raws[7].stamp_ns  # a new stream after the gap
    assert resampler.next_in_ns == raws[-1].stamp_ns + CHUNK_NS
    before = [b for b in heard if b.stamp_ns < raws[7].stamp_ns]
    after = [b for b in heard if b.stamp_ns >= raws[7].stamp_ns]
    assert sum(len(b.samples) for b in before) == 5 * 320  # the tail was flushed, not lost
    assert after[0].stamp_ns == raws[7].stamp_ns
    for a, b in itertools.pairwise(after):  # sample-exact stamps within the stream
        assert b.stamp_ns == a.stamp_ns + round(len(a.samples) * NS_PER_S / 16_000)
    # Without a canceller the timeline gets the decoded blocks (it resamples units itself).
    assert [b.stamp_ns for b in timeline.blocks] == [r.stamp_ns for r in raws[:5] + raws[7:]]
    assert counters.dropped_audio_samples == 0


class VadRecorder:
    """Records the mic-rate blocks the VAD is given."""

    def __init__(self, out: list[AudioBlock]) -> None:
        self.out = out

    def process(self, block: AudioBlock) -> list[Any]:
        self.out.append(block)
        return []


def test_mic_stream_state_reset_is_a_fresh_state() -> None:
    stream, _, _ = mic_stream()
    raws = chunks(48_000, 6)
    feed(stream, [raws[0], raws[2], raws[1], raws[5]], T0 + 3 * CHUNK_NS)
    state = stream.state
    assert state.reorder.held  # raws[5] waits for raws[3] and raws[4]
    assert state.resampler.resampler is not None
    assert state != MicStreamState()
    state.reset()
    assert state == MicStreamState()
    assert state.reorder == ReorderState()
    assert state.resampler == ResamplerState()


def test_a_clock_jump_drops_and_counts_only_the_held_audio_of_the_old_pass() -> None:
    stream, _, counters = mic_stream()
    raws = chunks(16_000, 8)
    for raw in (raws[0], raws[2], raws[6]):  # the stamp of raws[6]: a new pass, arriving early
        stream.push(raw, T0 + CHUNK_NS)
    # Nothing released yet, so even the first block waits out the hold.
    held = [raws[0].stamp_ns, raws[2].stamp_ns, raws[6].stamp_ns]
    assert sorted(item[0] for item in stream.state.reorder.held) == held
    stream.drop_held_after(raws[4].stamp_ns)
    assert sorted(item[0] for item in stream.state.reorder.held) == held[:2]
    assert stream.state.reorder.newest_end_ns == raws[2].stamp_ns + CHUNK_NS
    assert counters.audio_dropped_reset == 320


def test_restarting_the_stream_counts_the_cancellers_unfinished_frame() -> None:
    stream, _, counters = mic_stream(rate=16_000, reorder_ms=0)
    odd = RawAudio(T0, 16_000, 1, "S16LE", np.ones(100, "<i2").tobytes(), received_ns=T0)
    stream.push(odd, T0 + CHUNK_NS)  # 100 samples: less than one canceller frame
    assert stream.aec is not None
    held = len(stream.aec.state.remainder)
    assert held > 0
    assert stream.held_samples() == held
    stream.restart_stream()
    assert counters.audio_dropped_reset == held
    assert stream.held_samples() == 0
    assert stream.state.resampler == ResamplerState()


@dataclass
class DetectorDouble:
    run: tuple[int, int] | None = None

    def active_run(self) -> tuple[int, int] | None:
        return self.run


def decision(run: tuple[int, int] | None) -> tuple[BargeInDecision, DetectorDouble]:
    detector = DetectorDouble(run)
    aec = AecConfig()
    made = BargeInDecision(
        cast(BargeInDetector, detector), RobotSpeakingGate(aec), VadConfig(), aec
    )
    return made, detector


def test_a_barge_in_is_decided_once_per_run_until_its_state_is_reset() -> None:
    need_ns = VadConfig().barge_in_min_speech_ms * 1_000_000
    made, _ = decision((T0 + 500_000_000, need_ns))
    span = (T0, T0 + 2 * NS_PER_S)
    assert made.decide(span) == T0 + 500_000_000
    assert made.decide(span) is None  # the same run is not a second barge-in
    made.state.reset()
    assert made.state == BargeInState()
    assert made.decide(span) == T0 + 500_000_000


def test_user_speech_is_measured_from_the_start_of_ours_and_must_overlap_it() -> None:
    need_ns = VadConfig().barge_in_min_speech_ms * 1_000_000
    # The user started 200 ms before our speech: only the overlap counts.
    made, detector = decision((T0 - 200_000_000, need_ns + 100_000_000))
    assert made.decide((T0, T0 + NS_PER_S)) is None
    detector.run = (T0 - 200_000_000, need_ns + 200_000_000)
    assert made.decide((T0, T0 + NS_PER_S)) == T0
    made.state.reset()
    assert made.decide(None) is None  # nothing of ours is playing
    assert made.decide((T0 - 2 * NS_PER_S, T0 - NS_PER_S)) is None  # ours ended before


@dataclass
class VadDouble:
    runs: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)
    current: tuple[int, int] | None = None

    @property
    def state(self) -> Any:
        return self

    @property
    def in_speech(self) -> bool:
        return self.current is not None

    def active_run(self) -> tuple[int, int] | None:
        return self.current


def test_voice_activity_reports_each_change_once_and_starts_over_after_reset() -> None:
    vad = VadDouble()
    report = VoiceActivityReport(cast(VoiceActivityDetector, vad))
    vad.current = (T0, 300_000_000)
    assert report.changes() == [VoiceActivity(T0, True)]
    assert report.changes() == []
    vad.current = None
    vad.runs.append((T0, T0 + NS_PER_S))
    vad.runs.append((T0 + 2 * NS_PER_S, T0 + 3 * NS_PER_S))  # a whole utterance in one batch
    assert report.changes() == [
        VoiceActivity(T0 + NS_PER_S, False),
        VoiceActivity(T0 + 2 * NS_PER_S, True),
        VoiceActivity(T0 + 3 * NS_PER_S, False),
    ]
    assert report.changes() == []
    report.state.reset()
    assert report.state == VoiceActivityState()
    assert len(report.changes()) == 4


@pytest.mark.parametrize("encoding", ["S16LE", "F32LE"])
def test_an_undecodable_message_is_dropped_whole_and_counted_in_its_frames(encoding: str) -> None:
    stream, timeline, counters = mic_stream()
    width = 2 if encoding == "S16LE" else 4
    stream.push(RawAudio(T0, 16_000, 2, encoding, bytes(width * 2 * 10 + 1)), T0)
    assert counters.decode_errors == 1
    assert counters.audio_dropped_bad_input == 10
    assert not timeline.blocks
