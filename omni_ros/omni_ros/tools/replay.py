"""``omni-ros replay``: run a recorded rosbag2 through omni_ros and write what came out.

Two modes, one output format:

* ``graph``: the real thing. An ``omni_flow_node`` process is started with ``use_sim_time``; this
  process publishes the bag's camera/mic topics as raw CDR plus ``/clock`` over DDS at bag rate and
  records every output topic. What you get is what a robot running the node would have published.
* ``direct``: the same core (:class:`~omni_ros.core.flow.OmniFlow`) and backend in this process,
  driven by a manual clock set to each message's bag time: as fast as possible and deterministic.
  Outputs are converted with the node's own :mod:`omni_ros.ros.conversions`.

Both write ``DIR/outputs/`` (a rosbag2 folder, mcap storage), ``DIR/summary.json`` and
``DIR/timeline.png`` (see :mod:`omni_ros.tools.report`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from omni_ros import topics
from omni_ros.core.audio import audio_frames
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.core.types import RawAudio
from omni_ros.tools.bagio import INPUT_TOPICS, InputBag, OutputBag, to_raw_audio
from omni_ros.tools.record import TopicRecorder, message_class
from omni_ros.tools.report import plot_timeline, summarize, write_summary

#: Everything omni_flow_node publishes (absolute name -> type), from the topic table.
OUTPUT_TOPICS: dict[str, str] = {
    "/" + t.name.lstrip("/"): t.type for t in topics.TOPICS if t.publisher == "omni_flow_node"
}
#: What ``speaker_node`` publishes, recorded too when a replay plays the speech (``with_speaker``).
SPEAKER_TOPICS: dict[str, str] = {
    "/" + t.name: t.type for t in topics.TOPICS if t.publisher == "speaker_node"
}
#: The latched (transient-local) ones among them.
LATCHED_TOPICS: list[str] = [
    "/" + t.name
    for t in topics.TOPICS
    if t.latched and t.publisher in ("omni_flow_node", "speaker_node")
]
#: Default of ``--load-timeout``: how long graph replay waits for the node to load its backend.
LOAD_TIMEOUT_S = 180.0
_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ params
def load_params_file(path: Path | None, node_name: str = "omni_flow_node") -> dict[str, Any]:
    """A ROS 2 parameters YAML as the node's flat dotted parameters; ``{}`` without a file."""
    if path is None:
        return {}
    from omni_ros.ros._params import read_params_file

    return read_params_file(path, node_name)


def flow_setup(flat: Mapping[str, Any], backend: str | None) -> Any:
    """Flat node parameters -> the validated :class:`~omni_ros.ros._setup.NodeSetup`, by the very
    function ``omni_flow_node`` configures with (same names, same checks, same errors).

    Raises:
        ConfigError: an unknown parameter (with a suggestion), a wrong type, a rejected value.
    """
    from omni_ros.ros._setup import build_backend_config, node_setup

    setup = node_setup(flat, backend)
    build_backend_config(setup)  # the backend's own checks, before anything is loaded
    return setup


