"""The one place that knows both worlds: ROS messages <-> omni_ros core types.

Everything here is a pure function (no node, no rclpy.init), so tests build messages and check the
conversions directly. Byte payloads move as whole buffers: ``array.array('B')`` fields are read
with ``tobytes()`` and written by handing ``array.array('B', data)`` to the setter, which skips
rclpy's per-element validation of Python sequences (that check is O(n) Python code per message).
"""

from __future__ import annotations

import array
from collections.abc import Mapping
from typing import Any

from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from omni_ros.core.audio import chunk_output, encode_audio
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.types import (
    FLUSH_REASONS,
    Counters,
    Mode,
    PlaybackReport,
    ProactiveEvent,
    RawAudio,
    RawImage,
    SpeechFlush,
    SpeechOut,
    StateOut,
    TextOut,
)
from omni_ros_msgs.msg import (
    AudioChunk,
    OmniState,
    OmniText,
    Playback,
    ProactiveAction,
)
from omni_ros_msgs.msg import SpeechFlush as SpeechFlushMsg

#: Counters whose increase between two diagnostics reports means input or compute was lost.
#: Frames the per-unit policy does not choose are not counted anywhere (a 30 fps camera feeds one
#: frame per unit by design), so a growing ``dropped_frames`` is a real loss: late, malformed,
#: duplicate-stamped or queue overflow. ``barge_ins`` and ``duplicate_samples`` (stamp overlap
#: that the timeline resolves) are normal operation.
WARN_COUNTERS = (
    "dropped_frames",
    "dropped_audio_samples",
    "late_messages",
    "decode_errors",
    "clock_jumps",
    "future_messages",
    "nonfinite_samples",
    "units_dropped_overrun",
    "backend_errors",
    "backend_timeouts",
    "late_speech",
    "playback_late_chunks",
    "prompt_errors",
)


# ---------------------------------------------------------------------------------------------- time
def stamp_to_ns(stamp: Time) -> int:
    """``builtin_interfaces/Time`` -> integer nanoseconds."""
    return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)


def ns_to_stamp(stamp_ns: int) -> Time:
    """Integer nanoseconds -> ``builtin_interfaces/Time`` (``nanosec`` always in [0, 1e9))."""
    sec, nanosec = divmod(int(stamp_ns), NS_PER_S)
    return Time(sec=sec, nanosec=nanosec)


def header(stamp_ns: int, frame_id: str = "") -> Header:
    """A ``std_msgs/Header`` stamped at ``stamp_ns``."""
    return Header(stamp=ns_to_stamp(stamp_ns), frame_id=frame_id)


def _payload(data: Any) -> bytes:
    # rclpy gives array.array('B'); tolerate bytes / lists from hand-built messages.
    if isinstance(data, array.array):
        return data.tobytes()
    return bytes(data)


# -------------------------------------------------------------------------------------------- inputs
def audio_chunk_to_raw(msg: AudioChunk) -> RawAudio:
    """``omni_ros_msgs/AudioChunk`` -> :class:`RawAudio` (not decoded: the core validates it)."""
    return RawAudio(
        stamp_ns=stamp_to_ns(msg.header.stamp),
        sample_rate=int(msg.sample_rate),
        channels=int(msg.channels),
        encoding=str(msg.encoding),
        data=_payload(msg.data),
        source=str(msg.header.frame_id),
    )


def image_to_raw(msg: Image) -> RawImage:
    """``sensor_msgs/Image`` -> :class:`RawImage` (not decoded: the core validates it)."""
    return RawImage(
        stamp_ns=stamp_to_ns(msg.header.stamp),
        encoding=str(msg.encoding),
        data=_payload(msg.data),
        width=int(msg.width),
        height=int(msg.height),
        step=int(msg.step),
        is_bigendian=bool(msg.is_bigendian),
        compressed=False,
    )


def compressed_to_raw(msg: CompressedImage) -> RawImage:
    """``sensor_msgs/CompressedImage`` -> :class:`RawImage` with ``compressed=True``."""
    return RawImage(
        stamp_ns=stamp_to_ns(msg.header.stamp),
        encoding=str(msg.format),
        data=_payload(msg.data),
        compressed=True,
    )


