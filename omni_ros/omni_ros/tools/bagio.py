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
from typing import Any, Literal

from rosbags.interfaces import (
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
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


# ------------------------------------------------------------------------------------ offered QoS
#: rosbag2 metadata version of every bag written here. Version 8 stores each topic's offered QoS
#: profiles as a YAML *string* with integer policies; version 9 (Kilted's own recorder) as a list.
#: ros2/rosbag2 ``rosbag2_storage/yaml.hpp`` (jazzy, kilted, rolling) decodes both
#: (``version >= 9``: list, ``version >= 4``: string); humble's ``metadata_io.cpp`` decodes only the
#: string (``node["offered_qos_profiles"].as<std::string>()``) and its ``qos.cpp`` reads the
#: policies with ``as<int>()``. So version 8 is the one every supported ``ros2 bag`` reads.
BAG_VERSION: Literal[8] = 8
_ZERO = QosTime(0, 0)  # rmw's "default" deadline / lifespan / lease: unset, as rclpy's profiles


def qos(
    depth: int,
    reliable: bool = True,
    transient_local: bool = False,
) -> Qos:
    """A keep-last QoS profile in rosbags' terms (what a publisher offers)."""
    return Qos(
        history=QosHistory.KEEP_LAST,
        depth=depth,
        reliability=QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
        durability=QosDurability.TRANSIENT_LOCAL if transient_local else QosDurability.VOLATILE,
        deadline=_ZERO,
        lifespan=_ZERO,
        liveliness=QosLiveliness.AUTOMATIC,
        liveliness_lease_duration=_ZERO,
        avoid_ros_namespace_conventions=False,
    )


#: What omni_ros' own publishers offer, by relative topic name (namespaces are stripped when
#: matching). ``ros2 bag play`` republishes with these, so a latched (transient-local) subscriber
#: of ``omni/state`` gets the last state. Keep in step with the nodes' publishers.
OFFERED_QOS: dict[str, Qos] = {
    "omni/speech": qos(50),  # omni_flow_node RELIABLE
    "omni/text": qos(50),
    "omni/proactive": qos(50),
    "omni/state": qos(1, transient_local=True),  # omni_flow_node LATCHED
    "diagnostics": qos(10),  # create_publisher(DiagnosticArray, "/diagnostics", 10)
    "audio/mic": qos(5, reliable=False),  # mic_node qos_profile_sensor_data
    "camera/image_raw": qos(5, reliable=False),  # camera drivers: sensor data
    "camera/image_raw/compressed": qos(5, reliable=False),
    "robot_speaking": qos(1, transient_local=True),  # speaker_node SPEAKING_QOS
}
DEFAULT_QOS = qos(10)


def offered_qos(topic: str) -> Qos:
    """The profile omni_ros' publisher of ``topic`` offers (reliable, depth 10 if unknown)."""
    name = topic.strip("/")
    for relative, profile in OFFERED_QOS.items():
        if name == relative or name.endswith("/" + relative):
            return profile
    return DEFAULT_QOS


def qos_from_rclpy(profile: Any, fallback_depth: int = 10) -> Qos:
    """An rclpy ``QoSProfile`` (e.g. from ``get_publishers_info_by_topic``) in rosbags' terms.

    rclpy's policy enums carry rmw's integer values, which are rosbags' (and rosbag2's) too.
    Discovery does not carry a remote publisher's history and depth (the graph reports UNKNOWN
    and 0); those become keep-last ``fallback_depth``. ``ros2 bag play`` takes only reliability
    and durability from the recorded offers (rosbag2_transport ``adapt_offer_to_recorded_offers``).
    """
    history = QosHistory(int(profile.history))
    depth = int(profile.depth)
    if history in (QosHistory.UNKNOWN, QosHistory.SYSTEM_DEFAULT) or depth <= 0:
        history, depth = QosHistory.KEEP_LAST, fallback_depth

    def time(duration: Any) -> QosTime:
        ns = int(getattr(duration, "nanoseconds", 0))
        if ns >= 2**63 - 1:  # rmw's infinite duration: rosbag2 writes it as {sec: 9223372036, ...}
            return QosTime(9223372036, 854775807)
        return QosTime(ns // NS, ns % NS)

    return Qos(
        history=history,
        depth=depth,
        reliability=QosReliability(int(profile.reliability)),
        durability=QosDurability(int(profile.durability)),
        deadline=time(profile.deadline),
        lifespan=time(profile.lifespan),
        liveliness=QosLiveliness(int(profile.liveliness)),
        liveliness_lease_duration=time(profile.liveliness_lease_duration),
        avoid_ros_namespace_conventions=bool(profile.avoid_ros_namespace_conventions),
    )


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
    """Writes serialized messages into a rosbag2 folder with mcap storage (metadata version 8).

    Every topic carries the QoS profiles its publishers offered: given with :meth:`offer` (a
    recorder takes them from the graph, as ``ros2 bag record`` does), else :func:`offered_qos`.
    """

    def __init__(self, path: Path) -> None:
        self.store = omni_typestore()
        self._writer = Writer(path, version=BAG_VERSION, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._conns: dict[str, Any] = {}
        self._offered: dict[str, list[Qos]] = {}

    def offer(self, topic: str, profiles: Sequence[Qos]) -> None:
        """The profiles ``topic``'s publishers offer (before its first message is written)."""
        if profiles:
            self._offered[topic] = list(profiles)

    def write_raw(self, topic: str, msgtype: str, log_ns: int, raw: bytes) -> None:
        conn = self._conns.get(topic)
        if conn is None:
            conn = self._writer.add_connection(
                topic,
                msgtype,
                typestore=self.store,
                offered_qos_profiles=self._offered.get(topic) or [offered_qos(topic)],
            )
            self._conns[topic] = conn
        self._writer.write(conn, int(log_ns), raw)

    def write(self, topic: str, msgtype: str, log_ns: int, msg: Any) -> None:
        self.write_raw(topic, msgtype, log_ns, bytes(self.store.serialize_cdr(msg, msgtype)))

    def close(self) -> None:
        self._writer.close()
