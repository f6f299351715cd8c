"""Reading input bags and writing output bags with ``rosbags`` (no rosbag2_py needed).

Input topics are matched by name (``/audio/mic``, ``/camera/image_raw``, ``/camera/image_raw/compressed``,
``/robot_speaking``), remappable with ``FROM:=TO`` rules. The microphone may be either audio_common fork
(:mod:`omni_ros.ros.audio_common`): its messages are converted to ``AudioChunk`` while reading, with the
message definitions the bag carries (or the installed ``audio_common_msgs``), so both replay modes and
``ros2 bag``-free tools see one type. Messages are converted from rosbags' message
objects to the core's raw types here; field names are the ROS ones, so the same accessors would work on
rclpy messages (those are converted in ``omni_ros.ros.conversions``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rosbags.interfaces import (
    Qos,
    QosDurability,
    QosHistory,
    QosLiveliness,
    QosReliability,
    QosTime,
)
from rosbags.rosbag2 import Reader, StoragePlugin, Writer

from omni_ros import topics
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.core.types import RawAudio, RawImage
from omni_ros.ros import audio_common as ac
from omni_ros.tools.typestore import omni_typestore

_log = logging.getLogger("omni_ros.bags")


#: Input topic role -> (default topic, accepted message types)
INPUT_TOPICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mic": ("/" + topics.MIC.name, (ac.AUDIO_CHUNK, ac.AUDIO_STAMPED, ac.AUDIO_DATA_STAMPED)),
    "camera": ("/" + topics.CAMERA.name, (topics.CAMERA.type,)),
    "camera_compressed": ("/" + topics.CAMERA_COMPRESSED.name, (topics.CAMERA_COMPRESSED.type,)),
    "robot_speaking": ("/" + topics.ROBOT_SPEAKING.name, (topics.ROBOT_SPEAKING.type,)),
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
#: matching): the topic table's offers. ``ros2 bag play`` republishes with these, so a latched
#: (transient-local) subscriber of ``omni/state`` gets the last state.
OFFERED_QOS: dict[str, Qos] = {
    t.name.strip("/"): qos(t.depth, reliable=t.reliable, transient_local=t.latched)
    for t in topics.TOPICS
}
DEFAULT_QOS = qos(10)


def offered_qos(topic: str) -> Qos:
    """The profile omni_ros' publisher of ``topic`` offers (reliable, depth 10 if unknown)."""
    known = topics.find(topic)
    return OFFERED_QOS[known.name.strip("/")] if known is not None else DEFAULT_QOS


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
        return QosTime(ns // NS_PER_S, ns % NS_PER_S)

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
    return int(msg.header.stamp.sec) * NS_PER_S + int(msg.header.stamp.nanosec)


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


def _register_bag_types(store: Any, conns: Sequence[Any], path: Path) -> None:
    """Register the message types of ``conns`` from the definitions the bag carries; else from an
    installed ``audio_common_msgs``; else a ConfigError naming the fix."""
    from rosbags.interfaces import MessageDefinitionFormat
    from rosbags.typesys import get_types_from_idl, get_types_from_msg

    for conn in conns:
        if conn.msgtype in store.fielddefs:
            continue
        text = conn.msgdef.data if conn.msgdef is not None else ""
        if text and conn.msgdef.format == MessageDefinitionFormat.MSG:
            store.register(get_types_from_msg(text, conn.msgtype))
        elif text and conn.msgdef.format == MessageDefinitionFormat.IDL:
            sep = "=" * 80 + "\n"  # several IDL files, as rosbags' AnyReader splits them
            for part in text.split(sep)[1:] if text.startswith(f"{sep}IDL: ") else [text]:
                store.register(
                    get_types_from_idl(part.split("\n", 1)[1] if part.startswith("IDL: ") else part)
                )
        elif not _register_installed(store, conn.msgtype):
            hint = ac.INSTALL_HINT.get(conn.msgtype, f"install the package of {conn.msgtype}")
            raise ConfigError(
                f"{conn.topic} in {path} is {conn.msgtype} but the bag carries no message "
                f"definitions (rosbag2 before Iron) and the package is not installed here: "
                f"{hint}, or re-record the bag on ROS 2 Iron or newer"
            )


def _register_installed(store: Any, msgtype: str) -> bool:
    """Register ``msgtype``'s package from its installed ``share/<pkg>/msg/*.msg`` (False: none)."""
    from rosbags.typesys import get_types_from_msg

    package = msgtype.split("/")[0]
    try:
        from ament_index_python.packages import get_package_share_directory

        msg_dir = Path(get_package_share_directory(package)) / "msg"
    except Exception:  # ament_index missing or the package not on AMENT_PREFIX_PATH
        return False
    types: dict[str, Any] = {}
    for msg_file in sorted(msg_dir.glob("*.msg")):
        types.update(get_types_from_msg(msg_file.read_text(), f"{package}/msg/{msg_file.stem}"))
    store.register(types)
    return msgtype in store.fielddefs


def _sibling(topic: str, name: str) -> str:
    parent = topic.rsplit("/", 1)[0]
    return f"{parent}/{name}"


class InputBag:
    """An input rosbag2 (mcap or sqlite3) seen through the topic roles omni_ros consumes.

    Args:
        path: the bag folder.
        remaps: bag topic -> expected topic (``/audio:=/audio/mic``).
        mic_format: ``RATE:CHANNELS:SAMPLE_FORMAT`` for a ros-drivers ``AudioDataStamped`` mic
            when the bag has no ``AudioInfo`` topic (the node's ``mic.format`` parameter).
    """

    def __init__(
        self, path: Path, remaps: dict[str, str] | None = None, mic_format: str = ""
    ) -> None:
        self.path = Path(path)
        if not (self.path / "metadata.yaml").exists() and not self.path.is_file():
            raise ConfigError(f"{self.path} is not a rosbag2 folder (no metadata.yaml)")
        self.remaps = dict(remaps or {})
        self.store = omni_typestore()
        self.info_topic = ""
        self.dropped_mic = 0
        self._tracker: ac.InfoTracker | None = None
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
            if "mic" in self.roles.values():
                self._prepare_audio_common(reader, mic_format)
        if "mic" not in self.roles.values():
            topics = self.topics()
            audio = {t: k for t, k in topics.items() if k in INPUT_TOPICS["mic"][1]}
            hint = " ".join(f"--remap {t}:=/audio/mic" for t in audio) or "--remap FROM:=/audio/mic"
            raise ConfigError(
                f"no microphone topic in {self.path}: expected {INPUT_TOPICS['mic'][0]} "
                f"(AudioChunk, AudioStamped or AudioDataStamped); the bag has {topics}; "
                f"remap with {hint}"
            )
        self.unmapped_cameras = self._unmapped_cameras()
        for topic, kind in self.unmapped_cameras.items():
            target = INPUT_TOPICS[
                "camera_compressed" if kind.endswith("CompressedImage") else "camera"
            ][0]
            _log.warning(
                "%s has camera topic %s (%s) that no remap maps; replaying audio-only. "
                "To see it: --remap %s:=%s",
                self.path,
                topic,
                kind,
                topic,
                target,
            )

    def _unmapped_cameras(self) -> dict[str, str]:
        if {"camera", "camera_compressed"} & set(self.roles.values()):
            return {}
        image_types = (*INPUT_TOPICS["camera"][1], *INPUT_TOPICS["camera_compressed"][1])
        return {t: k for t, k in self.topics().items() if k in image_types}

    def _prepare_audio_common(self, reader: Any, mic_format: str) -> None:
        """A fresh typestore with the bag's audio_common definitions; ros-drivers' format."""
        from rosbags.typesys import Stores, get_typestore

        mic_conns = [c for c in reader.connections if self.roles.get(c.topic) == "mic"]
        if all(c.msgtype == ac.AUDIO_CHUNK for c in mic_conns):
            return
        # Both forks name a different audio_common_msgs/msg/AudioData: never share a typestore.
        store = get_typestore(Stores.ROS2_KILTED)
        store.register(
            {k: v for k, v in omni_typestore().fielddefs.items() if k.startswith("omni_ros_msgs/")}
        )
        _register_bag_types(store, mic_conns, self.path)
        self.store = store
        if not any(c.msgtype == ac.AUDIO_DATA_STAMPED for c in mic_conns):
            return
        infos = [c for c in reader.connections if c.msgtype == ac.AUDIO_INFO and c.msgcount]
        siblings = [
            c for c in infos if any(c.topic == _sibling(m.topic, "audio_info") for m in mic_conns)
        ]
        chosen = siblings or (infos if len(infos) == 1 else [])
        fallback = ac.parse_format(mic_format)
        self._tracker = ac.InfoTracker(fallback, chosen[0].topic if chosen else "")
        if chosen:
            _register_bag_types(store, chosen[:1], self.path)
            self.info_topic = chosen[0].topic
            for conn, _t, raw in reader.messages(connections=chosen[:1]):
                self._tracker.on_info(store.deserialize_cdr(raw, conn.msgtype))
                break  # the first audio_info also covers the chunks recorded before it
            if self._tracker.current is not None:
                self._tracker.fallback = self._tracker.current
        elif fallback is None:
            topics = [c.topic for c in mic_conns]
            raise ConfigError(
                f"{topics} in {self.path} is AudioDataStamped (ros-drivers/audio_common), whose "
                f"format is on an audio_info topic, but the bag has "
                f"{'several AudioInfo topics ' + str([c.topic for c in infos]) if infos else 'none'}"
                "; record audio_info too, or give the format in --params: "
                "'omni_flow_node: {ros__parameters: {mic: {format: \"16000:1:S16LE\"}}}'"
            )

    def topics(self) -> dict[str, str]:
        with Reader(self.path) as reader:
            return {c.topic: c.msgtype for c in reader.connections}

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def _as_chunk(self, msgtype: str, msg: Any) -> tuple[Any, bytes] | None:
        """An audio_common message as (AudioChunk message, its CDR); None if it was dropped."""
        try:
            if msgtype == ac.AUDIO_STAMPED:
                audio: RawAudio | None = ac.audio_stamped_to_raw(msg)
            else:
                assert self._tracker is not None
                audio = self._tracker.convert(msg)
        except DecodeError as exc:
            audio = None
            _log.warning("%s: audio message dropped: %s", self.path, exc)
        if audio is None:
            self.dropped_mic += 1
            return None
        cls = self.store.types[ac.AUDIO_CHUNK]
        fields = {
            "header": msg.header,
            "sample_rate": audio.sample_rate,
            "channels": audio.channels,
            "encoding": audio.encoding,
            "data": np.frombuffer(audio.data, dtype=np.uint8),
        }
        # Fields a microphone has no value for (e.g. turn_id, set on speech only) stay 0.
        names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        chunk = cls(**{name: fields.get(name, 0) for name in names})
        return chunk, bytes(self.store.serialize_cdr(chunk, ac.AUDIO_CHUNK))

    def __iter__(self) -> Iterator[BagMessage]:
        with Reader(self.path) as reader:
            conns = [
                c for c in reader.connections if c.topic in self.roles or c.topic == self.info_topic
            ]
            for conn, log_ns, raw in reader.messages(connections=conns):
                if conn.topic == self.info_topic and self._tracker is not None:
                    self._tracker.on_info(self.store.deserialize_cdr(raw, conn.msgtype))
                    continue
                role = self.roles[conn.topic]
                msg = self.store.deserialize_cdr(raw, conn.msgtype)
                msgtype, data = conn.msgtype, bytes(raw)
                if role == "mic" and msgtype != ac.AUDIO_CHUNK:
                    converted = self._as_chunk(msgtype, msg)
                    if converted is None:
                        continue
                    (msg, data), msgtype = converted, ac.AUDIO_CHUNK
                yield BagMessage(role, int(log_ns), INPUT_TOPICS[role][0], msgtype, data, msg)


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
