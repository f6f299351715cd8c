"""Tests for audio decoding, encoding, resampling and output chunking (omni_ros.core.audio)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omni_ros.core.audio import (
    OutputChunker,
    StreamResampler,
    chunk_output,
    decode_audio,
    decode_audio_counted,
    encode_audio,
    resample,
)
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.core.types import Counters, RawAudio


def raw(data: bytes, encoding: str = "S16LE", channels: int = 1, rate: int = 16_000) -> RawAudio:
    return RawAudio(stamp_ns=123, sample_rate=rate, channels=channels, encoding=encoding, data=data)


# ------------------------------------------------------------------------------- decoding
def test_s16le_mono_decodes_to_known_float_values() -> None:
    pcm = np.array([0, 16384, -16384, 32767, -32768], dtype="<i2")
    block = decode_audio(raw(pcm.tobytes()))
    np.testing.assert_array_equal(block.samples, [0.0, 0.5, -0.5, 32767 / 32768, -1.0])
    assert block.samples.dtype == np.float32
    assert (block.stamp_ns, block.sample_rate) == (123, 16_000)


def test_f32le_stereo_is_downmixed_by_the_channel_mean() -> None:
    left = np.array([0.5, -0.25, 1.0], np.float32)
    right = np.array([0.1, 0.25, 0.0], np.float32)
    interleaved = np.stack([left, right], axis=1).astype("<f4").tobytes()
    block = decode_audio(raw(interleaved, "F32LE", channels=2))
    np.testing.assert_allclose(block.samples, (left + right) / 2, rtol=1e-7)


def test_six_channel_s16le_is_downmixed() -> None:
    frames = np.arange(6 * 4, dtype="<i2").reshape(4, 6) * 100
    block = decode_audio(raw(frames.tobytes(), channels=6))
    np.testing.assert_allclose(block.samples, frames.mean(axis=1) / 32768, rtol=1e-6)


def test_encoding_names_are_case_insensitive() -> None:
    assert len(decode_audio(raw(b"\x00\x00" * 4, "s16le")).samples) == 4


def test_nan_and_inf_samples_become_zero_and_are_counted() -> None:
    values = np.array([0.5, np.nan, np.inf, -np.inf, -0.5, 2.0], np.float32)
    decoded = decode_audio_counted(raw(values.astype("<f4").tobytes(), "F32LE"))
    assert decoded.nonfinite_samples == 3
    np.testing.assert_array_equal(decoded.block.samples, [0.5, 0, 0, 0, -0.5, 1.0])
    counters = Counters()
    decode_audio(raw(values.astype("<f4").tobytes(), "F32LE"), counters)
    assert counters.nonfinite_samples == 3


def test_a_nan_in_one_channel_does_not_poison_the_other() -> None:
    values = np.array([np.nan, 0.5], np.float32)  # one stereo frame
    block = decode_audio(raw(values.tobytes(), "F32LE", channels=2))
    np.testing.assert_array_equal(block.samples, [0.25])


def test_empty_data_decodes_to_an_empty_block() -> None:
    assert len(decode_audio(raw(b"")).samples) == 0


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (raw(b"\x00" * 4, "MP3"), "unknown audio encoding"),
        (raw(b"\x00" * 3), "truncated"),
        (raw(b"\x00" * 6, "F32LE"), "truncated"),
        (raw(b"\x00" * 6, channels=2), "truncated"),
        (raw(b"\x00" * 4, channels=0), "channels"),
        (raw(b"\x00" * 4, rate=0), "sample_rate"),
        (raw(b"\x00" * 4, rate=1_000_000), "sample_rate"),
    ],
)
def test_bad_audio_chunks_raise_specific_decode_errors(audio: RawAudio, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_audio(audio)


# ------------------------------------------------------------------------------- encoding
def test_s16le_encoding_clips_and_rounds_to_nearest() -> None:
    samples = np.array([0.0, 1.5, -1.5, 0.5, 1 / 65536 + 1e-7, np.nan], np.float32)
    pcm = np.frombuffer(encode_audio(samples, "S16LE"), dtype="<i2")
    np.testing.assert_array_equal(pcm, [0, 32767, -32768, 16384, 1, 0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1, 1, width=32), max_size=200))
def test_s16le_round_trip_is_within_half_a_step_except_full_scale_clipping(
    values: list[float],
) -> None:
    samples = np.array(values, np.float32)
    back = decode_audio(raw(encode_audio(samples, "S16LE"))).samples
    # int16 has no +32768: values above 32767/32768 clip to it, one step below +1.0 at most.
    expected = np.minimum(samples, np.float32(32767 / 32768))
    assert np.all(np.abs(back - expected) <= 0.5 / 32768 + 1e-7)


def test_f32le_round_trip_is_exact() -> None:
    samples = np.linspace(-1, 1, 101, dtype=np.float32)
    back = decode_audio(raw(encode_audio(samples, "F32LE"), "F32LE")).samples
    np.testing.assert_array_equal(back, samples)


def test_encoding_to_an_unknown_format_raises_decode_error() -> None:
    with pytest.raises(DecodeError):
        encode_audio(np.zeros(3, np.float32), "ULAW")


# ----------------------------------------------------------------------------- resampling
def test_resampling_a_sine_keeps_its_frequency_and_level() -> None:
    t = np.arange(48_000) / 48_000
    sine = (0.5 * np.sin(2 * np.pi * 1_000 * t)).astype(np.float32)
    out = resample(sine, 48_000, 16_000)
    assert len(out) == 16_000
    expected = 0.5 * np.sin(2 * np.pi * 1_000 * np.arange(16_000) / 16_000)
    np.testing.assert_allclose(out[100:-100], expected[100:-100], atol=1e-4)


def test_the_stream_resampler_matches_whole_block_resampling_whatever_the_chunking() -> None:
    signal = np.random.default_rng(1).standard_normal(44_100).astype(np.float32) * 0.1
    whole = resample(signal, 44_100, 16_000, "VHQ")
    stream = StreamResampler(44_100, 16_000, "VHQ")
    cuts = [0, 100, 1_000, 1_001, 20_000, 44_100]
    parts = [
        stream.process(signal[a:b], last=(b == len(signal))) for a, b in itertools.pairwise(cuts)
    ]
    streamed = np.concatenate(parts)
    assert len(streamed) == len(whole)
    np.testing.assert_allclose(streamed, whole, atol=1e-5)


def test_stream_resampler_reset_forgets_history() -> None:
    signal = np.random.default_rng(2).standard_normal(4_410).astype(np.float32) * 0.1
    stream = StreamResampler(44_100, 16_000)
    first = stream.process(signal, last=True)
    stream.process(np.ones(1_000, np.float32))
    stream.reset()
    np.testing.assert_array_equal(stream.process(signal, last=True), first)


def test_resampler_rejects_unknown_quality_and_bad_rates() -> None:
    with pytest.raises(ConfigError):
        StreamResampler(16_000, 24_000, "LQ")
    with pytest.raises(ConfigError):
        resample(np.zeros(3, np.float32), 0, 16_000)


# ------------------------------------------------------------------------------- chunking
def test_chunk_output_splits_speech_into_fixed_chunks_with_exact_stamps() -> None:
    samples = np.arange(24_000 + 100, dtype=np.float32)
    chunks = chunk_output(samples, 24_000, 960, stamp_ns=5 * NS_PER_S)
    assert [len(c) for _, c in chunks] == [960] * 25 + [100]
    assert [s for s, _ in chunks][:3] == [
        5 * NS_PER_S,
        5 * NS_PER_S + 40_000_000,
        5 * NS_PER_S + 80_000_000,
    ]
    assert chunks[-1][0] == 5 * NS_PER_S + NS_PER_S
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), samples)


def test_chunk_output_stamps_do_not_drift_with_non_integer_chunk_durations() -> None:
    chunks = chunk_output(np.zeros(24_000 * 10, np.float32), 24_000, 1_000, stamp_ns=0)
    # 1000 samples at 24 kHz = 41_666_666.67 ns: stamps are rounded per chunk, never accumulated.
    assert [s for s, _ in chunks][-1] == round(239 * 1_000 * NS_PER_S / 24_000)


def test_chunk_output_pads_the_last_chunk_when_asked() -> None:
    chunks = chunk_output(np.ones(1_000, np.float32), 24_000, 960, 0, pad_last=True)
    assert [len(c) for _, c in chunks] == [960, 960]
    assert chunks[1][1][40:].sum() == 0


def test_output_chunker_carries_partial_chunks_across_units() -> None:
    chunker = OutputChunker(24_000, 1_000)
    unit_a = np.arange(24_000, dtype=np.float32)
    unit_b = np.arange(24_000, 48_000, dtype=np.float32)
    out = chunker.push(unit_a, stamp_ns=0) + chunker.push(unit_b, stamp_ns=NS_PER_S)
    assert all(len(c) == 1_000 for _, c in out)
    assert len(out) == 48
    np.testing.assert_array_equal(np.concatenate([c for _, c in out]), np.arange(48_000))
    assert [s for s, _ in out] == [round(k * 1_000 * NS_PER_S / 24_000) for k in range(48)]


def test_output_chunker_flushes_when_the_stream_is_not_continuous() -> None:
    chunker = OutputChunker(24_000, 1_000)
    assert chunker.push(np.ones(1_500, np.float32), stamp_ns=0) != []
    out = chunker.push(np.ones(1_000, np.float32), stamp_ns=10 * NS_PER_S)
    assert [(s, len(c)) for s, c in out] == [
        (round(1_000 * NS_PER_S / 24_000), 500),
        (10 * NS_PER_S, 1_000),
    ]
    assert chunker.pending_samples == 0
    chunker.push(np.ones(10, np.float32), stamp_ns=20 * NS_PER_S)
    chunker.reset()
    assert chunker.flush() == []


def test_chunking_with_a_non_positive_size_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        chunk_output(np.zeros(3, np.float32), 24_000, 0, 0)
    with pytest.raises(ConfigError):
        OutputChunker(0, 960)
