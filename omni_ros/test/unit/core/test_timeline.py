"""Tests for the Omni-Flow timeline (omni_ros.core.timeline)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import AlignmentError, ConfigError, StateError
from omni_ros.core.timeline import Timeline, TimelineConfig
from omni_ros.core.types import AudioBlock, Counters, RawImage, Unit, VideoFrame

MS = 1_000_000
ORIGIN_NS = 1_700_000_000 * NS_PER_S  # a realistic ROS time, far from 0
WATERMARK_NS = 200 * MS


def stamp_of(offset_samples: int, rate: int, origin_ns: int = ORIGIN_NS) -> int:
    return origin_ns + round(offset_samples * NS_PER_S / rate)


def chunks_of(
    signal: np.ndarray, rate: int, cuts: list[int], origin_ns: int = ORIGIN_NS
) -> list[AudioBlock]:
    edges = [0, *sorted(set(c for c in cuts if 0 < c < len(signal))), len(signal)]
    return [
        AudioBlock(stamp_of(a, rate, origin_ns), rate, signal[a:b].copy())
        for a, b in itertools.pairwise(edges)
    ]


def noise(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def frame(stamp_ns: int, value: int = 0, size: tuple[int, int] = (4, 6)) -> VideoFrame:
    return VideoFrame(stamp_ns, np.full((*size, 3), value, np.uint8))


def all_at_once(
    blocks: list[AudioBlock], now_ns: int, config: TimelineConfig | None = None
) -> tuple[list[Unit], Counters]:
    counters = Counters()
    timeline = Timeline(config or TimelineConfig(), counters)
    for block in blocks:
        timeline.push_audio(block)
    return timeline.poll(now_ns), counters


def assert_same_units(left: list[Unit], right: list[Unit]) -> None:
    assert [(u.index, u.start_ns, u.end_ns, u.gap_samples) for u in left] == [
        (u.index, u.start_ns, u.end_ns, u.gap_samples) for u in right
    ]
    for a, b in zip(left, right, strict=True):
        assert a.audio.dtype == np.float32
        np.testing.assert_array_equal(a.audio, b.audio)


# ------------------------------------------------------------------------------------- config
def test_default_config_matches_minicpmo_units() -> None:
    config = TimelineConfig()
    timeline = Timeline(config, Counters())
    assert timeline.unit_samples(0) == 16_560
    assert timeline.unit_samples(1) == 16_000
    assert config.sample_rate == 16_000


@pytest.mark.parametrize(
    "overrides",
    [
        {"unit_ns": 0},
        {"first_unit_ns": -1},
        {"sample_rate": 0},
        {"sample_rate": 10_000_000},
        {"watermark_ns": -5},
        {"frame_policy": "random"},
        {"resize_policy": "squash"},
        {"resample_quality": "LQ"},
        {"max_frames_per_unit": 0},
        {"audio_snap_ns": 600 * MS},
    ],
)
def test_invalid_config_values_raise_config_error(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        TimelineConfig.from_mapping(overrides)


def test_unknown_config_key_raises_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="watermark"):
        TimelineConfig.from_mapping({"watermark": 5})


# ------------------------------------------------------------------------------ basic cutting
def test_units_have_exact_lengths_and_bounds_and_carry_the_input_samples() -> None:
    rate = 16_000
    signal = noise(3 * rate + 1234)
    units, counters = all_at_once(
        chunks_of(signal, rate, list(range(320, len(signal), 320))), ORIGIN_NS + 10 * NS_PER_S
    )
    assert [len(u.audio) for u in units[:4]] == [16_560, 16_000, 16_000, 16_000]
    assert units[0].start_ns == ORIGIN_NS
    assert units[0].end_ns == ORIGIN_NS + 1_035 * MS
    assert all(a.end_ns == b.start_ns for a, b in itertools.pairwise(units))
    joined = np.concatenate([u.audio for u in units])
    np.testing.assert_array_equal(joined[: len(signal)], signal)
    assert counters.gap_samples_filled == len(joined) - len(signal)


def test_a_unit_closes_only_after_its_end_plus_the_watermark() -> None:
    timeline = Timeline(TimelineConfig(close_when_complete=False), Counters())
    timeline.push_audio(AudioBlock(ORIGIN_NS, 16_000, noise(16_000 * 3)))
    first_end = ORIGIN_NS + 1_035 * MS
    assert timeline.poll(first_end + WATERMARK_NS - 1) == []
    assert [u.index for u in timeline.poll(first_end + WATERMARK_NS)] == [0]
    assert timeline.poll(first_end + NS_PER_S + WATERMARK_NS - 1) == []
    assert [u.index for u in timeline.poll(first_end + NS_PER_S + WATERMARK_NS)] == [1]


def test_a_unit_whose_audio_is_complete_closes_at_its_end_without_the_watermark() -> None:
    timeline = Timeline(TimelineConfig(), Counters())
    timeline.push_audio(AudioBlock(ORIGIN_NS, 16_000, noise(16_000 * 3)))
    first_end = ORIGIN_NS + 1_035 * MS
    assert timeline.poll(first_end - 1) == []
    assert [u.index for u in timeline.poll(first_end)] == [0]
    assert [u.index for u in timeline.poll(first_end + NS_PER_S)] == [1]


def test_with_a_camera_a_complete_unit_closes_once_a_frame_past_its_end_arrived() -> None:
    timeline = Timeline(TimelineConfig(), Counters())
    timeline.push_audio(AudioBlock(ORIGIN_NS, 16_000, noise(16_000 * 3)))
    timeline.push_frame(VideoFrame(ORIGIN_NS + 1_000 * MS, np.zeros((4, 4, 3), np.uint8)))
    first_end = ORIGIN_NS + 1_035 * MS
    assert timeline.poll(first_end + 10 * MS) == []  # the camera may still deliver for unit 0
    timeline.push_frame(VideoFrame(ORIGIN_NS + 1_033 * MS, np.zeros((4, 4, 3), np.uint8)))
    timeline.push_frame(VideoFrame(ORIGIN_NS + 1_066 * MS, np.zeros((4, 4, 3), np.uint8)))
    (unit0,) = timeline.poll(first_end + 20 * MS)
    assert [f.stamp_ns for f in unit0.frames] == [ORIGIN_NS + 1_033 * MS]


def test_a_unit_with_missing_audio_still_waits_for_the_watermark() -> None:
    timeline = Timeline(TimelineConfig(), Counters())
    audio = noise(16_000 * 3)
    timeline.push_audio(AudioBlock(ORIGIN_NS, 16_000, audio[:8_000]))
    timeline.push_audio(AudioBlock(ORIGIN_NS + 600 * MS, 16_000, audio[9_600:]))  # a 100 ms hole
    first_end = ORIGIN_NS + 1_035 * MS
    assert timeline.poll(first_end + WATERMARK_NS - 1) == []
    # The missing piece arrives within the watermark: placed where it belongs.
    timeline.push_audio(AudioBlock(ORIGIN_NS + 500 * MS, 16_000, audio[8_000:9_600]))
    (unit0,) = timeline.poll(first_end + WATERMARK_NS - 1)
    np.testing.assert_array_equal(unit0.audio, audio[:16_560])


def test_explicit_start_fixes_the_origin_and_silence_yields_gap_filled_units() -> None:
    counters = Counters()
    timeline = Timeline(TimelineConfig(), counters)
    timeline.start(ORIGIN_NS)
    units = timeline.poll(ORIGIN_NS + 3_235 * MS)
    assert [u.index for u in units] == [0, 1, 2]
    assert all(not u.audio.any() for u in units)
    assert [u.gap_samples for u in units] == [16_560, 16_000, 16_000]
    assert counters.gap_samples_filled == 48_560


def test_starting_twice_raises_state_error() -> None:
    timeline = Timeline(TimelineConfig(), Counters())
    timeline.start(ORIGIN_NS)
    with pytest.raises(StateError):
        timeline.start(ORIGIN_NS + 1)


def test_unit_bounds_before_the_origin_is_known_raise_state_error() -> None:
    with pytest.raises(StateError):
        Timeline(TimelineConfig(), Counters()).unit_bounds_ns(0)


def test_origin_is_the_earliest_stamp_even_if_it_arrived_second() -> None:
    rate = 16_000
    blocks = chunks_of(noise(rate), rate, [320])
    timeline = Timeline(TimelineConfig(), Counters())
    timeline.push_audio(blocks[1])
    timeline.poll(blocks[1].stamp_ns + 10 * MS)  # within the watermark: origin not fixed yet
    timeline.push_audio(blocks[0])
    timeline.poll(ORIGIN_NS + WATERMARK_NS)
    assert timeline.origin_ns == ORIGIN_NS


# ------------------------------------------------------------------------- property tests
Stream = tuple[int, np.ndarray, list[AudioBlock], list[VideoFrame], list[int]]


@st.composite
def chunked_stream(draw: st.DrawFn) -> Stream:
    """Audio cut at random points plus frames at random stamps, each with an arrival delay."""
    rate = draw(st.sampled_from([16_000, 44_100, 48_000, 8_000]))
    seconds = draw(st.floats(min_value=0.3, max_value=3.2))
    signal = noise(int(rate * seconds), seed=draw(st.integers(0, 1000)))
    cuts = draw(st.lists(st.integers(1, len(signal) - 1), max_size=60))
    blocks = chunks_of(signal, rate, cuts)
    frame_offsets = draw(st.lists(st.integers(0, 4 * NS_PER_S), max_size=12, unique=True))
    frames = [frame(ORIGIN_NS + offset, value=k % 256) for k, offset in enumerate(frame_offsets)]
    # Each input arrives some time within the watermark after its (first sample's) stamp.
    n = len(blocks) + len(frames)
    delays = draw(st.lists(st.integers(0, WATERMARK_NS - 1), min_size=n, max_size=n))
    return rate, signal, blocks, frames, delays


def replay(
    blocks: list[AudioBlock], frames: list[VideoFrame], delays: list[int], final_ns: int
) -> list[Unit]:
    """Deliver inputs in arrival order, polling before each delivery and every 50 ms.

    Units close by the watermark: that is the contract for ANY arrival order within it. (Closing
    early once a unit is complete keeps the audio exact too, but a frame that arrives out of order
    after that is late; see the tests of ``close_when_complete``.)
    """
    timeline = Timeline(TimelineConfig(close_when_complete=False), Counters())
    inputs: list[AudioBlock | VideoFrame] = [*blocks, *frames]
    arrivals = [
        (item.stamp_ns + d, i) for i, (item, d) in enumerate(zip(inputs, delays, strict=True))
    ]
    ticks = [(t, -1) for t in range(ORIGIN_NS, final_ns, 50 * MS)]
    units: list[Unit] = []
    for when, i in sorted(arrivals + ticks):
        units += timeline.poll(when)
        item = inputs[i] if i >= 0 else None
        if isinstance(item, AudioBlock):
            timeline.push_audio(item)
        elif isinstance(item, VideoFrame):
            timeline.push_frame(item)
    units += timeline.poll(final_ns)
    return units


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunked_stream())
def test_any_chunking_and_arrival_order_within_the_watermark_yields_identical_units(
    stream: Stream,
) -> None:
    rate, signal, blocks, frames, delays = stream
    final_ns = ORIGIN_NS + 6 * NS_PER_S
    counters = Counters()
    reference = Timeline(TimelineConfig(), counters)
    reference.push_audio(AudioBlock(ORIGIN_NS, rate, signal))
    for item in frames:
        reference.push_frame(item)
    whole = reference.poll(final_ns)
    assert len(whole) >= 4
    replayed = replay(blocks, frames, delays, final_ns)
    assert_same_units(replayed, whole)
    assert [[f.stamp_ns for f in u.frames] for u in replayed] == [
        [f.stamp_ns for f in u.frames] for u in whole
    ]
    # Every frame inside the span was seen: each unit holding frames shows its latest one.
    for unit in whole:
        inside = [f.stamp_ns for f in frames if unit.start_ns <= f.stamp_ns < unit.end_ns]
        assert [f.stamp_ns for f in unit.frames] == ([max(inside)] if inside else [])


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3 * 16_000),
    st.lists(st.integers(1, 3 * 16_000), max_size=40),
    st.sets(st.integers(0, 40), max_size=8),
)
def test_no_sample_is_lost_or_duplicated_and_missing_chunks_become_counted_gaps(
    length: int, cuts: list[int], missing: set[int]
) -> None:
    rate = 16_000
    signal = noise(length, seed=length)
    blocks = chunks_of(signal, rate, cuts)
    kept = [b for i, b in enumerate(blocks) if i not in missing or i == 0]
    units, counters = all_at_once(kept, ORIGIN_NS + 5 * NS_PER_S)
    joined = np.concatenate([u.audio for u in units])
    expected = np.zeros(len(joined), np.float32)
    received = 0
    for block in kept:
        start = round((block.stamp_ns - ORIGIN_NS) * rate / NS_PER_S)
        expected[start : start + len(block.samples)] = block.samples
        received += len(block.samples)
    np.testing.assert_array_equal(joined, expected)
    assert sum(u.gap_samples for u in units) == len(joined) - received
    assert counters.gap_samples_filled == len(joined) - received
    assert counters.duplicate_samples == 0
    assert counters.dropped_audio_samples == 0


def test_resampled_units_match_resampling_the_whole_stream() -> None:
    rate = 44_100
    seconds = 4
    t = np.arange(rate * seconds) / rate
    signal = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    units, _ = all_at_once(
        chunks_of(signal, rate, list(range(882, len(signal), 882))), ORIGIN_NS + 6 * NS_PER_S
    )
    joined = np.concatenate([u.audio for u in units])[: 16_000 * seconds]
    reference = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(joined)) / 16_000)
    # Away from the stream's own start and end the resampled sine is exact to float precision.
    np.testing.assert_allclose(joined[200:-200], reference[200:-200], atol=1e-5)
    assert all(u.gap_samples == 0 for u in units[:3])


# --------------------------------------------------------------------------- bad input
def test_late_audio_for_a_closed_unit_is_dropped_and_counted() -> None:
    counters = Counters()
    timeline = Timeline(TimelineConfig(), counters)
    timeline.start(ORIGIN_NS)
    assert len(timeline.poll(ORIGIN_NS + 1_035 * MS + WATERMARK_NS)) == 1
    timeline.push_audio(AudioBlock(ORIGIN_NS + 500 * MS, 16_000, noise(320)))
    assert counters.late_messages == 1
    assert counters.dropped_audio_samples == 320


def test_a_chunk_straddling_a_closed_unit_keeps_its_open_part() -> None:
    counters = Counters()
    timeline = Timeline(TimelineConfig(), counters)
    timeline.start(ORIGIN_NS)
    timeline.poll(ORIGIN_NS + 1_035 * MS + WATERMARK_NS)
    samples = noise(800)
    # 100 samples before the end of unit 0, 700 after.
    timeline.push_audio(
        AudioBlock(ORIGIN_NS + 1_035 * MS - round(100 * NS_PER_S / 16_000), 16_000, samples)
    )
    assert counters.late_messages == 1
    assert counters.dropped_audio_samples == 100
    (unit,) = timeline.poll(ORIGIN_NS + 2_035 * MS + WATERMARK_NS)
    np.testing.assert_array_equal(unit.audio[:700], samples[100:])
    assert unit.gap_samples == 16_000 - 700


def test_overlapping_audio_keeps_the_first_writer_and_counts_the_overlap() -> None:
    rate = 16_000
    first = np.full(1_000, 0.25, np.float32)
    second = np.full(1_000, -0.5, np.float32)
    blocks = [
        AudioBlock(ORIGIN_NS, rate, first),
        AudioBlock(stamp_of(600, rate), rate, second),  # overlaps the last 400 samples
    ]
    units, counters = all_at_once(blocks, ORIGIN_NS + 3 * NS_PER_S)
    audio = units[0].audio
    np.testing.assert_array_equal(audio[:1_000], first)
    np.testing.assert_array_equal(audio[1_000:1_600], second[400:])
    assert counters.duplicate_samples == 400
    assert units[0].gap_samples == 16_560 - 1_600


def test_an_exact_duplicate_chunk_is_counted_and_changes_nothing() -> None:
    rate = 16_000
    signal = noise(3_200)
    blocks = chunks_of(signal, rate, [1_600])
    clean, _ = all_at_once(blocks, ORIGIN_NS + 3 * NS_PER_S)
    duplicated, counters = all_at_once([*blocks, blocks[1]], ORIGIN_NS + 3 * NS_PER_S)
    assert_same_units(duplicated, clean)
    assert counters.duplicate_samples == 1_600


def test_audio_stamped_too_far_in_the_future_is_dropped_and_counted() -> None:
    counters = Counters()
    timeline = Timeline(TimelineConfig(max_future_ns=2 * NS_PER_S), counters)
    timeline.start(ORIGIN_NS)
    timeline.poll(ORIGIN_NS + 100 * MS)
    timeline.push_audio(AudioBlock(ORIGIN_NS + 100 * MS + 3 * NS_PER_S, 16_000, noise(320)))
    timeline.push_frame(frame(ORIGIN_NS + 100 * MS + 3 * NS_PER_S))
    assert counters.future_messages == 2
    assert counters.dropped_audio_samples == 320
    assert counters.dropped_frames == 1


def test_a_bogus_future_stamp_before_the_first_poll_is_dropped_when_the_origin_is_fixed() -> None:
    counters = Counters()
    timeline = Timeline(TimelineConfig(max_future_ns=2 * NS_PER_S), counters)
    timeline.push_audio(AudioBlock(ORIGIN_NS, 16_000, noise(320)))
    timeline.push_audio(
        AudioBlock(ORIGIN_NS + 3_600 * NS_PER_S, 16_000, noise(320))
    )  # an hour ahead
    timeline.poll(ORIGIN_NS + WATERMARK_NS)
    assert timeline.origin_ns == ORIGIN_NS
    assert counters.future_messages == 1
    assert counters.dropped_audio_samples == 320


def test_nonfinite_samples_pushed_directly_are_zeroed_and_counted() -> None:
    samples = noise(1_000)
    samples[[3, 10, 500]] = [np.nan, np.inf, -np.inf]
    units, counters = all_at_once(
        [AudioBlock(ORIGIN_NS, 16_000, samples)], ORIGIN_NS + 2 * NS_PER_S
    )
    assert counters.nonfinite_samples == 3
    assert np.isfinite(units[0].audio).all()
    assert units[0].audio[10] == 0.0


def test_a_non_positive_sample_rate_raises_alignment_error() -> None:
    timeline = Timeline(TimelineConfig(), Counters())
    with pytest.raises(AlignmentError):
        timeline.push_audio(AudioBlock(ORIGIN_NS, 0, noise(10)))


def test_a_backward_clock_jump_resets_the_timeline_and_is_reported() -> None:
    counters = Counters()
    timeline = Timeline(TimelineConfig(), counters)
    rate = 16_000
    for block in chunks_of(noise(rate * 3), rate, list(range(320, rate * 3, 320))):
        timeline.push_audio(block)
    assert len(timeline.poll(ORIGIN_NS + 2_235 * MS)) == 2
    assert not timeline.last_poll_jumped
    # The bag loops: the first chunk of the new pass arrives, then the clock is back at the start.
    loop_origin = ORIGIN_NS - 10 * NS_PER_S
    timeline.push_audio(AudioBlock(loop_origin, rate, noise(rate * 2, seed=7)))
    assert timeline.poll(loop_origin + 50 * MS) == []
    assert timeline.last_poll_jumped
    assert counters.clock_jumps == 1
    assert counters.late_messages == 0  # the new pass's chunk was kept, not called late
    assert counters.dropped_audio_samples == rate * 3 - 16_560 - 16_000  # the old pass's rest
    units = timeline.poll(loop_origin + 1_035 * MS + WATERMARK_NS)
    assert not timeline.last_poll_jumped
    assert timeline.origin_ns == loop_origin
    assert [u.index for u in units] == [0]
    np.testing.assert_array_equal(units[0].audio, noise(rate * 2, seed=7)[:16_560])


def test_a_small_backward_clock_step_is_not_a_jump() -> None:
    counters = Counters()
    timeline = Timeline(TimelineConfig(), counters)
    timeline.start(ORIGIN_NS)
    timeline.poll(ORIGIN_NS + 500 * MS)
    timeline.poll(ORIGIN_NS + 400 * MS)
    assert not timeline.last_poll_jumped
    assert counters.clock_jumps == 0


def test_a_very_old_chunk_without_a_clock_jump_is_counted_late_on_the_next_poll() -> None:
    counters = Counters()
    timeline = Timeline(TimelineConfig(), counters)
    timeline.start(ORIGIN_NS)
    timeline.poll(ORIGIN_NS + 5 * NS_PER_S)
    timeline.push_audio(AudioBlock(ORIGIN_NS, 16_000, noise(320)))
    timeline.poll(ORIGIN_NS + 5 * NS_PER_S + 10 * MS)
    assert counters.late_messages == 1
    assert counters.dropped_audio_samples == 320
    assert counters.clock_jumps == 0


def test_the_clock_leaping_far_ahead_skips_old_units_and_counts_them() -> None:
    counters = Counters()
    timeline = Timeline(TimelineConfig(max_catchup_units=3), counters)
    timeline.start(ORIGIN_NS)
    units = timeline.poll(ORIGIN_NS + 60 * NS_PER_S)
    assert len(units) == 3
    assert units[-1].end_ns + WATERMARK_NS <= ORIGIN_NS + 60 * NS_PER_S
    assert counters.units_dropped_overrun == timeline.next_unit_index - 3


def test_a_change_of_source_rate_mid_stream_keeps_both_parts() -> None:
    first = noise(16_000, seed=1)  # 1 s at 16 kHz
    second_rate = 48_000
    second = np.full(second_rate, 0.3, np.float32)  # the next second at 48 kHz (a DC level)
    blocks = [
        AudioBlock(ORIGIN_NS, 16_000, first),
        AudioBlock(ORIGIN_NS + NS_PER_S, second_rate, second),
    ]
    units, counters = all_at_once(blocks, ORIGIN_NS + 4 * NS_PER_S)
    joined = np.concatenate([u.audio for u in units])
    np.testing.assert_array_equal(joined[:16_000], first)
    np.testing.assert_allclose(joined[16_200:31_800], 0.3, atol=1e-3)
    assert counters.duplicate_samples == 0
    assert sum(u.gap_samples for u in units) == len(joined) - 32_000


def test_stamp_jitter_is_snapped_away_when_enabled() -> None:
    rate = 16_000
    signal = noise(rate * 2)
    jitter = [0, 3, -4, 9, -9, 2] * 20
    blocks = [
        AudioBlock(
            stamp_of(i * 320, rate) + jitter[k % len(jitter)] * 50_000,
            rate,
            signal[i * 320 : i * 320 + 320],
        )
        for k, i in enumerate(range(len(signal) // 320))
    ]
    units, counters = all_at_once(
        blocks, ORIGIN_NS + 4 * NS_PER_S, TimelineConfig(audio_snap_ns=MS)
    )
    joined = np.concatenate([u.audio for u in units])
    np.testing.assert_array_equal(joined[: len(signal)], signal)
    assert counters.duplicate_samples == 0
    _, unsnapped = all_at_once(blocks, ORIGIN_NS + 4 * NS_PER_S)
    assert unsnapped.duplicate_samples > 0


# ------------------------------------------------------------------------------- frames
def frames_timeline(**overrides: object) -> tuple[Timeline, Counters]:
    counters = Counters()
    config = dataclasses.replace(TimelineConfig(), **overrides)  # type: ignore[arg-type]
    timeline = Timeline(config, counters)
    timeline.start(ORIGIN_NS)
    return timeline, counters


def test_last_policy_picks_the_latest_frame_stamped_inside_the_unit() -> None:
    timeline, _ = frames_timeline(frame_policy="last")
    for k, offset_ms in enumerate([100, 500, 1_000, 1_034, 1_036]):
        timeline.push_frame(frame(ORIGIN_NS + offset_ms * MS, value=k))
    unit0, unit1 = timeline.poll(ORIGIN_NS + 2_035 * MS + WATERMARK_NS)
    assert [f.stamp_ns for f in unit0.frames] == [ORIGIN_NS + 1_034 * MS]
    assert [f.stamp_ns for f in unit1.frames] == [ORIGIN_NS + 1_036 * MS]


def test_nearest_end_policy_may_pick_a_frame_just_after_the_unit_end() -> None:
    timeline, _ = frames_timeline(frame_policy="nearest_end")
    timeline.push_frame(frame(ORIGIN_NS + 900 * MS))
    timeline.push_frame(frame(ORIGIN_NS + 1_040 * MS))
    (unit0,) = timeline.poll(ORIGIN_NS + 1_035 * MS + WATERMARK_NS)
    assert [f.stamp_ns for f in unit0.frames] == [ORIGIN_NS + 1_040 * MS]


def test_up_to_n_policy_spreads_n_frames_over_the_unit_oldest_first() -> None:
    timeline, _ = frames_timeline(
        frame_policy="up_to_n", max_frames_per_unit=3, first_unit_ns=NS_PER_S
    )
    for k in range(30):  # 30 fps
        timeline.push_frame(frame(ORIGIN_NS + k * NS_PER_S // 30, value=k))
    (unit,) = timeline.poll(ORIGIN_NS + NS_PER_S + WATERMARK_NS)
    values = [int(f.rgb[0, 0, 0]) for f in unit.frames]
    assert values == [5, 15, 25]


def test_late_and_duplicate_frames_are_dropped_and_counted() -> None:
    timeline, counters = frames_timeline()
    timeline.push_frame(frame(ORIGIN_NS + 1_100 * MS, value=1))
    timeline.push_frame(frame(ORIGIN_NS + 1_100 * MS, value=2))
    assert counters.dropped_frames == 1
    timeline.poll(ORIGIN_NS + 1_035 * MS + WATERMARK_NS)
    timeline.push_frame(frame(ORIGIN_NS + 100 * MS))
    assert counters.late_messages == 1
    assert counters.dropped_frames == 2
    (unit1,) = timeline.poll(ORIGIN_NS + 2_035 * MS + WATERMARK_NS)
    assert int(unit1.frames[0].rgb[0, 0, 0]) == 1


def test_raw_frames_are_decoded_lazily_and_resized_only_when_chosen() -> None:
    timeline, counters = frames_timeline(frame_size=8, resize_policy="stretch")
    good = RawImage(ORIGIN_NS + 100 * MS, "rgb8", bytes(range(48)) * 2, width=8, height=4, step=24)
    broken = RawImage(ORIGIN_NS + 200 * MS, "rgb8", b"\x00" * 10, width=8, height=4, step=24)
    timeline.push_frame(good)
    timeline.push_frame(broken)
    (unit,) = timeline.poll(ORIGIN_NS + 1_035 * MS + WATERMARK_NS)
    # The latest frame is corrupt: counted (OmniState reports it as dropped), and the policy
    # falls back to the previous one.
    assert counters.decode_errors == 1
    assert counters.dropped_frames == 1
    assert [f.stamp_ns for f in unit.frames] == [good.stamp_ns]
    assert unit.frames[0].rgb.shape == (8, 8, 3)


def test_reset_counts_buffered_input_as_dropped_and_forgets_the_origin() -> None:
    timeline, counters = frames_timeline()
    timeline.push_audio(AudioBlock(ORIGIN_NS, 16_000, noise(1_000)))
    timeline.push_frame(frame(ORIGIN_NS + 10 * MS))
    timeline.reset()
    assert timeline.origin_ns is None
    assert counters.dropped_audio_samples == 1_000
    assert counters.dropped_frames == 1
    assert timeline.poll(ORIGIN_NS + 5 * NS_PER_S) == []
