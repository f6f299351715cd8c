"""conversions.py: ROS messages <-> core types (rclpy message classes, no rclpy.init, no DDS)."""

from __future__ import annotations

import array
import dataclasses
import io

import numpy as np
import pytest

pytest.importorskip("rclpy")

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticStatus
from omni_ros.core.audio import decode_audio
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.core.images import decode_image
from omni_ros.core.types import (
    Counters,
    Mode,
    PlaybackReport,
    ProactiveEvent,
    SpeechFlush,
    SpeechOut,
    StateOut,
    TextOut,
)
from omni_ros.ros import conversions as conv
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from omni_ros_msgs.msg import AudioChunk, OmniState, Playback
from omni_ros_msgs.msg import SpeechFlush as SpeechFlushMsg

STAMP_NS = 1_000_123_456_789


def _state(mode: Mode = Mode.LISTENING, rtf: float = 0.25, **counts: int) -> StateOut:
    return StateOut(
        stamp_ns=STAMP_NS,
        mode=mode,
        unit_index=7,
        unit_compute_ms=250.0,
        real_time_factor=rtf,
        counters=Counters(**counts),
        backend="reference",
        turn_id=3,
    )


@pytest.mark.parametrize(
    "stamp_ns", [0, 1, 999_999_999, 1_000_000_000, STAMP_NS, 2**31 * 10**9 - 1, -1, -1_500_000_000]
)
def test_stamps_round_trip_exactly_with_nanosec_in_range(stamp_ns: int) -> None:
    stamp = conv.ns_to_stamp(stamp_ns)
    assert 0 <= stamp.nanosec < 1_000_000_000
    assert conv.stamp_to_ns(stamp) == stamp_ns


def test_stamp_to_ns_reads_sec_and_nanosec() -> None:
    assert conv.stamp_to_ns(Time(sec=1000, nanosec=5)) == 1_000_000_000_005


def test_audio_chunk_becomes_raw_audio_with_identical_bytes_and_fields() -> None:
    pcm = (np.arange(-960, 960, dtype="<i2") * 17).tobytes()
    msg = AudioChunk(
        header=Header(stamp=conv.ns_to_stamp(STAMP_NS), frame_id="mic_array"),
        sample_rate=48_000,
        channels=2,
        encoding="S16LE",
    )
    msg.data = array.array("B", pcm)
    msg = deserialize_message(serialize_message(msg), AudioChunk)  # as a subscriber sees it
    assert isinstance(msg.data, array.array)
    raw = conv.audio_chunk_to_raw(msg)
    assert raw.data == pcm
    assert (raw.stamp_ns, raw.sample_rate, raw.channels, raw.encoding, raw.source) == (
        STAMP_NS,
        48_000,
        2,
        "S16LE",
        "mic_array",
    )
    block = decode_audio(raw)
    expected = np.frombuffer(pcm, "<i2").reshape(-1, 2).astype(np.float32).mean(axis=1) / 32768
    np.testing.assert_allclose(block.samples, expected, atol=1e-6)


def test_image_with_padded_rows_becomes_raw_image_that_decodes_to_the_pixels() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    step = 5 * 3 + 9  # padded rows
    padded = np.zeros((6, step), np.uint8)
    padded[:, :15] = rgb.reshape(6, 15)
    bgr = padded.copy()
    bgr[:, :15] = rgb[..., ::-1].reshape(6, 15)
    msg = Image(
        header=Header(stamp=conv.ns_to_stamp(STAMP_NS), frame_id="cam"),
        height=6,
        width=5,
        encoding="bgr8",
        is_bigendian=0,
        step=step,
    )
    msg.data = array.array("B", bgr.tobytes())
    msg = deserialize_message(serialize_message(msg), Image)
    raw = conv.image_to_raw(msg)
    assert (raw.width, raw.height, raw.step, raw.encoding, raw.compressed) == (
        5,
        6,
        step,
        "bgr8",
        False,
    )
    assert raw.stamp_ns == STAMP_NS
    frame = decode_image(raw)
    np.testing.assert_array_equal(frame.rgb, rgb)


