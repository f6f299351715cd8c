"""Every topic, service and action omni_ros uses: one table of names, types and offered QoS.

Names are relative (they follow the node's namespace) except ``/diagnostics``. The QoS is what the
topic's publisher offers; a subscriber may keep a deeper queue (``subscriber_depth``). The nodes
build their rclpy profiles from this table (:func:`omni_ros.ros.qos.profile`), and bags record the
same offers (:mod:`omni_ros.tools.bagio`), so ``ros2 bag play`` republishes what the nodes offered.
Nothing here imports rclpy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    """One topic: relative name, ROS type, what its publisher offers (keep-last)."""

    name: str
    type: str
    depth: int
    reliable: bool = True
    #: transient-local: a late subscriber gets the last message (a state, not an event).
    latched: bool = False
    #: who publishes it ("omni_flow_node", "speaker_node", "mic_node", or "driver": not omni_ros).
    publisher: str = "omni_flow_node"
    #: a subscriber's own queue depth, when deeper than the offer (0: the offer's depth).
    subscriber_depth: int = 0


# ------------------------------------------------------------------------------- inputs
#: Sensor-data QoS as drivers publish it; omni_flow_node keeps 100 chunks (at 10 ms chunks the
#: default depth 5 is 50 ms, so one executor stall would turn audio into gaps).
MIC = Topic(
    "audio/mic",
    "omni_ros_msgs/msg/AudioChunk",
    5,
    False,
    publisher="mic_node",
    subscriber_depth=100,
)
CAMERA = Topic("camera/image_raw", "sensor_msgs/msg/Image", 5, False, publisher="driver")
CAMERA_COMPRESSED = Topic(
    "camera/image_raw/compressed", "sensor_msgs/msg/CompressedImage", 5, False, publisher="driver"
)
#: OTHER speech on the robot (a TTS, a player), latched like speaker/playing; never ours.
#: omni_flow_node subscribes volatile (a driver's topic: see :func:`omni_ros.ros.qos.profile`)
#: with 10 messages of queue.
ROBOT_SPEAKING = Topic(
    "robot_speaking", "std_msgs/msg/Bool", 1, latched=True, publisher="driver", subscriber_depth=10
)

# ------------------------------------------------------------------------------ outputs
SPEECH = Topic("omni/speech", "omni_ros_msgs/msg/AudioChunk", 50, subscriber_depth=200)
#: Volatile on purpose: a flush from before a speaker started must not cut anything.
SPEECH_FLUSH = Topic("omni/speech_flush", "omni_ros_msgs/msg/SpeechFlush", 50)
TEXT = Topic("omni/text", "omni_ros_msgs/msg/OmniText", 50)
PROACTIVE = Topic("omni/proactive", "omni_ros_msgs/msg/ProactiveAction", 50)
STATE = Topic("omni/state", "omni_ros_msgs/msg/OmniState", 1, latched=True)
USER_SPEAKING = Topic("omni/user_speaking", "std_msgs/msg/Bool", 1, latched=True)
DIAGNOSTICS = Topic("/diagnostics", "diagnostic_msgs/msg/DiagnosticArray", 10)

# ------------------------------------------------------------------------- speaker_node
PLAYBACK = Topic("speaker/playback", "omni_ros_msgs/msg/Playback", 100, publisher="speaker_node")
PLAYING = Topic("speaker/playing", "std_msgs/msg/Bool", 1, latched=True, publisher="speaker_node")

TOPICS: tuple[Topic, ...] = (
    MIC,
    CAMERA,
    CAMERA_COMPRESSED,
    ROBOT_SPEAKING,
    SPEECH,
    SPEECH_FLUSH,
    TEXT,
    PROACTIVE,
    STATE,
    USER_SPEAKING,
    DIAGNOSTICS,
    PLAYBACK,
    PLAYING,
)

# --------------------------------------------------------------- services and the action
INTERRUPT = "omni/interrupt"  # std_srvs/srv/Trigger
RESET = "omni/reset"  # std_srvs/srv/Trigger
SET_PROMPT = "omni/set_prompt"  # omni_ros_msgs/srv/SetPrompt
ASK = "omni/ask"  # omni_ros_msgs/action/Ask
SPEAKER_FLUSH = "speaker/flush"  # std_srvs/srv/Trigger (speaker_node)
#: Every service name above (the action aside), relative.
SERVICES: tuple[str, ...] = (INTERRUPT, RESET, SET_PROMPT, SPEAKER_FLUSH)


def find(name: str) -> Topic | None:
    """The topic whose relative name ``name`` ends with (a namespace prefix is ignored)."""
    stripped = name.strip("/")
    for topic in TOPICS:
        relative = topic.name.strip("/")
        if stripped == relative or stripped.endswith("/" + relative):
            return topic
    return None
