"""A robot's bag with audio_common audio replays without code: the bag's own definitions are read.

The bags are written with rosbags from the two forks' message layouts
(``test/interfaces/*/audio_common_msgs/msg``); rosbags stores the definitions in the bag as
rosbag2 does since Iron, and omni_ros' reader has never seen those types before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omni_ros.core.audio import decode_audio
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError
from omni_ros.tools.bagio import InputBag, to_raw_audio
from omni_ros.tools.replay import replay
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

INTERFACES = Path(__file__).resolve().parents[1] / "interfaces"
RATE, CHUNK = 16_000, 800  # 50 ms chunks
SECONDS = 4
START_NS = 1_700_000_000 * NS_PER_S


def _store(fork: str) -> Any:
    store = get_typestore(Stores.ROS2_KILTED)
    types: dict[str, Any] = {}
    for path in sorted((INTERFACES / fork / "audio_common_msgs" / "msg").glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"audio_common_msgs/msg/{path.stem}"))
    store.register(types)
    return store


def _speech() -> np.ndarray:
    t = np.arange(RATE * SECONDS) / RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 0.5 * t))).astype(
        np.float32
    )


def _header(store: Any, stamp_ns: int) -> Any:
    t = store.types
    return t["std_msgs/msg/Header"](
        stamp=t["builtin_interfaces/msg/Time"](
            sec=stamp_ns // NS_PER_S, nanosec=stamp_ns % NS_PER_S
        ),
        frame_id="mic",
    )


def _write_mgonzs13(
    path: Path, topic: str = "/audio", storage: StoragePlugin = StoragePlugin.MCAP
) -> np.ndarray:
    store, t = _store("mgonzs13"), None
    t = store.types
    pcm = (_speech() * 32767).astype(np.int16)
    with Writer(path, version=8, storage_plugin=storage) as writer:
        conn = writer.add_connection(topic, "audio_common_msgs/msg/AudioStamped", typestore=store)
        for i in range(0, len(pcm), CHUNK):
            stamp = START_NS + i * NS_PER_S // RATE
            data = t["audio_common_msgs/msg/AudioData"](
                float32_data=np.zeros(0, np.float32), int32_data=np.zeros(0, np.int32),
                int16_data=pcm[i : i + CHUNK], int8_data=np.zeros(0, np.int8), uint8_data=np.zeros(0, np.uint8),
            )  # fmt: skip
            info = t["audio_common_msgs/msg/AudioInfo"](
                format=8, channels=1, rate=RATE, chunk=CHUNK
            )
            msg = t["audio_common_msgs/msg/AudioStamped"](
                header=_header(store, stamp),
                audio=t["audio_common_msgs/msg/Audio"](audio_data=data, info=info),
            )
            writer.write(
                conn, stamp, store.serialize_cdr(msg, "audio_common_msgs/msg/AudioStamped")
            )
    return pcm


def _write_ros_drivers(path: Path, with_info: bool = True, info_delay_s: float = 1.0) -> np.ndarray:
    store = _store("ros_drivers")
    t = store.types
    pcm = (_speech() * 32767).astype("<i2")
    with Writer(path, version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection(
            "/audio_stamped", "audio_common_msgs/msg/AudioDataStamped", typestore=store
        )
        info_conn = writer.add_connection(
            "/audio_info", "audio_common_msgs/msg/AudioInfo", typestore=store
        )
        for i in range(0, len(pcm), CHUNK):
            stamp = START_NS + i * NS_PER_S // RATE
            if with_info and i == int(
                info_delay_s * RATE
            ):  # audio_capture: at start, then every 5 s
                info = t["audio_common_msgs/msg/AudioInfo"](
                    channels=1,
                    sample_rate=RATE,
                    sample_format="S16LE",
                    bitrate=0,
                    coding_format="wave",
                )
                writer.write(
                    info_conn, stamp, store.serialize_cdr(info, "audio_common_msgs/msg/AudioInfo")
                )
            data = t["audio_common_msgs/msg/AudioData"](
                data=np.frombuffer(pcm[i : i + CHUNK].tobytes(), np.uint8)
            )
            msg = t["audio_common_msgs/msg/AudioDataStamped"](
                header=_header(store, stamp), audio=data
            )
            writer.write(
                conn, stamp, store.serialize_cdr(msg, "audio_common_msgs/msg/AudioDataStamped")
            )
    return pcm


def _audio_from(bag: InputBag) -> tuple[np.ndarray, list[int]]:
    chunks = [m for m in bag if m.role == "mic"]
    assert all(m.msgtype == "omni_ros_msgs/msg/AudioChunk" for m in chunks)
    raws = [to_raw_audio(m.msg) for m in chunks]
    samples = np.concatenate([decode_audio(r).samples for r in raws])
    return samples, [r.stamp_ns for r in raws]


def test_an_audio_stamped_bag_reads_as_audio_chunks_with_every_sample_and_stamp(
    tmp_path: Path,
) -> None:
    pcm = _write_mgonzs13(tmp_path / "robot")
    bag = InputBag(tmp_path / "robot", {"/audio": "/audio/mic"})
    samples, stamps = _audio_from(bag)
    assert np.allclose(samples, pcm / 32768, atol=1e-4)
    assert stamps == [START_NS + i * NS_PER_S // RATE for i in range(0, len(pcm), CHUNK)]


def test_an_audio_data_stamped_bag_takes_its_format_from_audio_info_even_for_earlier_chunks(
    tmp_path: Path,
) -> None:
    pcm = _write_ros_drivers(tmp_path / "robot", info_delay_s=1.0)
    bag = InputBag(tmp_path / "robot", {"/audio_stamped": "/audio/mic"})
    assert bag.info_topic == "/audio_info"
    samples, _stamps = _audio_from(bag)
    assert len(samples) == len(pcm), "the chunks before the first audio_info are kept"
    assert bag.dropped_mic == 0


def test_an_audio_data_stamped_bag_without_audio_info_needs_mic_format(tmp_path: Path) -> None:
    _write_ros_drivers(tmp_path / "robot", with_info=False)
    with pytest.raises(ConfigError, match=r"mic: \{format"):
        InputBag(tmp_path / "robot", {"/audio_stamped": "/audio/mic"})
    bag = InputBag(tmp_path / "robot", {"/audio_stamped": "/audio/mic"}, mic_format="16000:1:S16LE")
    samples, _ = _audio_from(bag)
    assert len(samples) == RATE * SECONDS


def test_the_missing_mic_error_names_the_remap_for_the_audio_common_topic(tmp_path: Path) -> None:
    _write_mgonzs13(tmp_path / "robot")
    with pytest.raises(ConfigError, match="--remap /audio:=/audio/mic"):
        InputBag(tmp_path / "robot")


def test_a_bag_without_definitions_and_no_installed_package_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omni_ros.tools import bagio

    _write_mgonzs13(tmp_path / "robot")
    monkeypatch.setattr(bagio, "_register_installed", lambda store, msgtype: False)
    conn = type(
        "Conn",
        (),
        {"topic": "/audio", "msgtype": "audio_common_msgs/msg/AudioStamped", "msgdef": None},
    )()
    store = get_typestore(Stores.ROS2_KILTED)
    with pytest.raises(ConfigError, match="mgonzs13/audio_common"):
        bagio._register_bag_types(store, [conn], tmp_path / "robot")


def test_a_robot_bag_replays_like_the_same_audio_as_audio_chunks(tmp_path: Path) -> None:
    _write_mgonzs13(tmp_path / "robot")
    summary = replay(
        tmp_path / "robot", tmp_path / "out", mode="direct", remaps={"/audio": "/audio/mic"},
        progress=False, plot=False,
    )  # fmt: skip
    assert summary["units"] >= SECONDS - 1
    counters = summary["counters"]
    assert counters.get("decode_errors", 0) == 0
    assert counters.get("dropped_audio_samples", 0) == 0


def test_both_forks_in_one_process_do_not_clash(tmp_path: Path) -> None:
    _write_mgonzs13(tmp_path / "a")
    _write_ros_drivers(tmp_path / "b")
    first = _audio_from(InputBag(tmp_path / "a", {"/audio": "/audio/mic"}))[0]
    second = _audio_from(InputBag(tmp_path / "b", {"/audio_stamped": "/audio/mic"}))[0]
    assert len(first) == len(second)


def test_an_unmapped_camera_topic_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store("mgonzs13")
    _write_mgonzs13(tmp_path / "robot")
    # A second bag with a RealSense topic next to the audio.
    t = store.types
    with Writer(tmp_path / "cam", version=8, storage_plugin=StoragePlugin.MCAP) as writer:
        audio = writer.add_connection(
            "/audio", "audio_common_msgs/msg/AudioStamped", typestore=store
        )
        cam = writer.add_connection(
            "/camera/camera/color/image_raw", "sensor_msgs/msg/Image", typestore=store
        )
        data = t["audio_common_msgs/msg/AudioData"](
            float32_data=np.zeros(0, np.float32), int32_data=np.zeros(0, np.int32),
            int16_data=np.zeros(CHUNK, np.int16), int8_data=np.zeros(0, np.int8), uint8_data=np.zeros(0, np.uint8),
        )  # fmt: skip
        info = t["audio_common_msgs/msg/AudioInfo"](format=8, channels=1, rate=RATE, chunk=CHUNK)
        msg = t["audio_common_msgs/msg/AudioStamped"](
            header=_header(store, START_NS),
            audio=t["audio_common_msgs/msg/Audio"](audio_data=data, info=info),
        )
        writer.write(
            audio, START_NS, store.serialize_cdr(msg, "audio_common_msgs/msg/AudioStamped")
        )
        image = t["sensor_msgs/msg/Image"](
            header=_header(store, START_NS), height=2, width=2, encoding="rgb8", is_bigendian=0, step=6,
            data=np.zeros(12, np.uint8),
        )  # fmt: skip
        writer.write(cam, START_NS, store.serialize_cdr(image, "sensor_msgs/msg/Image"))
    with caplog.at_level("WARNING", logger="omni_ros.bags"):
        bag = InputBag(tmp_path / "cam", {"/audio": "/audio/mic"})
    assert bag.unmapped_cameras == {"/camera/camera/color/image_raw": "sensor_msgs/msg/Image"}
    assert "--remap /camera/camera/color/image_raw:=/camera/image_raw" in caplog.text
    mapped = InputBag(
        tmp_path / "cam",
        {"/audio": "/audio/mic", "/camera/camera/color/image_raw": "/camera/image_raw"},
    )
    assert mapped.unmapped_cameras == {}
