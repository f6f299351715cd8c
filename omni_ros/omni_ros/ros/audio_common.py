"""Robot audio from audio_common, both forks, as the core's :class:`RawAudio`.

Two ROS 2 packages are called ``audio_common_msgs`` and both name a different ``AudioData``:

- **mgonzs13/audio_common** (Humble to Rolling): ``audio_common_msgs/msg/AudioStamped``
  (``header``, ``audio: Audio``; ``Audio`` = ``audio_data: AudioData`` + ``info: AudioInfo``).
  ``AudioData`` holds the samples in the one array that matches ``info.format``, a PortAudio sample
  format flag (``float32_data`` paFloat32=1, ``int32_data`` paInt32=2, ``int16_data`` paInt16=8,
  ``int8_data`` paInt8=16, ``uint8_data`` paUInt8=32); ``info`` also gives ``channels``, ``rate``
  and ``chunk``. Every message carries its format. Its ``audio_capturer_node`` stamps the header
  just before the blocking read of the chunk (``audio_capturer_node.cpp``, ``work()``), i.e. at
  the capture time of the chunk's first sample: the stamp convention of ``omni_ros_msgs/AudioChunk``.
- **ros-drivers/audio_common** (ros2 branch): ``audio_common_msgs/msg/AudioDataStamped``
  (``header``, ``audio: AudioData``; ``AudioData`` = ``uint8[] data``). The format is on a separate
  topic, ``audio_info`` (``AudioInfo``: ``channels``, ``sample_rate``, ``sample_format`` e.g.
  ``S16LE``, ``bitrate``, ``coding_format`` ``wave`` or ``mp3``), which ``audio_capture_node``
  publishes at start and then every 5 s (volatile, depth 1). The stamp is GStreamer's base time +
  the buffer's PTS (``onNewBuffer``), the capture time of the buffer's first sample. Only
  ``coding_format: wave`` (raw PCM) can be used; mp3 is refused with the fix.

The converters here read fields by name, so they work on rclpy messages and on rosbags' message
objects alike (``omni-ros replay`` uses them on bags); only :func:`mic_subscriptions` needs rclpy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from omni_ros import topics
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.core.types import RawAudio

AUDIO_CHUNK = "omni_ros_msgs/msg/AudioChunk"
AUDIO_STAMPED = "audio_common_msgs/msg/AudioStamped"  # mgonzs13/audio_common
AUDIO_DATA_STAMPED = "audio_common_msgs/msg/AudioDataStamped"  # ros-drivers/audio_common
AUDIO_INFO = "audio_common_msgs/msg/AudioInfo"

#: Message type of ``audio/mic`` -> where it comes from (the ``mic.type`` parameter's values).
MIC_TYPES: dict[str, str] = {
    AUDIO_CHUNK: "omni_ros (mic_node)",
    AUDIO_STAMPED: "mgonzs13/audio_common (audio_capturer_node; the format is in every message)",
    AUDIO_DATA_STAMPED: "ros-drivers/audio_common (audio_capture; the format is on audio_info)",
}

#: What installs each type (named in errors).
INSTALL_HINT: dict[str, str] = {
    AUDIO_STAMPED: (
        "build mgonzs13/audio_common (its audio_common_msgs) in your workspace and source it"
    ),
    AUDIO_DATA_STAMPED: (
        "install ros-drivers' audio_common_msgs (apt: ros-$ROS_DISTRO-audio-common-msgs) or build "
        "ros-drivers/audio_common (ros2 branch) in your workspace, and source it"
    ),
}

#: PortAudio sample format flags (portaudio.h) -> (AudioData field, numpy dtype).
PA_FORMATS: dict[int, tuple[str, str]] = {
    0x01: ("float32_data", "<f4"),  # paFloat32
    0x02: ("int32_data", "<i4"),  # paInt32
    0x08: ("int16_data", "<i2"),  # paInt16
    0x10: ("int8_data", "i1"),  # paInt8
    0x20: ("uint8_data", "u1"),  # paUInt8
}

#: GStreamer raw audio formats of ros-drivers' ``sample_format`` -> numpy dtype.
GST_FORMATS: dict[str, str] = {
    "S16LE": "<i2",
    "S16BE": ">i2",
    "S32LE": "<i4",
    "S32BE": ">i4",
    "F32LE": "<f4",
    "F32BE": ">f4",
    "S8": "i1",
    "U8": "u1",
}


@dataclass(frozen=True)
class StreamFormat:
    """The format of a raw PCM stream whose messages do not carry it (ros-drivers' AudioData).

    Attributes:
        sample_rate: samples per second per channel.
        channels: interleaved channel count.
        sample_format: a GStreamer raw format, one of :data:`GST_FORMATS` (e.g. ``S16LE``).
    """

    sample_rate: int
    channels: int
    sample_format: str

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.channels <= 0:
            raise ConfigError(f"audio format needs a rate and channels > 0, got {self}")
        if self.sample_format not in GST_FORMATS:
            raise ConfigError(
                f"sample_format {self.sample_format!r} unsupported; use one of {sorted(GST_FORMATS)}"
            )


def parse_format(text: str) -> StreamFormat | None:
    """``"16000:1:S16LE"`` (the ``mic.format`` parameter) -> :class:`StreamFormat`; "" -> None.

    Raises:
        ConfigError: not ``RATE:CHANNELS:SAMPLE_FORMAT``.
    """
    if not text.strip():
        return None
    parts = text.strip().split(":")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ConfigError(
            f"audio format {text!r}: expected RATE:CHANNELS:SAMPLE_FORMAT, e.g. 16000:1:S16LE"
        )
    return StreamFormat(int(parts[0]), int(parts[1]), parts[2].upper())


def info_to_format(info: Any) -> StreamFormat:
    """ros-drivers' ``AudioInfo`` -> :class:`StreamFormat`.

    Raises:
        DecodeError: compressed audio (``coding_format: mp3``) or an unsupported sample format;
            the message says what to set on the capture node.
    """
    coding = str(getattr(info, "coding_format", "") or "wave").lower()
    if coding not in ("wave", "wav", "raw", "pcm"):
        raise DecodeError(
            f"audio_info says coding_format {coding!r}: only raw PCM can be listened to; "
            "start audio_capture with format:=wave (its default is mp3)"
        )
    try:
        return StreamFormat(
            int(info.sample_rate), int(info.channels), str(info.sample_format).upper()
        )
    except ConfigError as exc:
        raise DecodeError(f"audio_info: {exc}") from exc


def _stamp_ns(msg: Any) -> int:
    return int(msg.header.stamp.sec) * NS_PER_S + int(msg.header.stamp.nanosec)


def _as_pcm(samples: Any, dtype: str) -> tuple[str, bytes]:
    """Samples of ``dtype`` -> (core encoding, bytes): 16-bit and 8-bit as S16LE, the rest F32LE."""
    array = np.asarray(samples).astype(dtype, copy=False)
    kind, size = np.dtype(dtype).kind, np.dtype(dtype).itemsize
    if kind == "f":
        return "F32LE", array.astype("<f4").tobytes()
    if kind == "u":  # unsigned 8-bit: 128 is silence
        return "S16LE", ((array.astype(np.int16) - 128) * 256).astype("<i2").tobytes()
    if size == 1:
        return "S16LE", (array.astype(np.int16) * 256).astype("<i2").tobytes()
    if size == 2:
        return "S16LE", array.astype("<i2").tobytes()
    return "F32LE", (array.astype(np.float64) / 2.0 ** (8 * size - 1)).astype("<f4").tobytes()


def audio_stamped_to_raw(msg: Any) -> RawAudio:
    """mgonzs13's ``AudioStamped`` -> :class:`RawAudio` (the format comes from ``audio.info``).

    Raises:
        DecodeError: an unknown PortAudio format with no samples in any array.
    """
    info, data = msg.audio.info, msg.audio.audio_data
    found = PA_FORMATS.get(int(info.format))
    if found is None:  # paInt24 or a custom value: take the one array that holds samples
        filled = [(f, d) for f, d in PA_FORMATS.values() if len(getattr(data, f))]
        if len(filled) != 1:
            raise DecodeError(
                f"AudioStamped format {int(info.format)} is no PortAudio format omni_ros reads "
                f"(paFloat32, paInt32, paInt16, paInt8, paUInt8)"
            )
        found = filled[0]
    field, dtype = found
    encoding, pcm = _as_pcm(getattr(data, field), dtype)
    return RawAudio(
        stamp_ns=_stamp_ns(msg),
        sample_rate=int(info.rate),
        channels=int(info.channels),
        encoding=encoding,
        data=pcm,
        source=str(msg.header.frame_id),
    )


def audio_data_stamped_to_raw(msg: Any, fmt: StreamFormat) -> RawAudio:
    """ros-drivers' ``AudioDataStamped`` + the stream's format -> :class:`RawAudio`.

    Raises:
        DecodeError: the payload is not a whole number of samples.
    """
    raw = bytes(np.asarray(msg.audio.data, dtype=np.uint8).tobytes())
    dtype = np.dtype(GST_FORMATS[fmt.sample_format])
    if len(raw) % dtype.itemsize:
        raise DecodeError(f"{len(raw)} bytes are no whole number of {fmt.sample_format} samples")
    encoding, pcm = _as_pcm(np.frombuffer(raw, dtype=dtype), dtype.str)
    return RawAudio(
        stamp_ns=_stamp_ns(msg),
        sample_rate=fmt.sample_rate,
        channels=fmt.channels,
        encoding=encoding,
        data=pcm,
        source=str(msg.header.frame_id),
    )


class InfoTracker:
    """The latest ``audio_info`` format of a ros-drivers stream, with a fallback and a count of
    chunks dropped while no format was known (each drop is logged through ``warn``, throttled by
    the caller)."""

    def __init__(self, fallback: StreamFormat | None, info_topic: str) -> None:
        self.fallback = fallback
        self.info_topic = info_topic
        self.current: StreamFormat | None = None
        self.error = ""
        self.dropped = 0

    def on_info(self, info: Any) -> None:
        try:
            self.current = info_to_format(info)
            self.error = ""
        except DecodeError as exc:
            self.current, self.error = None, str(exc)

    def convert(self, msg: Any) -> RawAudio | None:
        """The chunk as RawAudio, or None (dropped and counted) while the format is unknown."""
        fmt = self.current or (None if self.error else self.fallback)
        if fmt is None:
            self.dropped += 1
            return None
        return audio_data_stamped_to_raw(msg, fmt)

    def why_dropped(self) -> str:
        if self.error:
            return self.error
        return (
            f"no AudioInfo on {self.info_topic} yet (audio_capture publishes it every 5 s); "
            "if nothing publishes it, set mic.format:=RATE:CHANNELS:SAMPLE_FORMAT "
            "(e.g. 16000:1:S16LE)"
        )


def message_class(type_name: str) -> Any:
    """The installed rclpy class of ``type_name``; a ConfigError naming the fix if it is not."""
    package, _, name = type_name.partition("/msg/")
    try:
        return getattr(importlib.import_module(f"{package}.msg"), name)
    except (ImportError, AttributeError) as exc:
        hint = INSTALL_HINT.get(type_name, f"install the package that defines {type_name}")
        other = [t for t in INSTALL_HINT if t != type_name]
        raise ConfigError(
            f"mic.type {type_name} is not installed here ({exc}): {hint}. "
            f"(The other audio_common fork publishes {other[0]}; check with "
            f"`ros2 topic info -v <your audio topic>`.)"
        ) from exc


def mic_subscriptions(
    node: Any,
    mic_type: str,
    on_chunk: Callable[..., None],
    push: Callable[[RawAudio], None],
    qos: Any,
    info_topic: str = "audio_info",
    fallback_format: str = "",
) -> list[Any]:
    """The subscriptions that feed the microphone of ``node`` (relative topic ``audio/mic``).

    ``AudioChunk`` goes to ``on_chunk`` unchanged (the node's own callback, which may take rclpy's
    MessageInfo as a second argument); audio_common messages
    are converted here and handed to ``push``. A message that cannot be converted is logged
    (throttled) and counted in ``node``'s log, never raised into the executor.

    Raises:
        ConfigError: ``mic_type`` unknown, or its package is not installed (the message names
            the fix), or ``fallback_format`` is malformed.
    """
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    if mic_type not in MIC_TYPES:
        raise ConfigError(
            f"mic.type {mic_type!r} unknown; choose one of {sorted(MIC_TYPES)} "
            "(`ros2 topic info -v <your audio topic>` shows what the robot publishes)"
        )
    if mic_type == AUDIO_CHUNK:
        from omni_ros_msgs.msg import AudioChunk

        return [node.create_subscription(AudioChunk, topics.MIC.name, on_chunk, qos)]
    logger = node.get_logger()
    fallback = parse_format(fallback_format)
    cls = message_class(mic_type)
    if mic_type == AUDIO_STAMPED:

        def on_stamped(msg: Any) -> None:
            try:
                push(audio_stamped_to_raw(msg))
            except DecodeError as exc:
                logger.warning(f"AudioStamped dropped: {exc}", throttle_duration_sec=5.0)

        return [node.create_subscription(cls, topics.MIC.name, on_stamped, qos)]
    tracker = InfoTracker(fallback, info_topic)
    node.audio_info_tracker = tracker  # for diagnostics and tests

    def on_data(msg: Any) -> None:
        try:
            raw = tracker.convert(msg)
        except DecodeError as exc:
            tracker.dropped += 1
            logger.warning(f"AudioDataStamped dropped: {exc}", throttle_duration_sec=5.0)
            return
        if raw is None:
            logger.warning(
                f"{tracker.dropped} AudioDataStamped chunk(s) dropped: {tracker.why_dropped()}",
                throttle_duration_sec=5.0,
            )
            return
        push(raw)

    info_cls = message_class(AUDIO_INFO)
    # Volatile + reliable matches audio_capture's publisher (depth 1, republished every 5 s).
    info_qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
    return [
        node.create_subscription(cls, topics.MIC.name, on_data, qos),
        node.create_subscription(info_cls, info_topic, tracker.on_info, info_qos),
    ]