# ------------------------------------------------------------------------------------------- outputs
def speech_to_chunks(
    speech: SpeechOut, chunk_samples: int, encoding: str = "S16LE", frame_id: str = "omni"
) -> list[AudioChunk]:
    """Cut one :class:`SpeechOut` into ``AudioChunk`` messages of ``chunk_samples`` samples each.

    Each chunk is stamped with the play time of its first sample, computed from its absolute
    offset (no drift); the last chunk may be shorter.

    Raises:
        ConfigError: a non-positive ``chunk_samples``.
        DecodeError: an unknown ``encoding``.
    """
    chunks = []
    for stamp_ns, samples in chunk_output(
        speech.samples, speech.sample_rate, chunk_samples, speech.stamp_ns
    ):
        msg = AudioChunk(
            header=header(stamp_ns, frame_id),
            sample_rate=int(speech.sample_rate),
            channels=1,
            encoding=encoding.strip().upper(),
            turn_id=int(speech.turn_id),
        )
        msg.data = array.array("B", encode_audio(samples, encoding))
        chunks.append(msg)
    return chunks


def flush_to_msg(flush: SpeechFlush, frame_id: str = "omni") -> SpeechFlushMsg:
    """:class:`SpeechFlush` -> ``omni_ros_msgs/SpeechFlush`` (header.stamp = decision time)."""
    return SpeechFlushMsg(
        header=header(flush.decided_ns or flush.stamp_ns, frame_id),
        reason=FLUSH_REASONS.index(flush.reason),
        turn_id=int(flush.turn_id),
        dropped_from=ns_to_stamp(flush.dropped_from_ns),
        dropped_until=ns_to_stamp(flush.dropped_until_ns),
        onset=ns_to_stamp(flush.stamp_ns),
    )


def msg_to_flush(msg: SpeechFlushMsg) -> SpeechFlush:
    """``omni_ros_msgs/SpeechFlush`` -> :class:`SpeechFlush` (an unknown reason reads as stop)."""
    reason = FLUSH_REASONS[msg.reason] if msg.reason < len(FLUSH_REASONS) else "stop"
    return SpeechFlush(
        stamp_ns=stamp_to_ns(msg.onset),
        turn_id=int(msg.turn_id),
        dropped_from_ns=stamp_to_ns(msg.dropped_from),
        dropped_until_ns=stamp_to_ns(msg.dropped_until),
        reason=reason,
        decided_ns=stamp_to_ns(msg.header.stamp),
    )


def playback_to_msg(report: PlaybackReport, frame_id: str = "speaker") -> Playback:
    """:class:`PlaybackReport` -> ``omni_ros_msgs/Playback``."""
    return Playback(
        header=header(report.heard_ns, frame_id),
        turn_id=int(report.turn_id),
        scheduled=ns_to_stamp(report.scheduled_ns),
        sample_rate=int(report.sample_rate),
        samples=int(report.samples),
        late=bool(report.late),
        cut=bool(report.cut),
    )


def msg_to_playback(msg: Playback) -> PlaybackReport:
    """``omni_ros_msgs/Playback`` -> :class:`PlaybackReport`."""
    return PlaybackReport(
        heard_ns=stamp_to_ns(msg.header.stamp),
        turn_id=int(msg.turn_id),
        scheduled_ns=stamp_to_ns(msg.scheduled),
        sample_rate=int(msg.sample_rate),
        samples=int(msg.samples),
        late=bool(msg.late),
        cut=bool(msg.cut),
    )


def text_to_msg(text: TextOut, frame_id: str = "omni") -> OmniText:
    """:class:`TextOut` -> ``omni_ros_msgs/OmniText``."""
    return OmniText(
        header=header(text.stamp_ns, frame_id),
        turn_id=int(text.turn_id),
        unit_index=int(text.unit_index),
        text=text.text,
        end_of_turn=bool(text.end_of_turn),
        proactive=bool(text.proactive),
    )


def proactive_to_msg(event: ProactiveEvent, frame_id: str = "omni") -> ProactiveAction:
    """:class:`ProactiveEvent` -> ``omni_ros_msgs/ProactiveAction``."""
    return ProactiveAction(
        header=header(event.stamp_ns, frame_id),
        turn_id=int(event.turn_id),
        kind=event.kind,
        text=event.text,
        confidence=float(event.confidence),
        trigger_stamp=ns_to_stamp(event.trigger_stamp_ns),
    )


