"""Reading input bags and writing output bags with ``rosbags`` (no rosbag2_py needed).

Input topics are matched by name (``/audio/mic``, ``/camera/image_raw``, ``/camera/image_raw/compressed``,
``/robot_speaking``), remappable with ``FROM:=TO`` rules. Messages are converted from rosbags' message
objects to the core's raw types here; field names are the ROS ones, so the same accessors would work on
rclpy messages (those are converted in ``omni_ros.ros.conversions``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosbags.rosbag2 import Reader, StoragePlugin, Writer

from omni_ros.core.errors import ConfigError
from omni_ros.core.types import RawAudio, RawImage
from omni_ros.tools.typestore import omni_typestore

NS = 1_000_000_000

#: Input topic role -> (default topic, accepted message types)
INPUT_TOPICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mic": ("/audio/mic", ("omni_ros_msgs/msg/AudioChunk",)),
    "camera": ("/camera/image_raw", ("sensor_msgs/msg/Image",)),
    "camera_compressed": ("/camera/image_raw/compressed", ("sensor_msgs/msg/CompressedImage",)),
    "robot_speaking": ("/robot_speaking", ("std_msgs/msg/Bool",)),
}


def parse_remaps(rules: Sequence[str]) -> dict[str, str]:
    """``["/mic:=/audio/mic"]`` -> ``{"/mic": "/audio/mic"}`` (bag topic -> expected topic)."""
    remaps: dict[str, str] = {}
    for rule in rules:
        src, sep, dst = rule.partition(":=")
        if not sep or not src or not dst:
            raise ConfigError(f"bad remap {rule!r}: expected FROM:=TO, e.g. /mic:=/audio/mic")
        remaps[src if src.startswith("/") else "/" + src] = (
            dst if dst.startswith("/") else "/" + dst
        )
    return remaps


def stamp_ns(msg: Any) -> int:
    """``header.stamp`` of a rosbags message in nanoseconds."""
    return int(msg.header.stamp.sec) * NS + int(msg.header.stamp.nanosec)


def to_raw_audio(msg: Any) -> RawAudio:
    return RawAudio(
        stamp_ns=stamp_ns(msg),
        sample_rate=int(msg.sample_rate),
        channels=int(msg.channels),
        encoding=str(msg.encoding),
        data=bytes(msg.data),
        source=str(msg.header.frame_id),
    )


def to_raw_image(msg: Any) -> RawImage:
    return RawImage(
        stamp_ns=stamp_ns(msg),
        encoding=str(msg.encoding),
        data=bytes(msg.data),
        width=int(msg.width),
        height=int(msg.height),
        step=int(msg.step),
        is_bigendian=bool(msg.is_bigendian),
    )


def to_raw_compressed(msg: Any) -> RawImage:
    return RawImage(
        stamp_ns=stamp_ns(msg), encoding=str(msg.format), data=bytes(msg.data), compressed=True
    )


@dataclass(frozen=True)
class BagMessage:
    """One input message: its role, the bag's log time, the topic it will be published on, and data."""

    role: str
    log_ns: int
    topic: str
    msgtype: str
    raw: bytes
    msg: Any

    def to_core(self) -> RawAudio | RawImage | bool:
        if self.role == "mic":
            return to_raw_audio(self.msg)
        if self.role == "camera":
            return to_raw_image(self.msg)
        if self.role == "camera_compressed":
            return to_raw_compressed(self.msg)
        return bool(self.msg.data)


class InputBag:
    """An input rosbag2 (mcap or sqlite3) seen through the topic roles omni_ros consumes."""

    def __init__(self, path: Path, remaps: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        if not (self.path / "metadata.yaml").exists() and not self.path.is_file():
            raise ConfigError(f"{self.path} is not a rosbag2 folder (no metadata.yaml)")
        self.remaps = dict(remaps or {})
        self.store = omni_typestore()
        with Reader(self.path) as reader:
            self.start_ns = int(reader.start_time)
            self.end_ns = int(reader.end_time)
            self.message_count = 0
            self.roles: dict[str, str] = {}  # bag topic -> role
            by_topic = {INPUT_TOPICS[r][0]: r for r in INPUT_TOPICS}
            for conn in reader.connections:
                wanted = self.remaps.get(conn.topic, conn.topic)
                role = by_topic.get(wanted)
                if role is None:
                    continue
                if conn.msgtype not in INPUT_TOPICS[role][1]:
                    raise ConfigError(
                        f"topic {conn.topic} has type {conn.msgtype}; {role} needs {INPUT_TOPICS[role][1]}"
                    )
                self.roles[conn.topic] = role
                self.message_count += conn.msgcount
        if "mic" not in self.roles.values():
            topics = self.topics()
            raise ConfigError(
                f"no microphone topic in {self.path}: expected {INPUT_TOPICS['mic'][0]} "
                f"(AudioChunk); the bag has {topics}; remap with --remap FROM:=/audio/mic"
            )

    def topics(self) -> dict[str, str]:
        with Reader(self.path) as reader:
            return {c.topic: c.msgtype for c in reader.connections}

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def __iter__(self) -> Iterator[BagMessage]:
        with Reader(self.path) as reader:
            conns = [c for c in reader.connections if c.topic in self.roles]
            for conn, log_ns, raw in reader.messages(connections=conns):
                role = self.roles[conn.topic]
                msg = self.store.deserialize_cdr(raw, conn.msgtype)
                yield BagMessage(
                    role, int(log_ns), INPUT_TOPICS[role][0], conn.msgtype, bytes(raw), msg
                )


class OutputBag:
    """Writes serialized output messages into a rosbag2 folder with mcap storage."""

    def __init__(self, path: Path) -> None:
        self.store = omni_typestore()
        self._writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._conns: dict[str, Any] = {}

    def write_raw(self, topic: str, msgtype: str, log_ns: int, raw: bytes) -> None:
        conn = self._conns.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msgtype, typestore=self.store)
            self._conns[topic] = conn
        self._writer.write(conn, int(log_ns), raw)

    def write(self, topic: str, msgtype: str, log_ns: int, msg: Any) -> None:
        self.write_raw(topic, msgtype, log_ns, bytes(self.store.serialize_cdr(msg, msgtype)))

    def close(self) -> None:
        self._writer.close()
