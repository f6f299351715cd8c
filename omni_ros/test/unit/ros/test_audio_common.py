"""audio_common messages (both forks) become the core's RawAudio; graph advice for robot drivers.

Messages are built as plain objects with the forks' field names (the layouts in
``test/interfaces/*/audio_common_msgs/msg``), so no ROS is needed; the same converters run on
rclpy messages in ``test/ros/test_audio_common_live.py`` and on rosbags messages in
``test/bags/test_audio_common_bags.py``.
"""

from __future__ import annotations

from types import SimpleNamespace as Msg

import numpy as np
import pytest
from omni_ros.core.audio import decode_audio
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.ros import audio_common as ac
from omni_ros.ros.graph_advice import advise

RATE = 16_000


def _header(stamp_ns: int = 1_700_000_000_250_000_000) -> Msg:
    return Msg(stamp=Msg(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id="robot_mic")


def _stamped(fmt: int, field: str, samples: np.ndarray, channels: int = 1) -> Msg:
    """mgonzs13's AudioStamped: header + audio{audio_data{5 arrays}, info{format, channels, rate, chunk}}."""
    arrays = {
        f: np.zeros(0)
        for f in ("float32_data", "int32_data", "int16_data", "int8_data", "uint8_data")
    }
    arrays[field] = samples
    info = Msg(format=fmt, channels=channels, rate=RATE, chunk=len(samples) // channels)
    return Msg(header=_header(), audio=Msg(audio_data=Msg(**arrays), info=info))


RAMP = np.linspace(-0.5, 0.5, 320)


@pytest.mark.parametrize(
    ("fmt", "field", "samples", "encoding"),
    [
        (0x08, "int16_data", (RAMP * 32767).astype(np.int16), "S16LE"),  # paInt16 (its default)
        (0x01, "float32_data", RAMP.astype(np.float32), "F32LE"),  # paFloat32
        (0x02, "int32_data", (RAMP * 2**31).astype(np.int32), "F32LE"),  # paInt32
        (0x10, "int8_data", (RAMP * 127).astype(np.int8), "S16LE"),  # paInt8
        (0x20, "uint8_data", (RAMP * 127 + 128).astype(np.uint8), "S16LE"),  # paUInt8
    ],
)
def test_every_portaudio_format_of_audio_stamped_decodes_to_the_same_signal(
    fmt: int, field: str, samples: np.ndarray, encoding: str
) -> None:
    raw = ac.audio_stamped_to_raw(_stamped(fmt, field, samples))
    assert (raw.sample_rate, raw.channels, raw.encoding) == (RATE, 1, encoding)
    assert raw.stamp_ns == 1_700_000_000_250_000_000
    assert raw.source == "robot_mic"
    block = decode_audio(raw)
    assert np.allclose(block.samples, RAMP, atol=1 / 50), "8-bit formats: one step is 1/128"


def test_interleaved_stereo_keeps_its_channel_count() -> None:
    stereo = np.stack([RAMP, -RAMP], axis=1).reshape(-1)
    raw = ac.audio_stamped_to_raw(_stamped(0x01, "float32_data", stereo.astype(np.float32), 2))
    assert raw.channels == 2
    assert len(raw.data) == 4 * len(stereo)


def test_an_unknown_portaudio_format_uses_the_one_filled_array_or_says_what_is_read() -> None:
    raw = ac.audio_stamped_to_raw(_stamped(0x04, "int16_data", np.ones(10, np.int16)))
    assert raw.encoding == "S16LE"
    empty = _stamped(0x04, "int16_data", np.zeros(0, np.int16))
    with pytest.raises(DecodeError, match="PortAudio"):
        ac.audio_stamped_to_raw(empty)


def _data_stamped(pcm: bytes) -> Msg:
    """ros-drivers' AudioDataStamped: header + audio{uint8[] data}."""
    return Msg(header=_header(), audio=Msg(data=np.frombuffer(pcm, np.uint8)))


def _info(**fields: object) -> Msg:
    base = {
        "channels": 1,
        "sample_rate": RATE,
        "sample_format": "S16LE",
        "bitrate": 0,
        "coding_format": "wave",
    }
    return Msg(**{**base, **fields})


@pytest.mark.parametrize(
    ("sample_format", "dtype"),
    [
        ("S16LE", "<i2"),
        ("S16BE", ">i2"),
        ("S32LE", "<i4"),
        ("F32LE", "<f4"),
        ("U8", "u1"),
        ("S8", "i1"),
    ],
)
def test_audio_data_stamped_decodes_with_the_format_from_audio_info(
    sample_format: str, dtype: str
) -> None:
    kind, size = np.dtype(dtype).kind, np.dtype(dtype).itemsize
    if kind == "f":
        samples = RAMP.astype(dtype)
    elif kind == "u":
        samples = (RAMP * 127 + 128).astype(dtype)
    else:
        samples = (RAMP * (2 ** (8 * size - 1) - 1)).astype(dtype)
    tracker = ac.InfoTracker(None, "/audio_info")
    assert tracker.convert(_data_stamped(samples.tobytes())) is None, "no format yet: dropped"
    assert tracker.dropped == 1
    assert "audio_info" in tracker.why_dropped()
    tracker.on_info(_info(sample_format=sample_format))
    raw = tracker.convert(_data_stamped(samples.tobytes()))
    assert raw is not None
    assert raw.stamp_ns == 1_700_000_000_250_000_000
    assert np.allclose(decode_audio(raw).samples, RAMP, atol=1 / 50)


def test_mp3_audio_info_is_refused_with_the_fix_and_the_fallback_format_is_not_used() -> None:
    tracker = ac.InfoTracker(ac.parse_format("16000:1:S16LE"), "/audio_info")
    tracker.on_info(_info(coding_format="mp3"))
    assert tracker.convert(_data_stamped(b"\0\0" * 10)) is None
    assert "format:=wave" in tracker.why_dropped()


def test_the_fallback_format_serves_until_audio_info_arrives() -> None:
    tracker = ac.InfoTracker(ac.parse_format("48000:2:S16LE"), "/audio_info")
    raw = tracker.convert(_data_stamped(b"\0\0" * 20))
    assert raw is not None
    assert (raw.sample_rate, raw.channels) == (48_000, 2)
    tracker.on_info(_info())
    raw = tracker.convert(_data_stamped(b"\0\0" * 20))
    assert raw is not None
    assert (raw.sample_rate, raw.channels) == (RATE, 1)


def test_a_partial_sample_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="whole number"):
        ac.audio_data_stamped_to_raw(_data_stamped(b"\0\0\0"), ac.parse_format("16000:1:S16LE"))  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["16000", "16000:1", "x:1:S16LE", "16000:0:S16LE", "16000:1:MP3"])
