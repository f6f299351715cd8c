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

from omni_ros.core.errors import ConfigError
from omni_ros.tools.bagio import INPUT_TOPICS, OutputBag

#: What ``omni-ros record`` takes by default: every input and output of omni_flow_node.
DEFAULT_TOPICS: tuple[str, ...] = (
    *(topic for topic, _types in INPUT_TOPICS.values()),
    "/omni/speech",
    "/omni/text",
    "/omni/proactive",
    "/omni/state",
    "/diagnostics",
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
        latched = set(latched)
        self.subscriptions = {
            topic: node.create_subscription(
                message_class(type_name),
                topic,
                self._callback(topic, type_name),
                adapted_qos(node, topic, durable if topic in latched else reliable),
                raw=True,
            )
            for topic, type_name in topics.items()
        }

    def _callback(self, topic: str, type_name: str) -> Any:
        def write(raw: bytes) -> None:
            with self._lock:
                if self._closed:
                    return
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


def discover(node: Any, wanted: Iterable[str], wait_s: float) -> dict[str, str]:
    """Wait up to ``wait_s`` for ``wanted`` topics to appear in the ROS graph; name -> type."""
    wanted = [t if t.startswith("/") else "/" + t for t in wanted]
    deadline = time.monotonic() + wait_s
    found: dict[str, str] = {}
    while True:
        for name, types in node.get_topic_names_and_types():
            if name in wanted and types:
                found[name] = types[0]
        if len(found) == len(wanted) or time.monotonic() >= deadline:
            return found
        time.sleep(0.1)


def record(
    out_dir: Path,
    topics: Iterable[str] = DEFAULT_TOPICS,
    duration_s: float | None = None,
    discover_s: float = 3.0,
    use_sim_time: bool = False,
) -> dict[str, int]:
    """Record ``topics`` (those that exist within ``discover_s``) until ``duration_s`` or Ctrl-C."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    if out_dir.exists():
        raise ConfigError(f"{out_dir} exists: choose a new folder for the bag")
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
    try:
        found = discover(node, topics, discover_s)
        if not found:
            raise ConfigError(f"none of {list(topics)} is being published (waited {discover_s} s)")
        recorder = TopicRecorder(node, OutputBag(out_dir), found, latched=["/omni/state"])
        print(f"recording {sorted(found)} into {out_dir} (Ctrl-C to stop)")
        end = None if duration_s is None else time.monotonic() + duration_s
        try:
            while end is None or time.monotonic() < end:
                executor.spin_once(timeout_sec=0.1)
        except KeyboardInterrupt:
            pass
        return dict(recorder.counts)
    finally:
        if recorder is not None:
            recorder.close()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