def state_to_msg(state: StateOut, frame_id: str = "omni") -> OmniState:
    """:class:`StateOut` -> ``omni_ros_msgs/OmniState`` (the counters the message has room for;
    every counter is in :func:`diagnostic_status`)."""
    counters = state.counters
    return OmniState(
        header=header(state.stamp_ns, frame_id),
        mode=int(state.mode),
        unit_index=max(0, int(state.unit_index)),  # -1 (no unit yet, e.g. a failed prepare): 0
        unit_compute_ms=float(state.unit_compute_ms),
        real_time_factor=float(state.real_time_factor),
        dropped_frames=int(counters.dropped_frames),
        dropped_audio_samples=int(counters.dropped_audio_samples),
        late_messages=int(counters.late_messages),
        gap_samples_filled=int(counters.gap_samples_filled),
        backend=state.backend,
        turn_id=int(state.turn_id),
        user_speaking=bool(state.user_speaking),
        playing=bool(state.playing),
        barge_ins=int(counters.barge_ins),
        error=state.error,
        audio_samples_in=int(counters.audio_samples_in),
        audio_samples_used=int(counters.audio_samples_used),
        audio_drop_causes=list(counters.audio_drops()),
        audio_drop_samples=[int(v) for v in counters.audio_drops().values()],
        gap_fill_causes=list(counters.gap_fills()),
        gap_fill_samples=[int(v) for v in counters.gap_fills().values()],
        prompt_errors=int(counters.prompt_errors),
    )


def diagnostic_status(
    state: StateOut | None,
    previous: Counters | None = None,
    *,
    name: str = "omni_flow_node: Omni-Flow",
    hardware_id: str = "",
    latency_ms: float | None = None,
    extra: Mapping[str, str] | None = None,
    inactive_reason: str = "",
) -> DiagnosticStatus:
    """Summarise the loop's health as one ``diagnostic_msgs/DiagnosticStatus``.

    Level: ERROR when the session is in ``Mode.ERROR``; WARN when no unit has run yet, the loop
    is slower than real time (RTF > 1), or any :data:`WARN_COUNTERS` counter grew since
    ``previous`` (the counters of the last report; None compares against zero); OK otherwise.
    Values: backend, mode, unit index, turn, compute time, RTF, latency, every counter, ``extra``.

    Args:
        state: the latest state, or None if no unit has completed.
        previous: counters at the previous report, for rates.
        name: the status name (conventionally ``node: what``).
        hardware_id: e.g. the GPU or the backend host.
        latency_ms: time from a unit's end to its outputs, if known.
        extra: more key/values (e.g. lifecycle state, TensorRT per component).
        inactive_reason: message used when ``state`` is None.
    """
    values = [KeyValue(key=k, value=str(v)) for k, v in (extra or {}).items()]
    if state is None:
        return DiagnosticStatus(
            level=DiagnosticStatus.WARN,
            name=name,
            hardware_id=hardware_id,
            message=inactive_reason or "no unit has run yet",
            values=values,
        )
    now = state.counters.as_dict()
    before = previous.as_dict() if previous is not None else dict.fromkeys(now, 0)
    grown = [
        f"{key} +{now[key] - before.get(key, 0)}"
        for key in WARN_COUNTERS
        if now[key] > before.get(key, 0)
    ]
    problems = []
    if state.real_time_factor > 1.0:
        problems.append(f"slower than real time (RTF {state.real_time_factor:.2f})")
    problems.extend(grown)
    if state.mode == Mode.ERROR:
        level, message = DiagnosticStatus.ERROR, state.error or "backend error"
    elif problems:
        level, message = DiagnosticStatus.WARN, ", ".join(problems)
    else:
        level, message = DiagnosticStatus.OK, Mode(state.mode).name.lower()
    if state.mode == Mode.ERROR and problems:
        message += ": " + ", ".join(problems)
    pairs: dict[str, Any] = {
        "backend": state.backend,
        "mode": Mode(state.mode).name,
        "unit_index": state.unit_index,
        "turn_id": state.turn_id,
        "unit_compute_ms": f"{state.unit_compute_ms:.2f}",
        "real_time_factor": f"{state.real_time_factor:.3f}",
        "latency_ms": "" if latency_ms is None else f"{latency_ms:.1f}",
        "user_speaking": state.user_speaking,
        "playing": state.playing,
        "error": state.error,
        **now,
    }
    values = [KeyValue(key=k, value=str(v)) for k, v in pairs.items()] + values
    return DiagnosticStatus(
        level=level, name=name, hardware_id=hardware_id, message=message, values=values
    )


def component_diagnostic(status: Any, name: str, hardware_id: str = "") -> DiagnosticStatus:
    """A TensorRT component status (``omni_ros.tensorrt.diagnostics.ComponentStatus``, duck-typed
    so that this module never imports the TensorRT package) -> ``DiagnosticStatus``:
    OK when the engine runs, WARN on the torch fallback, with the reason as the message."""
    level = DiagnosticStatus.OK if status.using == "tensorrt" else DiagnosticStatus.WARN
    return DiagnosticStatus(
        level=level,
        name=name,
        hardware_id=hardware_id,
        message=f"{status.component}: {status.using} ({status.reason})",
        values=[KeyValue(key=k, value=str(v)) for k, v in status.as_key_values().items()],
    )
