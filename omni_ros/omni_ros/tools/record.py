"""``omni-ros record``: record live topics into a rosbag2 (mcap) without ``ros2 bag``.

Messages are taken serialized (``raw=True``: no Python deserialization) and written with the
receiving node's ROS time, which is sim time under ``use_sim_time``. The same :class:`TopicRecorder`
records the outputs in ``omni-ros replay --mode graph``.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omni_ros import topics
from omni_ros.core.errors import ConfigError
from omni_ros.tools.bagio import INPUT_TOPICS, OutputBag, offered_qos, qos_from_rclpy

#: What ``omni-ros record`` takes by default: every input and output of omni_flow_node (the topic
#: table's; omni/speech_flush and omni/user_speaking were missing from a hand-written list).
DEFAULT_TOPICS: tuple[str, ...] = (
    *(topic for topic, _types in INPUT_TOPICS.values()),
    *("/" + t.name.lstrip("/") for t in topics.TOPICS if t.publisher == "omni_flow_node"),
)


def message_class(type_name: str) -> Any:
    """``"omni_ros_msgs/msg/AudioChunk"`` -> the rclpy message class."""
    package, kind, name = [*type_name.split("/"), "", ""][:3]
    if kind != "msg" or not package or not name:
        raise ConfigError(f"not a message type: {type_name!r} (expected pkg/msg/Name)")
    try:
        return getattr(importlib.import_module(f"{package}.msg"), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"message type {type_name} is not installed: {exc}") from exc


def adapted_qos(node: Any, topic: str, default: Any) -> Any:
    """``default``, made best-effort / volatile where a current publisher offers only that.

    Like ``ros2 bag record``: a reliable subscription never matches a best-effort publisher (sensor
    data QoS, e.g. ``audio/mic``), and a transient-local one never matches a volatile publisher.
    """
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    infos = node.get_publishers_info_by_topic(topic)
    if not infos:
        return default
    qos = QoSProfile(
        depth=default.depth, reliability=default.reliability, durability=default.durability
    )
    if any(i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT for i in infos):
        qos.reliability = ReliabilityPolicy.BEST_EFFORT
    if any(i.qos_profile.durability == DurabilityPolicy.VOLATILE for i in infos):
        qos.durability = DurabilityPolicy.VOLATILE
    return qos


class TopicRecorder:
    """Records topics into an :class:`OutputBag` from a node's subscriptions (thread-safe writes).

    Args:
        node: the rclpy node that owns the subscriptions (spin it elsewhere).
        out: where to write.
        topics: topic -> ROS type name (``pkg/msg/Name``).
        latched: topics to subscribe with transient-local durability (e.g. ``/omni/state``).
    """

    def __init__(
        self, node: Any, out: OutputBag, topics: dict[str, str], latched: Iterable[str] = ()
    ) -> None:
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

        self.node = node
        self.out = out
        self.counts: dict[str, int] = dict.fromkeys(topics, 0)
        self._lock = threading.Lock()
        self._closed = False
        reliable = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
        durable = QoSProfile(
            depth=10,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        self._qos = {"reliable": reliable, "durable": durable}
        self._latched = set(latched)
        self.subscriptions: dict[str, Any] = {}
        for topic, type_name in topics.items():
            self.add(topic, type_name)

    def add(self, topic: str, type_name: str) -> None:
        """Start recording ``topic`` too (QoS adapted to its publishers as they are now)."""
        if topic in self.subscriptions:
            return
        self.counts.setdefault(topic, 0)
        qos = self._qos["durable" if topic in self._latched else "reliable"]
        self.subscriptions[topic] = self.node.create_subscription(
            message_class(type_name),
            topic,
            self._callback(topic, type_name),
            adapted_qos(self.node, topic, qos),
            raw=True,
        )

    def _callback(self, topic: str, type_name: str) -> Any:
        def write(raw: bytes) -> None:
            with self._lock:
                if self._closed:
                    return
                if not self.counts[topic]:  # the bag keeps what the publishers offer (QoS)
                    infos = self.node.get_publishers_info_by_topic(topic)
                    depth = offered_qos(topic).depth
                    self.out.offer(topic, [qos_from_rclpy(i.qos_profile, depth) for i in infos])
                self.out.write_raw(topic, type_name, self.node.get_clock().now().nanoseconds, raw)
                self.counts[topic] += 1

        return write

    def publisher_count(self, topic: str) -> int:
        return int(self.subscriptions[topic].get_publisher_count())

    def close(self) -> None:
        """Stop writing and close the bag (later messages are ignored)."""
        with self._lock:
            self._closed = True
            self.out.close()


def published_topics(node: Any, wanted: Iterable[str]) -> dict[str, str]:
    """Those of ``wanted`` that have a publisher in the ROS graph now: name -> type."""
    wanted = {t if t.startswith("/") else "/" + t for t in wanted}
    return {
        name: types[0]
        for name, types in node.get_topic_names_and_types()
        if name in wanted and types and node.count_publishers(name) > 0
    }


def record(
    out_dir: Path,
    topics: Iterable[str] = DEFAULT_TOPICS,
    duration_s: float | None = None,
    discover_s: float | None = None,
    use_sim_time: bool = False,
    poll_s: float = 0.5,
) -> dict[str, int]:
    """Record ``topics`` for ``duration_s`` (from the first topic found) or until Ctrl-C.

    Waits for the topics instead of giving up: recording starts as soon as the first of them has
    a publisher, and every other one is added the moment it appears (a node that is still loading
    its backend publishes its outputs only after configure).

    Args:
        discover_s: give up if none of the topics appears within this many seconds (None: wait
            until Ctrl-C).

    Returns:
        Messages recorded per topic, every requested topic included (0: never published).

    Raises:
        ConfigError: ``out_dir`` exists, or none of the topics appeared within ``discover_s``.
    """
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    if out_dir.exists():
        raise ConfigError(f"{out_dir} exists: choose a new folder for the bag")
    if duration_s is not None and duration_s <= 0:
        raise ConfigError(f"--duration must be > 0 s, got {duration_s}")
    wanted = [t if t.startswith("/") else "/" + t for t in topics]
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node(
        "omni_ros_record",
        context=context,
        parameter_overrides=[Parameter("use_sim_time", value=use_sim_time)],
    )
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    recorder: TopicRecorder | None = None
    started = time.monotonic()
    end: float | None = None
    next_poll = started
    try:
        print(f"waiting for {', '.join(wanted)} (Ctrl-C to stop)", flush=True)
        try:
            while end is None or time.monotonic() < end:
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + poll_s
                    found = published_topics(node, wanted)
                    if recorder is None and found:
                        recorder = TopicRecorder(node, OutputBag(out_dir), {}, ["/omni/state"])
                        end = None if duration_s is None else time.monotonic() + duration_s
                        print(f"recording into {out_dir}", flush=True)
                    for topic, type_name in sorted(found.items()):
                        if recorder is not None and topic not in recorder.subscriptions:
                            recorder.add(topic, type_name)
                            print(f"  + {topic} ({type_name})", flush=True)
                    if recorder is None and discover_s is not None and now - started > discover_s:
                        raise ConfigError(
                            f"none of {wanted} is being published (waited {discover_s:g} s)"
                        )
                executor.spin_once(timeout_sec=0.05)
        except KeyboardInterrupt:
            pass
        counts = dict.fromkeys(wanted, 0)
        if recorder is not None:
            counts.update(recorder.counts)
        return counts
    finally:
        if recorder is not None:
            recorder.close()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
