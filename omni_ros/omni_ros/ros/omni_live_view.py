"""``omni_live_view``: omni_flow_node's topics, live in Foxglove (``with_foxglove:=true``).

The node only translates: serialized messages from the ROS graph -> :class:`LiveView` (see
:mod:`omni_ros.tools.live_view`), which serves them over the Foxglove WebSocket protocol.

Topics are found generically: every topic in :data:`WATCHED` and every topic under ``omni/`` or
``speaker/`` (relative to the node's namespace) that has a publisher, checked once a second, so a
topic the node gains later (``omni/speech_flush``, ``speaker/playback``, ``omni/user_speaking``)
appears without a change here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rclpy.clock import Clock, ClockType
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from omni_ros import topics
from omni_ros.tools.live_view import DEFAULT_PORT, LiveView

PREFIXES = ("omni/", "speaker/")
#: Topics watched besides everything under omni/ and speaker/ (relative names).
WATCHED = tuple(t.name for t in topics.TOPICS if not t.name.startswith(PREFIXES))

#: Parameters: name -> (default, description).
PARAMETERS: dict[str, tuple[Any, str]] = {
    "host": ("127.0.0.1", "address the Foxglove WebSocket server binds (loopback by default)"),
    "port": (DEFAULT_PORT, "its TCP port"),
    "unit_ms": (1000, "Omni-Flow unit length [ms]: the real-time budget shown beside compute"),
    "backend_deadline_ms": (5000, "flow.backend_deadline_ms of the node (shown as well)"),
    "frame_policy": ("last", "timeline.frame_policy of the node: which frame the model saw"),
}


class TopicBridge:
    """Raw subscriptions of ``node`` to the watched topics, each message handed to ``view``.

    Args:
        node: the node that owns the subscriptions (spun elsewhere).
        view: where the messages go.
        watched: topic names (relative ones resolve in the node's namespace).
        prefixes: every topic under these (relative) prefixes is watched too.
        period_s: how often the graph is checked for new topics (steady time: also while a
            replayed bag's clock stands still).
    """

    def __init__(
        self,
        node: Node,
        view: LiveView,
        watched: Iterable[str] = WATCHED,
        prefixes: Iterable[str] = PREFIXES,
        period_s: float = 1.0,
    ) -> None:
        self.node, self.view = node, view
        self.watched = {self._resolve(t) for t in watched}
        self.prefixes = tuple(self._resolve(p) for p in prefixes)
        self.subscriptions: dict[str, Any] = {}
        self.scan()
        self._timer = node.create_timer(
            period_s, self.scan, clock=Clock(clock_type=ClockType.STEADY_TIME)
        )

    def _resolve(self, name: str) -> str:
        if name.startswith("/"):
            return name
        namespace = self.node.get_namespace().rstrip("/")
        return f"{namespace}/{name}"

    def scan(self) -> None:
        """Subscribe to every watched topic that now has a publisher."""
        from omni_ros.tools.record import adapted_qos, message_class

        for topic, types in self.node.get_topic_names_and_types():
            if topic in self.subscriptions or not types:
                continue
            if topic not in self.watched and not topic.startswith(self.prefixes):
                continue
            if self.node.count_publishers(topic) == 0:
                continue
            type_name = types[0]
            try:
                cls = message_class(type_name)
            except Exception as exc:
                self.node.get_logger().warning(f"live view: {topic} ({type_name}) skipped: {exc}")
                self.subscriptions[topic] = None
                continue
            # Advertised now, before its first message: a client subscribes in time for it.
            self.view.announce(topic, type_name)
            qos = QoSProfile(
                depth=50,
                reliability=ReliabilityPolicy.RELIABLE,
                durability=DurabilityPolicy.TRANSIENT_LOCAL,
            )
            self.subscriptions[topic] = self.node.create_subscription(
                cls, topic, self._callback(topic, type_name), adapted_qos(self.node, topic, qos),
                raw=True,
            )  # fmt: skip
            self.node.get_logger().info(f"live view: + {topic} ({type_name})")

    def _callback(self, topic: str, type_name: str) -> Any:
        def forward(raw: bytes) -> None:
            self.view.forward(topic, type_name, raw, self.node.get_clock().now().nanoseconds)

        return forward

    def close(self) -> None:
        self.node.destroy_timer(self._timer)
        for sub in self.subscriptions.values():
            if sub is not None:
                self.node.destroy_subscription(sub)
        self.subscriptions.clear()


class LiveViewNode(Node):
    """Serves omni_flow_node's topics over the Foxglove WebSocket protocol (a plain node).

    Parameters: see :data:`PARAMETERS` (host, port, unit_ms, backend_deadline_ms, frame_policy).
    Subscribes: every topic under omni/ and speaker/, camera/image_raw(/compressed), audio/mic,
    robot_speaking, /diagnostics (serialized; QoS adapted to each publisher).
    Publishes nothing on ROS; serves ws://host:port (Foxglove: "Open connection").
    """

    def __init__(self) -> None:
        super().__init__("omni_live_view")
        for name, (default, _text) in PARAMETERS.items():
            self.declare_parameter(name, default)

        def param(name: str) -> Any:
            return self.get_parameter(name).value

        self.view = LiveView(
            host=str(param("host")),
            port=int(param("port")),
            unit_ns=int(param("unit_ms")) * 1_000_000,
            backend_deadline_ms=float(param("backend_deadline_ms")),
            frame_policy=str(param("frame_policy")),
        )
        self.bridge = TopicBridge(self, self.view)
        self.get_logger().info(f"live view on {self.view.url} (Foxglove: Open connection)")

    def destroy_node(self) -> None:
        self.bridge.close()
        self.view.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Run the live view node."""
    from omni_ros.ros._run import spin_node

    spin_node(LiveViewNode, "omni_live_view", args)


if __name__ == "__main__":
    main()