def test_truncated_image_converts_but_the_core_rejects_it() -> None:
    msg = Image(height=4, width=4, encoding="rgb8", step=12)
    msg.data = array.array("B", bytes(12 * 3))  # one row short
    raw = conv.image_to_raw(msg)
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(raw)


def test_compressed_png_becomes_a_compressed_raw_image() -> None:
    from PIL import Image as PILImage

    rgb = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3) * 5
    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="PNG")
    msg = CompressedImage(header=Header(stamp=conv.ns_to_stamp(STAMP_NS)), format="png")
    msg.data = array.array("B", buffer.getvalue())
    raw = conv.compressed_to_raw(msg)
    assert raw.compressed
    assert raw.encoding == "png"
    assert raw.stamp_ns == STAMP_NS
    np.testing.assert_array_equal(decode_image(raw).rgb, rgb)


def test_speech_is_cut_into_chunks_stamped_from_their_absolute_offset() -> None:
    rate = 24_000
    samples = np.sin(np.arange(rate + 1000, dtype=np.float32) / 7.0).astype(np.float32) * 0.5
    speech = SpeechOut(
        stamp_ns=STAMP_NS, turn_id=1, unit_index=4, sample_rate=rate, samples=samples
    )
    chunks = conv.speech_to_chunks(speech, 2400, "S16LE", "omni")
    assert len(chunks) == 11
    for i, chunk in enumerate(chunks):
        assert conv.stamp_to_ns(chunk.header.stamp) == STAMP_NS + i * 100_000_000
        assert (chunk.sample_rate, chunk.channels, chunk.encoding) == (rate, 1, "S16LE")
        assert chunk.header.frame_id == "omni"
    assert [len(c.data) // 2 for c in chunks] == [2400] * 10 + [1000]
    pcm = b"".join(c.data.tobytes() for c in chunks)
    decoded = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
    np.testing.assert_allclose(decoded, samples, atol=1.0 / 32768)


def test_speech_chunks_in_f32le_round_trip_exactly() -> None:
    samples = np.linspace(-1, 1, 500, dtype=np.float32)
    speech = SpeechOut(stamp_ns=0, turn_id=1, unit_index=0, sample_rate=24_000, samples=samples)
    chunks = conv.speech_to_chunks(speech, 200, "F32LE")
    assert [c.encoding for c in chunks] == ["F32LE"] * 3
    joined = np.frombuffer(b"".join(c.data.tobytes() for c in chunks), "<f4")
    np.testing.assert_array_equal(joined, samples)


def test_speech_chunking_rejects_bad_sizes_and_encodings() -> None:
    speech = SpeechOut(0, 1, 0, 24_000, np.zeros(10, np.float32))
    with pytest.raises(ConfigError):
        conv.speech_to_chunks(speech, 0)
    with pytest.raises(DecodeError):
        conv.speech_to_chunks(speech, 4, "MP3")


def test_text_proactive_and_state_messages_carry_every_field() -> None:
    text = conv.text_to_msg(TextOut(STAMP_NS, 2**40, 9, "héllo", True, True))
    assert (text.turn_id, text.unit_index, text.text, text.end_of_turn, text.proactive) == (
        2**40,
        9,
        "héllo",
        True,
        True,
    )
    assert conv.stamp_to_ns(text.header.stamp) == STAMP_NS
    event = ProactiveEvent(
        STAMP_NS, 4, STAMP_NS - 3_000_000_000, "reminder", "Water the plants.", 0.75, True
    )
    action = conv.proactive_to_msg(event)
    assert (action.turn_id, action.kind, action.text) == (4, "reminder", "Water the plants.")
    assert action.confidence == 0.75
    assert conv.stamp_to_ns(action.trigger_stamp) == STAMP_NS - 3_000_000_000
    state = conv.state_to_msg(
        _state(
            Mode.INTERRUPTED,
            dropped_frames=3,
            dropped_audio_samples=2**33,
            late_messages=5,
            gap_samples_filled=160,
        )
    )
    assert state.mode == OmniState.INTERRUPTED
    assert (state.unit_index, state.backend) == (7, "reference")
    assert (
        state.dropped_frames,
        state.dropped_audio_samples,
        state.late_messages,
        state.gap_samples_filled,
    ) == (
        3,
        2**33,
        5,
        160,
    )
    assert state.real_time_factor == pytest.approx(0.25)
    for msg in (text, action, state):  # every value fits its wire type
        assert deserialize_message(serialize_message(msg), type(msg)) == msg


def test_mode_values_equal_the_message_constants() -> None:
    for mode in Mode:
        assert getattr(OmniState, mode.name) == int(mode)


def _values(status: DiagnosticStatus) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def test_diagnostics_report_every_counter_and_are_ok_when_healthy() -> None:
    status = conv.diagnostic_status(_state(), latency_ms=12.5, extra={"lifecycle": "active"})
    assert status.level == DiagnosticStatus.OK
    values = _values(status)
    for name in Counters().as_dict():
        assert values[name] == "0"
    assert values["backend"] == "reference"
    assert values["mode"] == "LISTENING"
    assert values["latency_ms"] == "12.5"
    assert values["lifecycle"] == "active"


def test_diagnostics_warn_when_a_loss_counter_grew_since_the_last_report() -> None:
    previous = Counters(decode_errors=2, dropped_frames=5, barge_ins=1)
    unchanged = conv.diagnostic_status(
        _state(decode_errors=2, dropped_frames=5, barge_ins=4), previous
    )
    assert unchanged.level == DiagnosticStatus.OK  # barge-ins are normal operation
    frames = conv.diagnostic_status(_state(decode_errors=2, dropped_frames=9), previous)
    assert frames.level == DiagnosticStatus.WARN
    assert "dropped_frames +4" in frames.message
    grown = conv.diagnostic_status(_state(decode_errors=3, dropped_frames=5), previous)
    assert grown.level == DiagnosticStatus.WARN
    assert "decode_errors +1" in grown.message
    jumped = conv.diagnostic_status(_state(clock_jumps=1))
    assert jumped.level == DiagnosticStatus.WARN
    assert "clock_jumps" in jumped.message


def test_diagnostics_warn_when_slower_than_real_time_and_error_in_error_mode() -> None:
    assert conv.diagnostic_status(_state(rtf=1.5)).level == DiagnosticStatus.WARN
    error = conv.diagnostic_status(_state(Mode.ERROR, backend_errors=1))
    assert error.level == DiagnosticStatus.ERROR
    assert "backend_errors +1" in error.message


def test_an_error_state_before_any_unit_converts_and_its_reason_reaches_diagnostics() -> None:
    state = dataclasses.replace(
        _state(Mode.ERROR, backend_errors=2), unit_index=-1, error="backend prepare failed (2x): x"
    )
    msg = conv.state_to_msg(state)
    assert (msg.mode, msg.unit_index, msg.error) == (OmniState.ERROR, 0, state.error)
    status = conv.diagnostic_status(state)
    assert status.level == DiagnosticStatus.ERROR
    assert status.message.startswith("backend prepare failed (2x): x")


def test_flush_and_playback_messages_round_trip_every_field() -> None:
    flush = SpeechFlush(STAMP_NS, 5, STAMP_NS + 10, STAMP_NS + 20, "reset", STAMP_NS + 3)
    msg = conv.flush_to_msg(flush)
    assert msg.reason == SpeechFlushMsg.RESET
    assert conv.stamp_to_ns(msg.header.stamp) == STAMP_NS + 3
    assert conv.msg_to_flush(deserialize_message(serialize_message(msg), SpeechFlushMsg)) == flush
    report = PlaybackReport(STAMP_NS, 6, STAMP_NS - 5, 24_000, 1234, late=True, cut=True)
    back = deserialize_message(serialize_message(conv.playback_to_msg(report)), Playback)
    assert conv.msg_to_playback(back) == report
    speech = SpeechOut(STAMP_NS, 9, 0, 24_000, np.zeros(2400, np.float32))
    assert {c.turn_id for c in conv.speech_to_chunks(speech, 1200)} == {9}


def test_diagnostics_without_a_unit_warn_with_the_reason() -> None:
    status = conv.diagnostic_status(None, inactive_reason="inactive (lifecycle: unconfigured)")
    assert status.level == DiagnosticStatus.WARN
    assert status.message == "inactive (lifecycle: unconfigured)"


def test_diagnostics_reporter_compares_each_report_with_the_previous_one() -> None:
    from omni_ros.ros._diagnostics import DiagnosticsReporter

    reporter = DiagnosticsReporter()
    idle = reporter.report("node", "reference", "inactive", STAMP_NS)
    assert idle.status[0].level == DiagnosticStatus.WARN
    assert "lifecycle: inactive" in idle.status[0].message
    reporter.on_state(_state(late_messages=2), STAMP_NS + 40_000_000)
    first = reporter.report("node", "reference", "active", STAMP_NS)
    assert first.status[0].level == DiagnosticStatus.WARN  # 2 late messages since the start
    assert _values(first.status[0])["latency_ms"] == "40.0"
    second = reporter.report("node", "reference", "active", STAMP_NS)
    assert second.status[0].level == DiagnosticStatus.OK  # nothing new since the last report
    assert conv.stamp_to_ns(second.header.stamp) == STAMP_NS


@pytest.mark.parametrize(
    ("hook", "given", "shown", "error", "error_value"),
    [
        (  # the backend's own metrics
            "backend_metrics",
            {"server_kv_cache_length": 812, "transport": "websocket"},
            {"backend.server_kv_cache_length": "812", "backend.transport": "websocket"},
            RuntimeError("socket closed"),
            {"backend.metrics_error": "RuntimeError: socket closed"},
        ),
        (  # the echo canceller's state (OmniFlow.echo_status)
            "echo",
            {"echo.delay_ms": "120.0", "echo.converged": "true"},
            {"echo.delay_ms": "120.0", "echo.converged": "true"},
            ValueError("array changed size"),
            {"echo.error": "ValueError: array changed size"},
        ),
    ],
)
def test_a_hooks_values_reach_diagnostics_and_a_failing_read_is_reported(
    hook: str,
    given: dict[str, object],
    shown: dict[str, str],
    error: Exception,
    error_value: dict[str, str],
) -> None:
    from omni_ros.ros._diagnostics import DiagnosticsReporter

    reporter = DiagnosticsReporter()
    reporter.on_state(_state(), STAMP_NS)
    setattr(reporter, hook, lambda: given)
    values = _values(reporter.report("node", "llamacpp_omni", "active", STAMP_NS).status[0])
    for key, value in shown.items():
        assert values[key] == value

    def broken() -> dict[str, object]:
        raise error

    setattr(reporter, hook, broken)
    values = _values(reporter.report("node", "llamacpp_omni", "active", STAMP_NS).status[0])
    for key, value in error_value.items():
        assert values[key] == value
    reporter.clear()
    cleared = _values(reporter.report("n", "r", "active", STAMP_NS).status[0])
    assert not set(shown) & set(cleared)


def test_tensorrt_component_statuses_become_their_own_diagnostics() -> None:
    from omni_ros.ros._diagnostics import DiagnosticsReporter
    from omni_ros.tensorrt.diagnostics import ComponentStatus

    reporter = DiagnosticsReporter()
    reporter.components = [
        ComponentStatus("vision", "tensorrt", "engine vision-abc (TensorRT 10.9, fp16)", "/e"),
        ComponentStatus("audio", "torch", "TensorRT is not installed"),
    ]
    statuses = reporter.report("node", "reference", "active", 0).status
    assert [s.name for s in statuses[1:]] == ["node: tensorrt vision", "node: tensorrt audio"]
    assert [s.level for s in statuses[1:]] == [DiagnosticStatus.OK, DiagnosticStatus.WARN]
    assert _values(statuses[2])["using"] == "torch"
    assert "not installed" in statuses[2].message
