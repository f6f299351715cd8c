"""rclpy QoS profiles from the topic table (:mod:`omni_ros.topics`)."""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from omni_ros.topics import Topic


def profile(topic: Topic, *, subscriber: bool = False) -> QoSProfile:
    """What ``topic``'s publisher offers, or with ``subscriber`` the subscriber's (deeper) queue."""
    depth = topic.subscriber_depth if subscriber and topic.subscriber_depth else topic.depth
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE if topic.reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=(
            DurabilityPolicy.TRANSIENT_LOCAL if topic.latched else DurabilityPolicy.VOLATILE
        ),
    )