def test_a_malformed_mic_format_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        ac.parse_format(text)


def test_a_missing_message_package_names_the_fix() -> None:
    with pytest.raises(ConfigError, match="ros-drivers") as excinfo:
        ac.message_class("audio_common_msgs/msg/AudioDataStamped")  # not installed here
    assert "install" in str(excinfo.value)


# ------------------------------------------------------------------------------- graph advice
def _graph(topics: dict[str, list[str]], publishers: dict[str, int]) -> tuple[list, object]:
    return list(topics.items()), lambda name: publishers.get(name, 0)


def test_a_realsense_camera_is_recognised_and_the_remap_named() -> None:
    topics, pubs = _graph(
        {
            "/camera/camera/color/image_raw": ["sensor_msgs/msg/Image"],
            "/camera/camera/depth/image_rect_raw": ["sensor_msgs/msg/Image"],
            "/camera/image_raw": ["sensor_msgs/msg/Image"],
        },
        {"/camera/camera/color/image_raw": 1, "/camera/camera/depth/image_rect_raw": 1},
    )
    (text,) = advise(
        topics, pubs, "/camera/image_raw", "sensor_msgs/msg/Image", "/audio/mic", ac.AUDIO_CHUNK
    )
    assert "audio-only" in text
    assert "RealSense" in text
    assert "camera/image_raw:=/camera/camera/color/image_raw" in text


def test_usb_cam_compressed_output_suggests_the_compressed_input() -> None:
    topics, pubs = _graph(
        {"/image_raw/compressed": ["sensor_msgs/msg/CompressedImage"]}, {"/image_raw/compressed": 1}
    )
    (text,) = advise(
        topics, pubs, "/camera/image_raw", "sensor_msgs/msg/Image", "/audio/mic", ac.AUDIO_CHUNK
    )
    assert "usb_cam" in text
    assert "camera.compressed:=true" in text


def test_no_advice_when_the_inputs_are_published_as_subscribed() -> None:
    topics, pubs = _graph(
        {
            "/camera/image_raw": ["sensor_msgs/msg/Image"],
            "/audio/mic": [ac.AUDIO_CHUNK],
            "/image_raw": ["sensor_msgs/msg/Image"],
        },
        {"/camera/image_raw": 1, "/audio/mic": 1, "/image_raw": 1},
    )
    assert (
        advise(
            topics, pubs, "/camera/image_raw", "sensor_msgs/msg/Image", "/audio/mic", ac.AUDIO_CHUNK
        )
        == []
    )


def test_a_mic_of_another_type_names_the_mic_type_to_set() -> None:
    topics, pubs = _graph(
        {"/audio/mic": [ac.AUDIO_STAMPED]}, {"/audio/mic": 1, "/camera/image_raw": 1}
    )
    (text,) = advise(
        topics, pubs, "/camera/image_raw", "sensor_msgs/msg/Image", "/audio/mic", ac.AUDIO_CHUNK
    )
    assert f"mic.type:={ac.AUDIO_STAMPED}" in text


def test_an_audio_common_topic_elsewhere_names_the_remap_and_type() -> None:
    topics, pubs = _graph(
        {"/audio_stamped": [ac.AUDIO_DATA_STAMPED]}, {"/audio_stamped": 1, "/camera/image_raw": 1}
    )
    (text,) = advise(
        topics, pubs, "/camera/image_raw", "sensor_msgs/msg/Image", "/audio/mic", ac.AUDIO_CHUNK
    )
    assert "audio/mic:=/audio_stamped" in text
    assert f"mic.type:={ac.AUDIO_DATA_STAMPED}" in text
