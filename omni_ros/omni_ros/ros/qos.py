"""rclpy QoS profiles from the topic table (:mod:`omni_ros.topics`)."""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from omni_ros.topics import Topic


def profile(topic: Topic, *, subscriber: bool = False) -> QoSProfile:
    """What ``topic``'s publisher offers, or with ``subscriber`` what a subscription asks for: its
    (deeper) queue, and volatile for a driver's topic even when the table says it is latched (a
    transient-local subscription would refuse a driver that publishes volatile; a volatile one
    takes either)."""
    depth = topic.subscriber_depth if subscriber and topic.subscriber_depth else topic.depth
    latched = topic.latched and not (subscriber and topic.publisher == "driver")
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE if topic.reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE,
    )
