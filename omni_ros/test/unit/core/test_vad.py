"""Tests for the streaming WebRTC voice activity detector, on real (espeak-ng) speech."""

from __future__ import annotations

import numpy as np
import pytest
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.core.types import AudioBlock, FloatArray
from omni_ros.core.vad import VadConfig, VadEvent, VadEventKind, VoiceActivityDetector
from unit.core.speech_audio import speech

RATE = 16_000
T0_NS = 5_000_000_000


def _stamp(sample_index: int, rate: int = RATE) -> int:
    return T0_NS + round(sample_index * 1e9 / rate)


def _feed(
    vad: VoiceActivityDetector, signal: FloatArray, block: int, rate: int = RATE
) -> list[VadEvent]:
    events: list[VadEvent] = []
    for i in range(0, len(signal), block):
        events += vad.process(AudioBlock(_stamp(i, rate), rate, signal[i : i + block]))
    return events


def _utterance_with_silence(rate: int = RATE) -> tuple[FloatArray, int, int]:
    """1 s silence + speech + 1 s silence, light noise; returns (signal, first, last voiced sample)."""
    voice = speech("Hello robot, please stop talking now.", rate=rate)
    voiced = np.flatnonzero(np.abs(voice) > 0.02)
    pad = np.zeros(rate, dtype=np.float32)
    signal = np.concatenate([pad, voice, pad])
    signal += np.random.default_rng(0).normal(0, 0.002, len(signal)).astype(np.float32)
    return signal, rate + int(voiced[0]), rate + int(voiced[-1])


def test_speech_onset_and_offset_are_stamped_near_the_true_speech_boundaries() -> None:
    signal, first, last = _utterance_with_silence()
    events = _feed(VoiceActivityDetector(), signal, block=320)
    assert [e.kind for e in events] == [VadEventKind.ONSET, VadEventKind.OFFSET]
    onset, offset = events
    # Onset within two 30 ms frames of where the voice really starts; the offset carries WebRTC's
    # own short hangover (a few frames) after the last voiced sample.
    assert abs(onset.stamp_ns - _stamp(first)) <= 60_000_000
    assert -60_000_000 <= offset.stamp_ns - _stamp(last) <= 180_000_000
    # Debounce: the onset is known min_speech later, the offset a hangover later.
    assert onset.detected_ns - onset.stamp_ns >= 180_000_000
    assert offset.detected_ns - offset.stamp_ns >= 300_000_000


@pytest.mark.parametrize("block", [1, 7, 160, 333, 480, 1000, 4096])
def test_any_block_size_yields_identical_events(block: int) -> None:
    signal, _, _ = _utterance_with_silence()
    reference = _feed(VoiceActivityDetector(), signal, block=480)
    assert _feed(VoiceActivityDetector(), signal, block=block) == reference


@pytest.mark.parametrize("rate", [8_000, 32_000, 48_000])
def test_every_webrtc_rate_detects_the_same_utterance(rate: int) -> None:
    signal, first, _ = _utterance_with_silence(rate)
    events = _feed(VoiceActivityDetector(), signal, block=rate // 50, rate=rate)
    assert events[0].kind is VadEventKind.ONSET
    assert abs(events[0].stamp_ns - _stamp(first, rate)) <= 60_000_000


def test_silence_and_steady_noise_never_trigger() -> None:
    rng = np.random.default_rng(1)
    quiet = np.zeros(3 * RATE, dtype=np.float32)
    hiss = rng.normal(0, 0.01, 3 * RATE).astype(np.float32)
    hum = (0.05 * np.sin(2 * np.pi * 50 * np.arange(3 * RATE) / RATE)).astype(np.float32)
    for signal in (quiet, hiss, hum):
        vad = VoiceActivityDetector()
        assert _feed(vad, signal, block=320) == []
        assert not vad.in_speech


def test_a_burst_shorter_than_min_speech_is_not_an_onset() -> None:
    voice = speech("Hello robot, please stop talking now.")
    voiced = np.flatnonzero(np.abs(voice) > 0.05)
    burst = voice[voiced[0] + 1600 : voiced[0] + 1600 + int(0.06 * RATE)]  # 60 ms of a vowel
    signal = np.concatenate([np.zeros(RATE, np.float32), burst, np.zeros(RATE, np.float32)])
    assert _feed(VoiceActivityDetector(VadConfig()), signal, block=320) == []
    # ...while the same burst counts when the debounce is off (so the burst really is "speech").
    loose = _feed(VoiceActivityDetector(VadConfig(min_speech_ms=0, frame_ms=10)), signal, block=320)
    assert any(e.kind is VadEventKind.ONSET for e in loose)


def test_speech_in_reports_overlap_with_confirmed_runs_only() -> None:
    signal, first, last = _utterance_with_silence()
    vad = VoiceActivityDetector()
    _feed(vad, signal, block=320)
    assert vad.speech_in(_stamp(first), _stamp(first) + 100_000_000)
    assert vad.speech_in(_stamp(0), _stamp(len(signal)))
    assert not vad.speech_in(_stamp(0), _stamp(first) - 100_000_000)
    assert not vad.speech_in(_stamp(last) + 250_000_000, _stamp(len(signal)))


def test_active_run_grows_while_the_user_talks() -> None:
    signal, first, _ = _utterance_with_silence()
    vad = VoiceActivityDetector()
    cut = first + RATE // 2
    _feed(vad, signal[:cut], block=320)
    run = vad.active_run()
    assert run is not None
    start_ns, duration_ns = run
    assert abs(start_ns - _stamp(first)) <= 60_000_000
    assert duration_ns >= 300_000_000


def test_a_gap_in_stamps_restarts_the_stream_at_the_new_stamp() -> None:
    signal, first, _ = _utterance_with_silence()
    vad = VoiceActivityDetector()
    vad.process(AudioBlock(T0_NS, RATE, np.zeros(1234, np.float32)))  # leaves a remainder
    later_ns = T0_NS + 60_000_000_000  # a minute later: the remainder must not be glued on
    events: list[VadEvent] = []
    for i in range(0, len(signal), 320):
        events += vad.process(
            AudioBlock(later_ns + round(i * 1e9 / RATE), RATE, signal[i : i + 320])
        )
    assert abs(events[0].stamp_ns - (later_ns + round(first * 1e9 / RATE))) <= 60_000_000


def test_unsupported_rate_is_a_decode_error_that_says_what_to_do() -> None:
    with pytest.raises(DecodeError, match="resample"):
        VoiceActivityDetector().process(AudioBlock(0, 44_100, np.zeros(441, np.float32)))


def test_bad_configuration_is_rejected_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match="aggressiveness"):
        VadConfig(aggressiveness=4)
    with pytest.raises(ConfigError, match="frame_ms"):
        VadConfig.from_mapping({"frame_ms": 25})
    with pytest.raises(ConfigError, match="unknown"):
        VadConfig.from_mapping({"agressiveness": 1})
    assert VadConfig.from_mapping({"hangover_ms": 500}).hangover_ms == 500


def test_reset_forgets_history_and_partial_frames() -> None:
    signal, _, _ = _utterance_with_silence()
    vad = VoiceActivityDetector()
    _feed(vad, signal, block=320)
    vad.reset()
    assert not vad.speech_in(_stamp(0), _stamp(len(signal)))
    assert vad.active_run() is None
