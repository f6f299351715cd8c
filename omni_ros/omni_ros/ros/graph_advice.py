"""Warnings for inputs that are in the ROS graph under another name or type than the node uses.

A robot's camera driver rarely publishes ``camera/image_raw`` in the node's namespace: RealSense's
``realsense2_camera`` publishes ``/camera/camera/color/image_raw`` (4.5x; ``/camera/color/image_raw``
before), ``usb_cam`` and ``v4l2_camera`` publish ``image_raw`` (and ``image_raw/compressed``) in their
own namespace. Without a remap the subscription stays unmatched and the run is audio-only with no
error anywhere; likewise a microphone that publishes audio_common messages. :func:`advise` looks at
the graph and says what to remap or set; the node logs each piece of advice once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
AUDIO_TYPES = (
    "omni_ros_msgs/msg/AudioChunk",
    "audio_common_msgs/msg/AudioStamped",
    "audio_common_msgs/msg/AudioDataStamped",
)

#: Topic name endings of common drivers -> who publishes them (first match wins).
DRIVER_TOPICS: tuple[tuple[str, str], ...] = (
    ("/color/image_raw", "RealSense (realsense2_camera)"),
    ("/color/image_raw/compressed", "RealSense (realsense2_camera, compressed)"),
    ("/image_raw/compressed", "usb_cam / v4l2_camera (compressed)"),
    ("/image_raw", "usb_cam / v4l2_camera"),
    ("/audio", "mgonzs13/audio_common audio_capturer_node or ros-drivers audio_capture"),
    ("/audio_stamped", "ros-drivers/audio_common audio_capture"),
)


def driver_of(topic: str) -> str:
    """Who usually publishes ``topic`` ("" if no common driver does)."""
    for ending, driver in DRIVER_TOPICS:
        if topic.endswith(ending):
            return driver
    return ""


def _rank(topic: str) -> tuple[int, int, str]:
    # Colour before depth / infra-red, raw before processed, then shortest.
    colour = 0 if ("color" in topic or "rgb" in topic or topic.endswith("/image_raw")) else 1
    return colour, len(topic), topic


def _describe(topic: str, kind: str) -> str:
    driver = driver_of(topic)
    return f"{topic} ({kind}{', ' + driver if driver else ''})"


def advise(
    topics: Sequence[tuple[str, Sequence[str]]],
    publishers: Callable[[str], int],
    camera_topic: str,
    camera_type: str,
    mic_topic: str,
    mic_type: str,
) -> list[str]:
    """Advice for the node's camera and microphone subscriptions (resolved names).

    Args:
        topics: ``get_topic_names_and_types()``.
        publishers: topic -> number of publishers (``count_publishers``).
        camera_topic, camera_type: what the node subscribes for images.
        mic_topic, mic_type: what the node subscribes for audio (``mic.type``).
    """
    types = {name: list(kinds) for name, kinds in topics}
    advice: list[str] = []
    if publishers(camera_topic) == 0:
        cameras = sorted(
            (
                (name, kind)
                for name, kinds in types.items()
                for kind in kinds
                if kind in (IMAGE, COMPRESSED) and name != camera_topic and publishers(name) > 0
            ),
            key=lambda item: _rank(item[0]),
        )
        if cameras:
            best, kind = cameras[0]
            listed = ", ".join(_describe(n, k.rsplit("/", 1)[-1]) for n, k in cameras[:6])
            if kind == COMPRESSED:
                fix = (
                    f"remap camera/image_raw/compressed:={best} and set camera.compressed:=true"
                    f" (launch: camera_topic:={best} camera_compressed:=true)"
                )
            else:
                fix = f"remap camera/image_raw:={best} (launch: camera_topic:={best})"
            advice.append(
                f"nothing publishes {camera_topic} ({camera_type.rsplit('/', 1)[-1]}), so this "
                f"run is audio-only; camera topics in the graph: {listed}. To see: {fix}"
            )
    mic_published = types.get(mic_topic, [])
    wrong = [t for t in mic_published if t != mic_type]
    if wrong and publishers(mic_topic) > 0:
        advice.append(
            f"{mic_topic} is published as {', '.join(wrong)} but the node subscribes {mic_type}: "
            f"set mic.type:={wrong[0]} (launch: mic_type:={wrong[0]})"
        )
    elif publishers(mic_topic) == 0:
        audio = sorted(
            (name, kind)
            for name, kinds in types.items()
            for kind in kinds
            if kind in AUDIO_TYPES and name != mic_topic and publishers(name) > 0
        )
        if audio:
            best, kind = audio[0]
            listed = ", ".join(_describe(n, k) for n, k in audio[:6])
            advice.append(
                f"nothing publishes {mic_topic}; audio topics in the graph: {listed}. To listen: "
                f"remap audio/mic:={best} and set mic.type:={kind} "
                f"(launch: mic_topic:={best} mic_type:={kind})"
            )
    return advice


class GraphAdvisor:
    """Checks the graph every ``period_s`` of steady time and logs each new piece of advice once.

    Args:
        node: the rclpy node (its logger, graph queries and parameters).
        active: whether the node's subscriptions exist (checked only then).
        camera, mic: callables returning ``(relative topic, type)`` as the node subscribes them.
    """

    def __init__(
        self,
        node: Any,
        active: Callable[[], bool],
        camera: Callable[[], tuple[str, str]],
        mic: Callable[[], tuple[str, str]],
        period_s: float = 5.0,
    ) -> None:
        from rclpy.clock import Clock, ClockType

        self._node, self._active, self._camera, self._mic = node, active, camera, mic
        self.given: list[str] = []
        self.timer = node.create_timer(
            period_s, self.check, clock=Clock(clock_type=ClockType.STEADY_TIME)
        )

    def check(self) -> None:
        if not self._active():
            return
        node = self._node
        camera_topic, camera_type = self._camera()
        mic_topic, mic_type = self._mic()
        for text in advise(
            node.get_topic_names_and_types(),
            node.count_publishers,
            node.resolve_topic_name(camera_topic),
            camera_type,
            node.resolve_topic_name(mic_topic),
            mic_type,
        ):
            if text not in self.given:
                self.given.append(text)
                node.get_logger().warning(text)
