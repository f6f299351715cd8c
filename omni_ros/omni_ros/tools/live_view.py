"""The live view: omni_flow_node's conversation served over the Foxglove WebSocket protocol.

A :class:`LiveView` runs a ``foxglove-sdk`` WebSocket server on localhost and is fed serialized ROS
messages (``forward(topic, type, cdr, log_ns)``) from wherever they are: the ROS graph
(:mod:`omni_ros.ros.omni_live_view`, ``with_foxglove:=true`` in the launch file, ``omni-ros replay
--mode graph --with-foxglove``) or the in-process replay (``--mode direct --with-foxglove``).

Two kinds of channel:

* **every topic as it is**: CDR bytes with the ``ros2msg`` schema of its type (the full definition
  rosbags writes into mcap files), so Foxglove decodes any topic of the node, including message
  types added later, without code here;
* **views derived for the layout** (``/omni_view/...``), JSON, computed from those messages by
  type: the transcript (a ``foxglove.Log`` line per finished turn, user speech start / stop,
  barge-ins and flushes), the unit (mode, compute time against the unit's real-time budget and
  the backend deadline), activity (user speaking, robot playing), audio levels (dBFS of the mic
  and of the robot's speech) and the camera frame of each unit the model was given.

Timestamps: ``log_ns`` is the receiver's ROS time (sim time under replay: the bag's axis), so the
viewer's timeline is the conversation's. Nothing here is needed by the node: it only watches.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import deque
from typing import Any

import numpy as np

from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.core.types import RawAudio

_log = logging.getLogger(__name__)
#: ``OmniState.mode`` constants -> names (omni_ros_msgs/msg/OmniState.msg).
MODES = {0: "LISTENING", 1: "SPEAKING", 2: "INTERRUPTED", 3: "PAUSED", 4: "ERROR"}
#: ``SpeechFlush.reason`` constants -> names (omni_ros_msgs/msg/SpeechFlush.msg, issue 9).
FLUSH_REASONS = {0: "barge-in", 1: "interrupt", 2: "reset", 3: "error", 4: "stop"}
DEFAULT_PORT = 8765
#: Quietest level reported [dBFS] (silence would be -inf, which JSON cannot carry).
FLOOR_DBFS = -120.0

TRANSCRIPT = "/omni_view/transcript"
MODEL_FRAME = "/omni_view/model_frame"
#: foxglove.Log levels (https://docs.foxglove.dev/docs/visualization/message-schemas/log-level).
LOG_LEVELS = {"DEBUG": 1, "INFO": 2, "WARNING": 3, "ERROR": 4}
#: The foxglove.Log schema, as JSON schema (the title is what Foxglove's Log panel matches).
LOG_SCHEMA = {
    "type": "object",
    "title": "foxglove.Log",
    "properties": {
        "timestamp": {
            "type": "object",
            "properties": {"sec": {"type": "integer"}, "nsec": {"type": "integer"}},
        },
        "level": {"type": "integer", "description": "1 debug, 2 info, 3 warning, 4 error"},
        "message": {"type": "string"},
        "name": {"type": "string"},
        "file": {"type": "string"},
        "line": {"type": "integer"},
    },
}
UNIT_SCHEMA = {
    "type": "object",
    "title": "omni_ros.view.Unit",
    "properties": {
        "unit_index": {"type": "integer"},
        "mode": {"type": "integer"},
        "mode_name": {"type": "string"},
        "turn_id": {"type": "integer"},
        "unit_compute_ms": {"type": "number"},
        "budget_ms": {"type": "number", "description": "unit length: real time"},
        "backend_deadline_ms": {"type": "number"},
        "real_time_factor": {"type": "number"},
        "barge_ins": {"type": "integer"},
        "error": {"type": "string"},
    },
}
LEVEL_SCHEMA = {
    "type": "object",
    "title": "omni_ros.view.Level",
    "properties": {"dbfs": {"type": "number"}, "stamp_ns": {"type": "integer"}},
}
ACTIVITY_SCHEMA = {
    "type": "object",
    "title": "omni_ros.view.Activity",
    "properties": {
        "user_speaking": {"type": "boolean"},
        "robot_playing": {"type": "boolean"},
        "robot_speech_scheduled": {
            "type": "boolean",
            "description": "from a turn's first omni/speech chunk to its end of turn or a flush",
        },
    },
}
TURN_SCHEMA = {
    "type": "object",
    "title": "omni_ros.view.Turn",
    "properties": {
        "turn_id": {"type": "integer"},
        "text": {"type": "string"},
        "done": {"type": "boolean"},
        "proactive": {"type": "boolean"},
    },
}


#: The derived JSON channels: key -> (topic, JSON schema).
DERIVED: dict[str, tuple[str, dict[str, Any]]] = {
    "unit": ("/omni_view/unit", UNIT_SCHEMA),
    "activity": ("/omni_view/activity", ACTIVITY_SCHEMA),
    "mic": ("/omni_view/level/mic", LEVEL_SCHEMA),
    "speech": ("/omni_view/level/speech", LEVEL_SCHEMA),
    "turn": ("/omni_view/turn", TURN_SCHEMA),
}


def dbfs(samples: Any) -> float:
    """RMS level of float samples in dBFS (full scale 1.0), floored at :data:`FLOOR_DBFS`."""
    data = np.asarray(samples, dtype=np.float64)
    if data.size == 0:
        return FLOOR_DBFS
    rms = math.sqrt(float(np.mean(data * data)))
    return max(FLOOR_DBFS, 20.0 * math.log10(rms)) if rms > 0 else FLOOR_DBFS


def stamp_of(msg: Any) -> int:
    """``header.stamp`` in ns (0 without a header)."""
    header = getattr(msg, "header", None)
    if header is None:
        return 0
    return int(header.stamp.sec) * NS_PER_S + int(header.stamp.nanosec)


def _time_ns(t: Any) -> int:
    return int(t.sec) * NS_PER_S + int(t.nanosec)


class LiveView:
    """A Foxglove WebSocket server fed with serialized ROS messages (see the module docstring).

    Args:
        host: address to bind; loopback by default (the view is for the robot's own operator:
            reach it over an SSH tunnel rather than exposing it).
        port: TCP port (0: any free port, see :attr:`port`).
        unit_ns: Omni-Flow unit length: the real-time budget of one unit and the span in which
            the model's frame is chosen.
        backend_deadline_ms: ``flow.backend_deadline_ms`` (shown beside the compute time).
        frame_policy: ``timeline.frame_policy`` of the node (``last`` or ``nearest_end``: which
            frame of the unit the model was given).
        typestore: the rosbags typestore that describes and decodes the messages (default: ROS 2
            Kilted plus every omni_ros_msgs type).

    Raises:
        ConfigError: foxglove-sdk is missing or the port cannot be bound.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        unit_ns: int = NS_PER_S,
        backend_deadline_ms: float = 5000.0,
        frame_policy: str = "last",
        name: str = "omni_ros",
        typestore: Any = None,
    ) -> None:
        try:
            import foxglove
        except ImportError as exc:
            raise ConfigError(
                f"the live view needs foxglove-sdk ({exc}): pip install -r requirements/base.txt"
            ) from exc
        from omni_ros.tools.typestore import omni_typestore

        self._foxglove = foxglove
        self._store = typestore if typestore is not None else omni_typestore()
        # The SDK's default context: channels made with a Context() of their own were advertised
        # but never delivered (foxglove-sdk 0.30.3), so one view per process; close() frees it.
        try:
            self.server = foxglove.start_server(name=name, host=host, port=port)
        except Exception as exc:  # the SDK raises its own RuntimeError for a taken port
            raise ConfigError(f"cannot serve the live view on {host}:{port}: {exc}") from exc
        self.host, self.port = host, int(self.server.port)
        self.unit_ns, self.backend_deadline_ms = int(unit_ns), float(backend_deadline_ms)
        if frame_policy not in ("last", "nearest_end"):
            frame_policy = "last"  # the other policies pick several frames: show the last one
        self.frame_policy = frame_policy
        self._lock = threading.Lock()
        self._raw: dict[str, Any] = {}
        self._skipped: set[str] = set()
        # foxglove.Log as JSON (the SDK's LogChannel is protobuf-encoded: a client would need the
        # protobuf descriptors; the Log panel reads either).
        self._transcript = foxglove.Channel(TRANSCRIPT, schema=LOG_SCHEMA)
        self._json = {
            key: foxglove.Channel(topic, schema=schema) for key, (topic, schema) in DERIVED.items()
        }
        self._frames: deque[tuple[int, str, bytes]] = deque(maxlen=64)
        self._frame_channels: dict[str, Any] = {}
        self._turn_text: dict[int, str] = {}
        self._activity = {
            "user_speaking": False,
            "robot_playing": False,
            "robot_speech_scheduled": False,
        }
        self._last_mode: int | None = None
        self._barge_ins = 0
        self.forwarded: dict[str, int] = {}
        self._derive = {
            "omni_ros_msgs/msg/OmniText": self._on_text,
            "omni_ros_msgs/msg/OmniState": self._on_state,
            "omni_ros_msgs/msg/AudioChunk": self._on_audio,
            "omni_ros_msgs/msg/SpeechFlush": self._on_flush,
            "omni_ros_msgs/msg/Playback": self._on_playback,
            "omni_ros_msgs/msg/ProactiveAction": self._on_proactive,
            "sensor_msgs/msg/Image": self._on_image,
            "sensor_msgs/msg/CompressedImage": self._on_image,
            "std_msgs/msg/Bool": self._on_bool,
        }
        _log.info("live view: Foxglove WebSocket on ws://%s:%d", self.host, self.port)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    # ------------------------------------------------------------------------------- feeding
    def announce(self, topic: str, msgtype: str) -> None:
        """Advertise ``topic`` before its first message (a client subscribed in time gets it all)."""
        with self._lock:
            self._raw_channel(topic, msgtype)
            if msgtype in ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage"):
                self._frame_channel(msgtype)

    def topics(self) -> list[str]:
        """Every topic advertised so far."""
        with self._lock:
            return sorted(
                [TRANSCRIPT, *(t for t, _s in DERIVED.values()), *self._raw]
                + [c.topic() for c in self._frame_channels.values()]
            )

    def forward(self, topic: str, msgtype: str, raw: bytes, log_ns: int) -> None:
        """Serve one serialized message on its topic, and update the derived views from it.

        A type this process cannot describe is logged once and skipped (never raised: the view
        must not disturb what it watches).
        """
        with self._lock:
            channel = self._raw_channel(topic, msgtype)
            if channel is None:
                return
            channel.log(bytes(raw), log_time=int(log_ns))
            self.forwarded[topic] = self.forwarded.get(topic, 0) + 1
            derive = self._derive.get(msgtype)
            if derive is None:
                return
            try:
                msg = self._store.deserialize_cdr(bytes(raw), msgtype)
                derive(topic, msgtype, msg, bytes(raw), int(log_ns))
            except Exception as exc:  # a malformed message: the raw channel still has it
                _log.debug("live view: cannot derive from %s: %s", topic, exc)

    def _raw_channel(self, topic: str, msgtype: str) -> Any:
        channel = self._raw.get(topic)
        if channel is not None or topic in self._skipped:
            return channel
        try:
            text, _md5 = self._store.generate_msgdef(msgtype, ros_version=2)
        except Exception as exc:
            self._skipped.add(topic)
            _log.warning("live view: %s (%s) is not shown: %s", topic, msgtype, exc)
            return None
        channel = self._cdr_channel(topic, msgtype, text)
        self._raw[topic] = channel
        return channel

    def _cdr_channel(self, topic: str, msgtype: str, msgdef: str) -> Any:
        schema = self._foxglove.Schema(name=msgtype, encoding="ros2msg", data=msgdef.encode())
        return self._foxglove.Channel(topic, schema=schema, message_encoding="cdr")

    def _frame_channel(self, msgtype: str) -> Any:
        channel = self._frame_channels.get(msgtype)
        if channel is None:
            topic = MODEL_FRAME + ("/compressed" if "Compressed" in msgtype else "")
            text, _md5 = self._store.generate_msgdef(msgtype, ros_version=2)
            channel = self._cdr_channel(topic, msgtype, text)
            self._frame_channels[msgtype] = channel
        return channel

    # -------------------------------------------------------------------------- derived views
    def _line(self, text: str, log_ns: int, name: str, level: str = "INFO") -> None:
        self._transcript.log(
            {
                "timestamp": {"sec": log_ns // NS_PER_S, "nsec": log_ns % NS_PER_S},
                "level": LOG_LEVELS[level],
                "message": text,
                "name": name,
                "file": "",
                "line": 0,
            },
            log_time=log_ns,
        )

    def _on_text(self, topic: str, msgtype: str, msg: Any, raw: bytes, log_ns: int) -> None:
        turn = int(msg.turn_id)
        text = self._turn_text.get(turn, "") + str(msg.text)
        self._turn_text[turn] = text
        done = bool(msg.end_of_turn)
        self._json["turn"].log(
            {"turn_id": turn, "text": text, "done": done, "proactive": bool(msg.proactive)},
            log_time=log_ns,
        )
        if done:
            tag = " (proactive)" if msg.proactive else ""
            self._line(f"turn {turn}{tag}: {text.strip() or '(no text)'}", log_ns, "robot")
            self._turn_text.pop(turn, None)
            self._set_activity("robot_speech_scheduled", False, log_ns)

    def _on_state(self, topic: str, msgtype: str, msg: Any, raw: bytes, log_ns: int) -> None:
        mode = int(msg.mode)
        barge_ins = int(getattr(msg, "barge_ins", 0))
        error = str(getattr(msg, "error", ""))
        self._json["unit"].log(
            {
                "unit_index": int(msg.unit_index),
                "mode": mode,
                "mode_name": MODES.get(mode, str(mode)),
                "turn_id": int(getattr(msg, "turn_id", 0)),
                "unit_compute_ms": float(msg.unit_compute_ms),
                "budget_ms": self.unit_ns / 1e6,
                "backend_deadline_ms": self.backend_deadline_ms,
                "real_time_factor": float(msg.real_time_factor),
                "barge_ins": barge_ins,
                "error": error,
            },
            log_time=log_ns,
        )
        if mode != self._last_mode and mode in (2, 4):
            what = "speech cut (INTERRUPTED)" if mode == 2 else f"backend ERROR {error}".strip()
            self._line(f"unit {msg.unit_index}: {what}", log_ns, "omni_flow", "WARNING")
        if barge_ins > self._barge_ins:
            self._line(f"barge-in #{barge_ins}", log_ns, "omni_flow", "WARNING")
        self._barge_ins = max(self._barge_ins, barge_ins)
        self._last_mode = mode
        for flag in ("user_speaking", "playing"):
            if hasattr(msg, flag):
                self._set_activity(
                    "user_speaking" if flag == "user_speaking" else "robot_playing",
                    bool(getattr(msg, flag)),
                    log_ns,
                )
        self._model_frame(stamp_of(msg), log_ns)

    def _on_audio(self, topic: str, msgtype: str, msg: Any, raw: bytes, log_ns: int) -> None:
        from omni_ros.core.audio import decode_audio

        chunk = RawAudio(
            stamp_ns=stamp_of(msg),
            sample_rate=int(msg.sample_rate),
            channels=int(msg.channels),
            encoding=str(msg.encoding),
            data=bytes(msg.data),
        )
        try:
            level = dbfs(decode_audio(chunk).samples)
        except (DecodeError, ConfigError, ValueError):
            return
        kind = "speech" if topic.endswith("omni/speech") else "mic"
        self._json[kind].log({"dbfs": round(level, 2), "stamp_ns": chunk.stamp_ns}, log_time=log_ns)
        if kind == "speech":
            self._set_activity("robot_speech_scheduled", True, log_ns)

    def _on_flush(self, topic: str, msgtype: str, msg: Any, raw: bytes, log_ns: int) -> None:
        reason = FLUSH_REASONS.get(int(msg.reason), str(msg.reason))
        span_ms = (_time_ns(msg.dropped_until) - _time_ns(msg.dropped_from)) / 1e6
        self._line(
            f"{reason}: turn {msg.turn_id} flushed ({span_ms:.0f} ms of speech dropped)",
            log_ns,
            "omni_flow",
            "WARNING",
        )
        self._set_activity("robot_speech_scheduled", False, log_ns)

    def _on_playback(self, topic: str, msgtype: str, msg: Any, raw: bytes, log_ns: int) -> None:
        self._set_activity("robot_playing", not bool(msg.cut), log_ns)
        if bool(msg.late):
            self._line(f"turn {msg.turn_id}: a chunk played late", log_ns, "speaker", "WARNING")

    def _on_proactive(self, topic: str, msgtype: str, msg: Any, raw: bytes, log_ns: int) -> None:
        kind = str(getattr(msg, "kind", ""))
        self._line(f"proactive {kind}: {getattr(msg, 'text', '')}".strip(), log_ns, "robot")

    def _on_bool(self, topic: str, msgtype: str, msg: Any, raw: bytes, log_ns: int) -> None:
        if topic.endswith("user_speaking"):
            key, who = "user_speaking", "user"
        elif topic.endswith("robot_speaking"):
            key, who = "robot_playing", "robot"
        else:
            return
        value = bool(msg.data)
        if value != self._activity[key] and who == "user":
            self._line("user speaking" if value else "user silent", log_ns, "vad")
        self._set_activity(key, value, log_ns)

    def _set_activity(self, key: str, value: bool, log_ns: int) -> None:
        if self._activity[key] == value:
            return
        self._activity[key] = value
        self._json["activity"].log(dict(self._activity), log_time=log_ns)

    def _on_image(self, topic: str, msgtype: str, msg: Any, raw: bytes, log_ns: int) -> None:
        self._frames.append((stamp_of(msg), msgtype, raw))

    def _model_frame(self, unit_end_ns: int, log_ns: int) -> None:
        """Serve the frame the model was given for the unit ending at ``unit_end_ns``."""
        start = unit_end_ns - self.unit_ns
        inside = [f for f in self._frames if start <= f[0] < unit_end_ns]
        if not inside:
            return
        if self.frame_policy == "nearest_end":
            chosen = min(inside, key=lambda f: unit_end_ns - f[0])
        else:
            chosen = max(inside, key=lambda f: f[0])
        _stamp, msgtype, raw = chosen
        self._frame_channel(msgtype).log(raw, log_time=log_ns)
        # Frames of this unit and older are no longer needed.
        while self._frames and self._frames[0][0] < unit_end_ns - self.unit_ns:
            self._frames.popleft()

    def wait_for_clients(self, timeout_s: float) -> bool:
        """Until every advertised channel has a subscriber (tests, ``--foxglove-wait``)."""
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                channels = [
                    self._transcript,
                    *self._json.values(),
                    *(c for c in self._raw.values() if c is not None),
                    *self._frame_channels.values(),
                ]
                if all(c.has_sinks() for c in channels):
                    return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        """Stop the server (clients are disconnected) and close the channels."""
        self.server.stop()
        with self._lock:
            for channel in [
                self._transcript,
                *self._json.values(),
                *(c for c in self._raw.values() if c is not None),
                *self._frame_channels.values(),
            ]:
                channel.close()


# ----------------------------------------------------------------------------------------- layout
def layout() -> Any:
    """The shipped Foxglove layout (``config/foxglove_layout.json``), built with foxglove-sdk's
    own layout model so its format is Foxglove's: the model's frame and the transcript on top,
    the mode / speech timeline below, then levels, compute vs deadline and barge-ins."""
    import foxglove.layouts as fl

    unit, activity = DERIVED["unit"][0], DERIVED["activity"][0]

    def plot(title: str, series: list[tuple[str, str]], y_label: str) -> Any:
        return fl.PlotPanel(
            title=title,
            config=fl.PlotConfig(
                paths=[
                    fl.PlotSeries(value=v, label=label, timestamp_method="receiveTime")
                    for v, label in series
                ],
                show_legend=True,
                y_axis_label=y_label,
                time_window_mode="sliding",
            ),
        )

    frame = fl.ImagePanel(
        title="camera frame the model saw (per unit)",
        config=fl.ImageConfig(image_mode=fl.ImageModeConfig(image_topic=MODEL_FRAME)),
    )
    transcript = fl.LogPanel(
        title="transcript: turns, user speech, barge-ins",
        config=fl.LogConfig(topic_to_render=TRANSCRIPT, show_name=True, show_level=False),
    )
    timeline = fl.StateTransitionsPanel(
        title="unit mode, user speech (VAD), robot playback",
        config=fl.StateTransitionsConfig(
            paths=[
                fl.StateTransitionsSeries(value=f"{unit}.mode_name", label="unit mode"),
                fl.StateTransitionsSeries(
                    value=f"{activity}.user_speaking", label="user speaking (VAD)"
                ),
                fl.StateTransitionsSeries(value=f"{activity}.robot_playing", label="robot playing"),
                fl.StateTransitionsSeries(
                    value=f"{activity}.robot_speech_scheduled", label="robot speech scheduled"
                ),
            ],
            time_window_mode="sliding",
            show_legend=True,
        ),
    )
    levels = plot(
        "levels [dBFS]",
        [(f"{DERIVED['mic'][0]}.dbfs", "mic"), (f"{DERIVED['speech'][0]}.dbfs", "robot speech")],
        "dBFS",
    )
    compute = plot(
        "unit compute vs deadline [ms]",
        [
            (f"{unit}.unit_compute_ms", "compute"),
            (f"{unit}.budget_ms", "real-time budget (unit)"),
            (f"{unit}.backend_deadline_ms", "backend deadline"),
        ],
        "ms",
    )
    barge_ins = plot("barge-ins (count)", [(f"{unit}.barge_ins", "barge-ins")], "count")
    turn = fl.RawMessagesPanel(
        title="current turn", config=fl.RawMessagesConfig(topic_path=f"{DERIVED['turn'][0]}")
    )
    conversation = fl.SplitContainer(
        direction="column",
        items=[
            fl.SplitItem(
                proportion=2,
                content=fl.SplitContainer(
                    direction="row",
                    items=[
                        fl.SplitItem(proportion=1, content=frame),
                        fl.SplitItem(proportion=1.4, content=transcript),
                    ],
                ),
            ),
            fl.SplitItem(proportion=1, content=timeline),
            fl.SplitItem(
                proportion=1.2,
                content=fl.SplitContainer(
                    direction="row",
                    items=[
                        fl.SplitItem(proportion=1, content=levels),
                        fl.SplitItem(proportion=1, content=compute),
                        fl.SplitItem(proportion=0.6, content=barge_ins),
                        fl.SplitItem(proportion=0.8, content=turn),
                    ],
                ),
            ),
        ],
    )
    raw = fl.SplitContainer(
        direction="row",
        items=[
            fl.SplitItem(
                proportion=1,
                content=fl.ImagePanel(
                    title="camera (every frame)",
                    config=fl.ImageConfig(
                        image_mode=fl.ImageModeConfig(image_topic="/camera/image_raw")
                    ),
                ),
            ),
            fl.SplitItem(
                proportion=1,
                content=fl.RawMessagesPanel(
                    title="omni/state", config=fl.RawMessagesConfig(topic_path="/omni/state")
                ),
            ),
            fl.SplitItem(proportion=1, content=fl.DiagnosticsSummaryPanel(title="diagnostics")),
        ],
    )
    return fl.Layout(
        content=fl.TabContainer(
            selected_tab_index=0,
            tabs=[
                fl.TabItem(title="conversation", content=conversation),
                fl.TabItem(title="raw topics", content=raw),
            ],
        )
    )


def layout_json() -> str:
    """:func:`layout` as the indented JSON shipped in ``config/foxglove_layout.json``."""
    return json.dumps(json.loads(layout().to_json()), indent=2) + "\n"


def layout_topics() -> set[str]:
    """Every topic the layout's panels read."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("value", "topicToRender", "imageTopic", "topicPath") and isinstance(
                    value, str
                ):
                    found.add(value.split(".", 1)[0])
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(layout().to_json()))
    return found


def main(argv: list[str] | None = None) -> int:
    """``python -m omni_ros.tools.live_view --layout``: print the layout JSON."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args != ["--layout"]:
        print("usage: python -m omni_ros.tools.live_view --layout > config/foxglove_layout.json")
        return 2
    sys.stdout.write(layout_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