class Progress:
    """Replay progress: a tqdm bar on a terminal, a plain line every ``interval_s`` otherwise (a log
    file gets readable lines, not hundreds of carriage-return updates), nothing when ``quiet``."""

    def __init__(self, total: int, desc: str, mode: str, interval_s: float = 5.0) -> None:
        self.total, self.desc, self.mode, self.interval_s = total, desc, mode, interval_s
        self.count = 0
        self._started = self._last = time.monotonic()
        self._bar: Any = tqdm(total=total, unit="msg", desc=desc) if mode == "bar" else None

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and (now := time.monotonic()) - self._last >= self.interval_s:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        pct = 100.0 * self.count / max(1, self.total)
        print(
            f"{self.desc}: {self.count}/{self.total} messages ({pct:.0f} %), "
            f"{now - self._started:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines":
            self._line(time.monotonic())


def progress_mode(progress: bool | str) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` from a bool (True: bar on a terminal, else lines)."""
    if isinstance(progress, str):
        return progress
    if not progress:
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


def audio_end_ns(raw: RawAudio) -> int:
    """When the last sample of a mic chunk was captured; its stamp if the chunk is malformed."""
    try:
        frames = audio_frames(raw)
    except DecodeError:
        return raw.stamp_ns
    return raw.stamp_ns + frames * NS_PER_S // raw.sample_rate


# ------------------------------------------------------------------------------------------ direct
def replay_direct(
    bag: InputBag,
    outputs: Path,
    flat: Mapping[str, Any],
    backend: str | None = None,
    progress: bool | str = True,
    flush_s: float = 3.0,
    loops: int = 1,
    live_view: Any = None,
    with_inputs: bool = False,
) -> dict[str, Any]:
    """Feed ``bag`` through OmniFlow + backend in this process; write the output bag.

    With ``with_inputs`` the input messages go into the output bag too (at their bag time), so one
    file holds the whole conversation.

    With ``live_view`` (a :class:`~omni_ros.tools.live_view.LiveView`) every input and output
    message is served to Foxglove too, stamped with the bag time it was fed / produced at.

    With ``loops > 1`` the bag is played again from its start, so the clock jumps backwards exactly
    as under ``ros2 bag play --loop``; the core must notice, reset, and carry on.
    """
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.serialization import serialize_message
    from std_msgs.msg import Bool

    from omni_ros.backends.base import create_backend
    from omni_ros.core.clock import ManualClock
    from omni_ros.core.flow import OmniFlow
    from omni_ros.core.types import (
        ProactiveEvent,
        SpeechFlush,
        SpeechOut,
        StateOut,
        TextOut,
        VoiceActivity,
    )
    from omni_ros.ros import conversions as conv
    from omni_ros.ros._params import load_ref_voice

    setup = flow_setup(flat, backend)
    config, backend_params = setup.flow, setup.backend_params
    chunk_ms, encoding = setup.speech_chunk_ms, setup.speech_encoding
    _log.info("loading backend %r %s ...", setup.backend, backend_params)
    loaded = time.monotonic()
    model = create_backend(setup.backend, backend_params)
    getattr(model, "model", None)  # lazy backends load their weights now, as in the node
    _log.info("backend %r ready in %.1f s", setup.backend, time.monotonic() - loaded)
    clock = ManualClock(bag.start_ns)
    out: Any = OutputBag(outputs) if live_view is None else _TeeBag(OutputBag(outputs), live_view)
    last_diag_ns = [0]
    previous: list[Any] = [None]
    last_unit_end_ns = [0]

    def emit(event: Any) -> None:
        now = clock.now_ns()
        if isinstance(event, StateOut):
            last_unit_end_ns[0] = max(last_unit_end_ns[0], event.stamp_ns)
        if isinstance(event, SpeechOut):
            chunk = max(1, event.sample_rate * chunk_ms // 1000)
            for msg in conv.speech_to_chunks(event, chunk, encoding):
                out.write_raw(
                    "/omni/speech", OUTPUT_TOPICS["/omni/speech"], now, serialize_message(msg)
                )
        elif isinstance(event, TextOut):
            out.write_raw(
                "/omni/text",
                OUTPUT_TOPICS["/omni/text"],
                now,
                serialize_message(conv.text_to_msg(event)),
            )
        elif isinstance(event, SpeechFlush):
            topic = "/omni/speech_flush"
            msg = conv.flush_to_msg(event)
            out.write_raw(topic, OUTPUT_TOPICS[topic], now, serialize_message(msg))
        elif isinstance(event, VoiceActivity):
            topic = "/omni/user_speaking"
            msg = Bool(data=event.speaking)
            out.write_raw(topic, OUTPUT_TOPICS[topic], now, serialize_message(msg))
        elif isinstance(event, ProactiveEvent) and event.completed:
            out.write_raw(
                "/omni/proactive",
                OUTPUT_TOPICS["/omni/proactive"],
                now,
                serialize_message(conv.proactive_to_msg(event)),
            )
        elif isinstance(event, StateOut):
            out.write_raw(
                "/omni/state",
                OUTPUT_TOPICS["/omni/state"],
                now,
                serialize_message(conv.state_to_msg(event)),
            )
            if now - last_diag_ns[0] >= NS_PER_S:  # /diagnostics at 1 Hz of bag time, like the node
                diag = DiagnosticArray(
                    header=conv.header(now), status=[conv.diagnostic_status(event, previous[0])]
                )
                out.write_raw(
                    "/diagnostics", OUTPUT_TOPICS["/diagnostics"], now, serialize_message(diag)
                )
                last_diag_ns[0], previous[0] = now, event.counters

    flow = OmniFlow(config, model, clock, emit)
    try:  # exactly as the node's configure: the voice replaces the prompt only when there is one
        voice = load_ref_voice(setup.ref_voice_path, int(model.input_sample_rate))
    except BaseException:
        flow.close()
        model.close()
        out.close()
        raise
    if voice is not None:
        flow.set_prompt(config.system_prompt, voice)
    started = time.monotonic()
    try:
        bar = Progress(bag.message_count * loops, "replay (direct)", progress_mode(progress))
        input_end_ns = 0
        for message in (m for _ in range(loops) for m in bag):
            if message.log_ns == bag.start_ns:
                input_end_ns = 0  # a new pass (loops > 1)
            data = message.to_core()
            if isinstance(data, RawAudio):
                input_end_ns = max(input_end_ns, audio_end_ns(data))
            clock.set_ns(message.log_ns)
            flow.run_until_idle(message.log_ns)
            if live_view is not None:
                live_view.forward(message.topic, message.msgtype, message.raw, message.log_ns)
            if with_inputs:  # (not through the tee: the view has it already)
                bag_out = out.out if isinstance(out, _TeeBag) else out
                bag_out.write_raw(message.topic, message.msgtype, message.log_ns, message.raw)
            if message.role == "mic":
                flow.push_audio(data)  # type: ignore[arg-type]
            elif message.role in ("camera", "camera_compressed"):
                flow.push_image(data)  # type: ignore[arg-type]
            else:
                flow.set_robot_speaking(bool(data))
            bar.update()
        bar.close()
        # Let the unit holding the last input sample close (watermark) and its outputs come out,
        # and no further: units past the input would be pure zero-filled gap.
        end = bag.end_ns + int(flush_s * NS_PER_S)
        t = bag.end_ns
        while t < end and last_unit_end_ns[0] < input_end_ns:
            t = min(end, t + NS_PER_S // 10)
            clock.set_ns(t)
            flow.run_until_idle(t)
    finally:
        flow.close()
        model.close()
        out.close()
    return {
        "mode": "direct",
        "wall_s": round(time.monotonic() - started, 3),
        "backend_params": dict(backend_params),
    }


class _TeeBag:
    """An :class:`OutputBag` whose every message is also served by a live view."""

    def __init__(self, out: OutputBag, view: Any) -> None:
        self.out, self.view = out, view

    def write_raw(self, topic: str, msgtype: str, log_ns: int, raw: bytes) -> None:
        self.out.write_raw(topic, msgtype, log_ns, raw)
        self.view.forward(topic, msgtype, raw, log_ns)

    def close(self) -> None:
        self.out.close()


# ------------------------------------------------------------------------------------------- graph
def _node_executable(name: str = "omni_flow_node") -> str:
    from ament_index_python.packages import PackageNotFoundError, get_package_prefix

    try:
        exe = Path(get_package_prefix("omni_ros")) / "lib" / "omni_ros" / name
    except PackageNotFoundError as exc:
        raise ConfigError(
            "omni_ros is not installed: run `make build` and `source install/setup.sh`"
        ) from exc
    if not exe.exists():
        raise ConfigError(f"{exe} is missing: run `make build`")
    return str(exe)


def _configure_failure(log_path: Path | None) -> str:
    """The node's 'configure failed: ...' log line, if it logged one (it keeps running after)."""
    if log_path is None or not log_path.exists():
        return ""
    for line in log_path.read_text(errors="replace").splitlines():
        if "configure failed" in line:
            return line.split("configure failed", 1)[1].lstrip(": ")
    return ""


def _node_status(log_path: Path | None) -> str:
    """The node's last log line about its backend ("loading backend 'x' ..."), for progress."""
    if log_path is None or not log_path.exists():
        return "starting"
    status = "starting"
    for line in log_path.read_text(errors="replace").splitlines():
        if "loading backend" in line or "ready in" in line:
            status = line.split("]: ", 1)[-1].strip()
    return status


def replay_graph(
    bag: InputBag,
    outputs: Path,
    params_file: Path | None,
    flat: Mapping[str, Any],
    backend: str | None = None,
    progress: bool | str = True,
    rate: float = 1.0,
    flush_s: float = 3.0,
    ready_timeout_s: float = LOAD_TIMEOUT_S,
    log_path: Path | None = None,
    loops: int = 1,
    live_view: Any = None,
    with_inputs: bool = False,
    with_speaker: bool = False,
) -> dict[str, Any]:
    """Publish ``bag`` with /clock into a real omni_flow_node process and record its outputs.

    With ``live_view`` every topic of the node (inputs as published here, outputs as received) is
    served to Foxglove, stamped with sim time (the bag's axis), while the bag plays. With
    ``with_speaker`` a real ``speaker_node`` process (null sink, sim time) plays the speech as a
    robot would, and its reports (``speaker/playback``, ``speaker/playing``) are recorded: what
    was heard when, and which chunks were late."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from rosgraph_msgs.msg import Clock

    if rate <= 0:
        raise ConfigError(f"--rate must be > 0, got {rate}")
    if ready_timeout_s <= 0:
        raise ConfigError(f"--load-timeout must be > 0 s, got {ready_timeout_s}")
    # The node validates with the same function at configure; failing here is the same message,
    # seconds earlier (no process to start, no backend to wait for).
    flow_setup(flat, backend)
    cmd = [_node_executable(), "--ros-args", "-p", "use_sim_time:=true", "-p", "autostart:=true"]
    if params_file is not None:
        cmd += ["--params-file", str(params_file)]
    if backend:
        cmd += ["-p", f"backend:={backend}"]
    log: Any = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    node_proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    speaker_proc: subprocess.Popen[bytes] | None = None
    if with_speaker:
        speaker_proc = subprocess.Popen(
            [
                _node_executable("speaker_node"),
                "--ros-args",
                "-p",
                "use_sim_time:=true",
                "-p",
                "sink:=null",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )
    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node(
        "omni_ros_replay",
        context=context,
        parameter_overrides=[Parameter("use_sim_time", value=True)],
    )
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinning = threading.Event()
    spinning.set()

    def spin() -> None:
        while spinning.is_set() and context.ok():
            executor.spin_once(timeout_sec=0.05)

    recorded = dict(OUTPUT_TOPICS)
    if with_inputs:  # what this process publishes, recorded as the node receives it
        recorded.update(
            {INPUT_TOPICS[r][0]: INPUT_TOPICS[r][1][0] for r in set(bag.roles.values())}
        )
    if with_speaker:
        recorded.update(SPEAKER_TOPICS)
    recorder = TopicRecorder(
        node,
        OutputBag(outputs),
        recorded,
        latched=LATCHED_TOPICS,
    )
    bridge: Any = None
    reliable = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
    unit_ends: list[int] = [0]

    def on_state(msg: Any) -> None:
        unit_ends[0] = max(unit_ends[0], msg.header.stamp.sec * NS_PER_S + msg.header.stamp.nanosec)

    from omni_ros_msgs.msg import OmniState

    node.create_subscription(OmniState, "/omni/state", on_state, reliable)
    pubs = {
        role: node.create_publisher(
            message_class(INPUT_TOPICS[role][1][0]),
            INPUT_TOPICS[role][0],
            qos_profile_sensor_data if role != "robot_speaking" else reliable,
        )
        for role in set(bag.roles.values())
    }
    clock_pub = node.create_publisher(Clock, "/clock", 10)
    if live_view is not None:
        from omni_ros.ros.omni_live_view import TopicBridge

        bridge = TopicBridge(node, live_view)
    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    started = time.monotonic()

    def publish_clock(ns: int) -> None:
        msg = Clock()
        msg.clock.sec, msg.clock.nanosec = ns // NS_PER_S, ns % NS_PER_S
        clock_pub.publish(msg)

    try:
        waiting_since = time.monotonic()
        deadline = waiting_since + ready_timeout_s
        last_report = waiting_since
        _log.info("starting omni_flow_node (load timeout %g s) ...", ready_timeout_s)
        while True:  # the node creates its subscriptions once the backend is loaded (configure)
            if node_proc.poll() is not None:
                raise ConfigError(
                    f"omni_flow_node exited with {node_proc.returncode} before it was ready"
                    + (f"; see {log_path}" if log_path else "")
                )
            if (
                all(p.get_subscription_count() > 0 for p in pubs.values())
                and recorder.publisher_count("/omni/state") > 0
                and (not with_speaker or recorder.publisher_count("/speaker/playback") > 0)
            ):
                break
            if speaker_proc is not None and speaker_proc.poll() is not None:
                raise ConfigError(
                    f"speaker_node exited with {speaker_proc.returncode} before it was ready"
                    + (f"; see {log_path}" if log_path else "")
                )
            failure = _configure_failure(log_path)
            if failure:  # the node stays up, unconfigured: say why now instead of timing out
                raise ConfigError(f"omni_flow_node could not start: {failure}")
            now = time.monotonic()
            if now > deadline:
                raise ConfigError(
                    f"omni_flow_node not ready after {ready_timeout_s:g} s; a large model may "
                    "need longer: --load-timeout SECONDS"
                    + (f" (node log: {log_path})" if log_path else "")
                )
            if now - last_report >= 5.0:
                last_report = now
                _log.info(
                    "omni_flow_node: %s (%.0f s of %.0f s)",
                    _node_status(log_path),
                    now - waiting_since,
                    ready_timeout_s,
                )
            publish_clock(bag.start_ns)
            time.sleep(0.1)
        time.sleep(0.5)  # let discovery settle for every publisher/subscriber pair
        wall0 = time.monotonic()
        _log.info("omni_flow_node ready after %.1f s", time.monotonic() - waiting_since)
        bar = Progress(bag.message_count * loops, "replay (graph)", progress_mode(progress))
        last_clock = 0.0
        input_end_ns = 0
        loop_span_s = bag.duration_ns / NS_PER_S / rate + 0.05
        for loop, message in ((k, m) for k in range(loops) for m in bag):
            if message.log_ns == bag.start_ns:
                input_end_ns = 0  # a new pass (loops > 1)
            if message.role == "mic":
                input_end_ns = max(input_end_ns, audio_end_ns(to_raw_audio(message.msg)))
            target = wall0 + loop * loop_span_s + (message.log_ns - bag.start_ns) / NS_PER_S / rate
            while (now := time.monotonic()) < target:
                if now - last_clock >= 0.02:
                    publish_clock(
                        bag.start_ns + int((now - wall0 - loop * loop_span_s) * rate * NS_PER_S)
                    )
                    last_clock = now
                time.sleep(min(0.005, target - now))
            publish_clock(message.log_ns)
            pubs[message.role].publish(message.raw)
            bar.update()
        bar.close()
        end_wall = time.monotonic() + flush_s / rate
        # Until the unit holding the last input sample has been reported (see replay_direct).
        while (now := time.monotonic()) < end_wall and unit_ends[0] < input_end_ns:
            publish_clock(bag.end_ns + int((now - (end_wall - flush_s / rate)) * rate * NS_PER_S))
            time.sleep(0.02)
        time.sleep(0.5)  # the last outputs in flight
    finally:
        spinning.clear()
        thread.join(5)
        if bridge is not None:
            bridge.close()
        for proc in (node_proc, speaker_proc):
            if proc is None:
                continue
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log is not subprocess.DEVNULL:
            log.close()
        recorder.close()
        node.destroy_node()
        rclpy.shutdown(context=context)
    return {
        "mode": "graph",
        "wall_s": round(time.monotonic() - started, 3),
        "rate": rate,
        "node_exit_code": node_proc.returncode,
    }


# ---------------------------------------------------------------------------------------- frontend
def open_input_bag(
    bag_path: Path, remaps: Mapping[str, str] | None = None, mic_format: str = ""
) -> InputBag:
    """Open ``bag_path`` as an input bag; every way a bag can be unreadable is one ConfigError.

    Raises:
        ConfigError: not a rosbag2 folder, a broken ``metadata.yaml``, a damaged / truncated
            storage file, or a ``--remap`` naming a topic the bag does not have.
    """
    from rosbags.rosbag2 import ReaderError

    path = Path(bag_path)
    if not path.exists():
        raise ConfigError(
            f"{path} does not exist: give a rosbag2 folder (omni-ros synth makes one)"
        )
    if path.is_file() and path.suffix not in (".mcap", ".db3"):
        raise ConfigError(
            f"{path} is not a rosbag2 bag: give the bag's folder (the one holding metadata.yaml)"
        )
    try:
        bag = InputBag(path, dict(remaps or {}), mic_format=mic_format)
        topics = bag.topics()
    except ConfigError:
        raise
    except (ReaderError, OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read the bag {path}: {_why(exc)}") from exc
    for src in remaps or {}:
        if src not in topics:
            hint = suggest(src, topics) or f"; the bag has {sorted(topics)}"
            raise ConfigError(f"--remap {src}:=...: the bag has no topic {src}{hint}")
    return bag


def _why(exc: BaseException) -> str:
    """A one-line reason from a reader error (rosbags wraps yaml / mcap errors; show the cause)."""
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in str(exc):
        text += f" ({type(cause).__name__}: {cause})"
    text = " ".join(text.split())
    lower = text.lower()
    if "metadata" in lower:
        text += "; metadata.yaml is broken: restore it (or re-record the bag)"
    elif "magic" in lower or "truncat" in lower or "unexpected end" in lower:
        text += "; the file is cut short (a recording that was killed?): `mcap recover` it"
    return text[:400]


def suggest(name: str, known: Any) -> str:
    from omni_ros.ros._setup import suggest as _suggest

    return _suggest(name, known)


def replay(
    bag_path: Path,
    out_dir: Path,
    mode: str = "direct",
    backend: str | None = None,
    params_file: Path | None = None,
    remaps: dict[str, str] | None = None,
    progress: bool | str = True,
    rate: float = 1.0,
    plot: bool = True,
    loops: int = 1,
    load_timeout_s: float = LOAD_TIMEOUT_S,
    foxglove_port: int | None = None,
    with_inputs: bool = False,
    with_speaker: bool = False,
) -> dict[str, Any]:
    """Replay ``bag_path`` and write ``out_dir/{outputs/, summary.json, timeline.png}``.

    ``with_speaker`` (graph mode): ``speaker_node`` on a null sink plays the speech and its
    playback reports go into the outputs, the summary and the timeline.

    With ``foxglove_port`` the conversation is served live over the Foxglove WebSocket protocol
    on ``ws://127.0.0.1:PORT`` while it replays (:mod:`omni_ros.tools.live_view`).

    Raises:
        ConfigError: a bad argument, an unreadable bag or params file, an invalid parameter, or a
            node that could not start; the message says what to change.
    """
    if loops < 1:
        raise ConfigError(f"--loop must be >= 1, got {loops}")
    if mode not in ("graph", "direct"):
        raise ConfigError(f"--mode must be graph or direct, got {mode!r}")
    if with_speaker and mode != "graph":
        raise ConfigError("--with-speaker needs --mode graph (speaker_node is a ROS node)")
    from rosbags.rosbag2 import ReaderError

    flat = load_params_file(params_file)
    # An AudioDataStamped (ros-drivers) mic without audio_info in the bag takes the node's mic.format.
    bag = open_input_bag(bag_path, remaps, mic_format=str(flat.get("mic.format") or ""))
    if backend is None and "backend" not in flat:
        backend = "reference"
    setup = flow_setup(flat, backend)  # the node's own checks, before any output exists
    _log.debug("bag %s: %d input messages, roles %s", bag.path, bag.message_count, bag.roles)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = out_dir / "outputs"
    if outputs.exists():
        shutil.rmtree(outputs)
    view: Any = None
    if foxglove_port is not None:
        from omni_ros.tools.live_view import LiveView

        view = LiveView(
            port=foxglove_port,
            unit_ns=setup.flow.timeline.unit_ns,
            backend_deadline_ms=setup.flow.backend_deadline_ms,
            frame_policy=setup.flow.timeline.frame_policy,
        )
        for topic, role in bag.roles.items():  # advertised before the first message
            view.announce(topic, INPUT_TOPICS[role][1][0])
        for topic, msgtype in OUTPUT_TOPICS.items():
            view.announce(topic, msgtype)
        print(
            f"live view: {view.url} (Foxglove: Open connection; layout: "
            "config/foxglove_layout.json)",
            flush=True,
        )
    try:
        if mode == "direct":
            extra = replay_direct(
                bag,
                outputs,
                flat,
                backend,
                progress,
                loops=loops,
                live_view=view,
                with_inputs=with_inputs,
            )
        else:
            extra = replay_graph(
                bag,
                outputs,
                params_file,
                flat,
                backend,
                progress,
                rate,
                ready_timeout_s=load_timeout_s,
                log_path=out_dir / "node.log",
                loops=loops,
                live_view=view,
                with_inputs=with_inputs,
                with_speaker=with_speaker,
            )
    except ReaderError as exc:  # damage past the index, found while reading
        raise ConfigError(f"cannot read the bag {bag.path}: {_why(exc)}") from exc
    finally:
        if view is not None:
            view.close()
    summary = summarize(bag, outputs, {"replay": extra})
    write_summary(summary, out_dir / "summary.json")
    if plot:
        plot_timeline(bag, outputs, out_dir / "timeline.png")
    return summary


def main_replay(args: Any) -> int:
    from omni_ros.tools.bagio import parse_remaps

    if args.quiet:
        progress: bool | str = "off"
    elif args.progress:
        progress = "bar"
    else:
        progress = True  # a bar on a terminal, periodic lines otherwise
    summary = replay(
        Path(args.bag),
        Path(args.out),
        args.mode,
        args.backend,
        Path(args.params) if args.params else None,
        parse_remaps(args.remap or []),
        progress=progress,
        rate=args.rate,
        loops=args.loop,
        load_timeout_s=args.load_timeout,
        foxglove_port=args.foxglove_port if args.with_foxglove else None,
        with_inputs=args.with_inputs,
        with_speaker=getattr(args, "with_speaker", False),
    )
    print_summary(summary, Path(args.out))
    return 0


def print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    c = summary["unit_compute_ms"]
    print(
        f"backend {summary['backend']}: {summary['units']} units, {summary['turns']} turns, "
        f"{summary['proactive_events']} proactive, {summary['speech_seconds']:.1f} s of speech"
    )
    print(
        f"unit compute median {c['median']} ms, p95 {c['p95']} ms, max {c['max']} ms; "
        f"RTF median {summary['real_time_factor']['median']}"
    )
    nonzero = {k: v for k, v in summary["counters"].items() if v}
    print(f"counters: {nonzero or 'all zero'}")
    spk = summary.get("speaker")
    if spk:
        d = spk["heard_minus_scheduled_ms"]
        print(
            f"speaker_node: {spk['chunks_heard']} chunks heard ({spk['heard_seconds']:.1f} s), "
            f"{spk['late_chunks']} late, {spk['cut_chunks']} cut by a flush; first sample heard "
            f"minus its stamp: median {d['median']} ms, p95 {d['p95']} ms"
        )
    for turn in summary["turn_texts"][:8]:
        tag = " (proactive)" if turn["proactive"] else ""
        print(f"  turn {turn['turn_id']} at {turn['start_s']} s{tag}: {turn['text'][:70]!r}")
    print(
        f"outputs: {out_dir / 'outputs'} (rosbag2, mcap)  summary: {out_dir / 'summary.json'}  "
        f"plot: {out_dir / 'timeline.png'}"
    )
