"""Test harness for the real ``omni_flow_node`` over DDS: the node in a child process, a probe node
in the test process, and a sim-time driver that plays a bag-like stream (``/clock`` + stamped mic
chunks + camera frames) on a time axis far from wall time.

Everything waits on conditions with a timeout (never a fixed sleep as a proof); the pacing sleep of
the driver only sets how fast sim time runs.
"""

from __future__ import annotations

import array
import collections
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from omni_ros.core.clock import NS_PER_S

REPO = Path(__file__).resolve().parents[3]


def _installed_node() -> Path:
    """The built omni_flow_node of the sourced workspace (install/ or install-<distro>/)."""
    try:
        from ament_index_python.packages import get_package_prefix

        prefix = Path(get_package_prefix("omni_ros"))
    except Exception:  # not sourced: the default tree, so the failure names a real path
        prefix = REPO / "install" / "omni_ros"
    return prefix / "lib" / "omni_ros" / "omni_flow_node"


INSTALLED_NODE = _installed_node()
RUNNER = Path(__file__).parent / "peers" / "flow_node_runner.py"


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str, proc: Any = None) -> None:
    """Poll ``condition`` until true; fail with ``what`` (and the node's log) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"omni_flow_node exited ({proc.returncode}) while waiting for {what}\n{proc.log()}"
            )
        if time.monotonic() > deadline:
            log = proc.log() if proc is not None else ""
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{log}")
        time.sleep(0.01)


#: A lifecycle transition's goal state (lifecycle_msgs/msg/Transition ids), by which a transition
#: whose response was lost is seen to have taken place.
TRANSITION_GOALS = {1: "inactive", 2: "unconfigured", 3: "active", 4: "inactive"}


class ResentCall:
    """One service request in flight, sent again each ``resend_s`` without a response (None:
    sent once); the first reply of any copy answers. Poll :meth:`answered` (it does the
    resending), then read :meth:`result`."""

    def __init__(self, client: Any, request: Any, resend_s: float | None = None) -> None:
        self.client = client
        self.request = request
        self.resend_s = resend_s
        self.futures = [client.call_async(request)]
        self.sent_at = time.monotonic()

    def answered(self) -> bool:
        if any(f.done() for f in self.futures):
            return True
        if self.resend_s is not None and time.monotonic() - self.sent_at >= self.resend_s:
            self.futures.append(self.client.call_async(self.request))
            self.sent_at = time.monotonic()
        return False

    def result(self) -> Any:
        return next(f for f in self.futures if f.done()).result()


def call_service(
    client: Any,
    request: Any,
    proc: Any,
    timeout_s: float = 15.0,
    resend_s: float | None = None,
) -> Any:
    """Call ``client`` and return the first response; fail after ``timeout_s``.

    A response can be lost. Fast DDS sends a service's reply only once the server has matched the
    client's reply reader, waiting at most ``max_blocking_time`` (100 ms) for it, then drops it
    (ros2/rmw_fastrtps, rmw_fastrtps_shared_cpp/src/rmw_response.cpp, ``rmw_send_response``:
    ``RMW_RET_TIMEOUT``; PRs #467 and #704). rclpy logs it in the server as "failed to send
    response (timeout): client will not receive response" (rclpy/service.py,
    ``Service.send_response``) and the client waits forever. ``service_is_ready`` says only that
    the client has seen the server, not the reverse, so a client created just before its first call
    can lose that call's reply: one clean-clone CI run (Jazzy) failed so on a first ``get_state``.

    ``resend_s``: for a request that may be repeated (a read such as GetState or GetParameters),
    send it again each ``resend_s`` without a response (:class:`ResentCall`).
    """
    wait_for(client.service_is_ready, timeout_s, f"service {client.srv_name}", proc)
    call = ResentCall(client, request, resend_s)
    wait_for(call.answered, timeout_s, f"a response from {client.srv_name}", proc)
    return call.result()


def lifecycle_transition(
    change: Any,
    get_state: Any,
    transition_id: int,
    proc: Any,
    timeout_s: float = 15.0,
    lost_after_s: float = 2.0,
) -> bool:
    """Trigger lifecycle transition ``transition_id`` through ``change`` (ChangeState); True if it
    took place.

    A ChangeState cannot be sent twice (the second would fail: the node has moved on), so a reply
    lost as :func:`call_service` explains is settled by the node's state instead: past
    ``lost_after_s`` without a reply, ``get_state`` (resent) is asked each second whether the node
    is in the transition's goal state. A reply that does come is the answer.
    """
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    goal = TRANSITION_GOALS[transition_id]
    wait_for(change.service_is_ready, timeout_s, f"service {change.srv_name}", proc)
    future = change.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
    next_check = time.monotonic() + lost_after_s
    deadline = time.monotonic() + timeout_s
    reached = False

    def settled() -> bool:
        nonlocal next_check, reached
        if future.done():
            return True
        if time.monotonic() >= next_check:
            left = max(0.1, deadline - time.monotonic())
            state = call_service(get_state, GetState.Request(), proc, left, resend_s=1.0)
            reached = not future.done() and state.current_state.label == goal
            next_check = time.monotonic() + 1.0
        return future.done() or reached

    wait_for(settled, timeout_s, f"transition {transition_id} ({change.srv_name})", proc)
    return reached or bool(future.result().success)


_next_domain = [0]


def fresh_domain_id() -> int:
    """A ROS domain for one node + probe pair, so that concurrent nodes never see each other's
    ``/clock``, ``/diagnostics`` or outputs (walks on from the session's random domain)."""
    base = int(os.environ.get("ROS_DOMAIN_ID", "1"))
    _next_domain[0] += 1
    return (base + _next_domain[0] * 7) % 101 + 1


class NodeProcess:
    """The node in a child process on its own ROS domain; its output goes to a log file that is
    shown when a test fails."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        beside: NodeProcess | None = None,
    ) -> None:
        self.log_path = log_path
        # ``beside``: share that process's domain and namespace (e.g. a speaker_node next to
        # the omni_flow_node it plays for).
        self.domain_id = beside.domain_id if beside is not None else fresh_domain_id()
        # A namespace of its own, /clock and /diagnostics included: with the domain, this keeps
        # concurrent test runs on this machine (other sessions, other suites) from mixing.
        self.namespace = (
            beside.namespace if beside is not None else f"/omni_test_{os.getpid()}_{self.domain_id}"
        )
        argv = [
            *argv,
            *("-r", f"__ns:={self.namespace}"),
            *("-r", f"/clock:={self.namespace}/clock"),
            *("-r", f"/diagnostics:={self.namespace}/diagnostics"),
        ]
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop())
        child_env = {**os.environ, **(env or {}), "ROS_DOMAIN_ID": str(self.domain_id)}
        self.proc = subprocess.Popen(
            list(argv), stdout=self._log, stderr=subprocess.STDOUT, env=child_env
        )

    @classmethod
    def installed(
        cls, params: dict[str, Any], log_path: Path, extra: Sequence[str] = ()
    ) -> NodeProcess:
        return cls([str(INSTALLED_NODE), "--ros-args", *ros_params(params), *extra], log_path)

    @classmethod
    def with_doubles(
        cls,
        params: dict[str, Any],
        log_path: Path,
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> NodeProcess:
        argv = [sys.executable, str(RUNNER), "--ros-args", *ros_params(params), *extra]
        return cls(argv, log_path, env)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def log(self) -> str:
        self._log.flush()
        return "--- omni_flow_node log ---\n" + self.log_path.read_text(errors="replace")[-6000:]

    def interrupt_and_wait(self, timeout_s: float = 15.0) -> int:
        """Ctrl-C the node (SIGINT) and return its exit code."""
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 10.0) -> None:
    """Terminate ``proc`` (SIGTERM) if it still runs, kill it if it outlives ``timeout_s``; reap it.

    A peer's exit is not what the calling test is about (test_shutdown tests exits). A peer that
    outlives SIGTERM is reported as a warning: twice this happened in clean-clone CI runs, a
    mic_node still in ``rclpy.spin`` after its first SIGTERM (a second one ended it at once).
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            warnings.warn(
                f"peer {proc.args!r} did not exit within {timeout_s:g} s of SIGTERM; killed",
                stacklevel=2,
            )
            proc.kill()
            proc.wait(timeout=timeout_s)


def faulty_double_params(control: Path, **extra: Any) -> dict[str, Any]:
    """Parameters of a node on sim time with the ``faulty_double`` backend
    (``peers/backend_doubles.py``), switched through files in ``control`` (created here), a 500 ms
    watermark and ``/diagnostics`` at 5 Hz; ``extra`` adds or overrides (dotted names)."""
    control.mkdir(exist_ok=True)
    return {
        "use_sim_time": True,
        "backend": "faulty_double",
        "faulty_double.control_dir": str(control),
        "timeline.watermark_ns": 500_000_000,
        "diagnostics.period_s": 0.2,
        **extra,
    }


def ros_params(params: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in params.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out += ["-p", f"{key}:={text}"]
    return out


class Probe:
    """A test-side node in its own context, spun by a background thread; collects every output."""

    def __init__(self, domain_id: int, namespace: str = "") -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.action import ActionClient
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import (
            DurabilityPolicy,
            QoSProfile,
            ReliabilityPolicy,
            qos_profile_sensor_data,
        )
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import Image
        from std_srvs.srv import Trigger

        from omni_ros_msgs.action import Ask
        from omni_ros_msgs.msg import AudioChunk, OmniState, OmniText, ProactiveAction
        from omni_ros_msgs.srv import SetPrompt

        ns = namespace.rstrip("/")
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("flow_probe", context=self.context)
        self.lock = threading.Lock()
        self.received: dict[str, list[Any]] = {
            k: [] for k in ("state", "text", "speech", "proactive", "diag")
        }
        reliable = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(
            depth=10,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        for key, msg_type, topic, qos in (
            ("state", OmniState, f"{ns}/omni/state", latched),
            ("text", OmniText, f"{ns}/omni/text", reliable),
            ("speech", AudioChunk, f"{ns}/omni/speech", reliable),
            ("proactive", ProactiveAction, f"{ns}/omni/proactive", reliable),
            ("diag", DiagnosticArray, f"{ns}/diagnostics", reliable),
        ):
            self.node.create_subscription(msg_type, topic, self._collector(key), qos)
        self.clock_pub = self.node.create_publisher(Clock, f"{ns}/clock", reliable)
        self.mic_pub = self.node.create_publisher(
            AudioChunk, f"{ns}/audio/mic", qos_profile_sensor_data
        )
        self.cam_pub = self.node.create_publisher(
            Image, f"{ns}/camera/image_raw", qos_profile_sensor_data
        )
        self.interrupt = self.node.create_client(Trigger, f"{ns}/omni/interrupt")
        self.reset = self.node.create_client(Trigger, f"{ns}/omni/reset")
        self.set_prompt = self.node.create_client(SetPrompt, f"{ns}/omni/set_prompt")
        self.ask = ActionClient(self.node, Ask, f"{ns}/omni/ask")
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self.executor.spin()
        except ExternalShutdownException:
            pass

    def _collector(self, key: str) -> Callable[[Any], None]:
        def collect(msg: Any) -> None:
            with self.lock:
                self.received[key].append(msg)

        return collect

    def snapshot(self, key: str) -> list[Any]:
        with self.lock:
            return list(self.received[key])

    def count(self, key: str) -> int:
        with self.lock:
            return len(self.received[key])

    def call(
        self,
        client: Any,
        request: Any,
        proc: NodeProcess,
        timeout_s: float = 15.0,
        resend_s: float | None = None,
    ) -> Any:
        """:func:`call_service` (``resend_s`` for a request that may be repeated)."""
        return call_service(client, request, proc, timeout_s, resend_s)

    def lifecycle(self, proc: NodeProcess) -> tuple[Any, Any]:
        """(change_state, get_state) clients of the node's lifecycle services."""
        from lifecycle_msgs.srv import ChangeState, GetState

        base = f"{proc.namespace}/omni_flow_node"
        return (
            self.node.create_client(ChangeState, f"{base}/change_state"),
            self.node.create_client(GetState, f"{base}/get_state"),
        )

    def close(self) -> None:
        import rclpy

        self.executor.shutdown(timeout_sec=2)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(timeout=5)


def stamp(stamp_ns: int) -> Any:
    from builtin_interfaces.msg import Time

    return Time(sec=stamp_ns // NS_PER_S, nanosec=stamp_ns % NS_PER_S)


def to_ns(time_msg: Any) -> int:
    return int(time_msg.sec) * NS_PER_S + int(time_msg.nanosec)


def mic_chunk(
    start_ns: int,
    duration_ns: int,
    rate: int = 16_000,
    channels: int = 1,
    encoding: str = "S16LE",
    amplitude: float = 0.001,
    seed: int = 0,
) -> Any:
    """A chunk of faint noise (no speech: the VAD must not barge in) captured from ``start_ns``."""
    from std_msgs.msg import Header

    from omni_ros_msgs.msg import AudioChunk

    n = duration_ns * rate // NS_PER_S
    noise = np.random.default_rng(seed).normal(0, amplitude, (n, channels)).astype(np.float32)
    data = (
        (noise * 32767).astype("<i2").tobytes()
        if encoding == "S16LE"
        else noise.astype("<f4").tobytes()
    )
    msg = AudioChunk(header=Header(stamp=stamp(start_ns), frame_id="test_mic"), sample_rate=rate,
                     channels=channels, encoding=encoding)  # fmt: skip
    msg.data = array.array("B", data)
    return msg


def image(stamp_ns: int, width: int = 32, height: int = 24, encoding: str = "rgb8",
          step: int | None = None, data: bytes | None = None) -> Any:  # fmt: skip
    """A camera frame; ``step`` / ``data`` / ``encoding`` can be made inconsistent on purpose."""
    from sensor_msgs.msg import Image
    from std_msgs.msg import Header

    step = width * 3 if step is None else step
    if data is None:
        data = bytes((np.arange(step * height) * 7 % 251).astype(np.uint8))
    msg = Image(header=Header(stamp=stamp(stamp_ns), frame_id="cam"), width=width, height=height,
                encoding=encoding, step=step, is_bigendian=0)  # fmt: skip
    msg.data = array.array("B", data)
    return msg


CHUNK_NS = 50_000_000  # RealTimeMic
CHUNK_SAMPLES = 800


class RealTimeMic:
    """A live microphone for a node on the system clock: publishes a 50 ms chunk (mic_node's
    default) every 50 ms of wall time, stamped at its first sample. ``hold()`` keeps the chunks
    back (a publisher that runs late); ``release()`` sends what was held, 2 ms apart, stamps
    unchanged, and goes on in real time. ``delays_ns``: how long after its last sample each
    chunk was published."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.sent_samples = 0
        self.start_ns = 0
        self.delays_ns: list[int] = []
        self._held: collections.deque[Any] = collections.deque()
        self._holding = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        start_ns = self.start_ns = time.time_ns()
        k = 0
        while not self._stop.is_set():
            stamp_ns = start_ns + k * CHUNK_NS
            # A chunk exists once its last sample is captured.
            time.sleep(max(0.0, (stamp_ns + CHUNK_NS - time.time_ns()) / 1e9))
            msg = mic_chunk(stamp_ns, CHUNK_NS, seed=k)
            with self._lock:
                if self._holding:
                    self._held.append((msg, stamp_ns + CHUNK_NS))
                else:
                    self._flush()
                    self._send(msg, stamp_ns + CHUNK_NS)
            k += 1

    def _send(self, msg: Any, captured_ns: int) -> None:
        self.probe.mic_pub.publish(msg)
        self.delays_ns.append(time.time_ns() - captured_ns)
        self.sent_samples += CHUNK_SAMPLES

    def _flush(self) -> None:
        while self._held:
            self._send(*self._held.popleft())
            time.sleep(0.002)

    def hold(self) -> None:
        with self._lock:
            self._holding = True

    def release(self) -> None:
        with self._lock:
            self._holding = False
            self._flush()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class SimDriver:
    """Plays a bag-like stream in sim time: each step publishes ``/clock`` = t and the mic chunk
    captured during the step (stamped at its first sample); a camera frame every ``frame_every``
    steps. ``pace_s`` of wall time per step sets the replay rate.

    With ``lockstep`` (default) sim time never runs more than ``2 * unit_ns + watermark_ns``
    past the last OmniState's stamp: the node is never made to drop units because this machine
    is slow (which would be correct behaviour, counted in ``units_dropped_overrun``, but not what
    a test of "a state every unit" is about). It also makes tests independent of machine speed.
    """

    def __init__(self, probe: Probe, start_ns: int, step_ns: int = 100_000_000,
                 pace_s: float = 0.025, frame_every: int = 2, lockstep: bool = True,
                 unit_ns: int = NS_PER_S, watermark_ns: int = 500_000_000) -> None:  # fmt: skip
        self.probe = probe
        self.start_ns = start_ns
        self.now_ns = start_ns
        self.step_ns = step_ns
        self.pace_s = pace_s
        self.frame_every = frame_every
        self.lockstep = lockstep
        self.ahead_ns = 2 * unit_ns + watermark_ns
        self.steps = 0
        self.send_mic = True
        self.mic_samples_sent = 0  # at 16 kHz, every chunk published by step()

    def _limit_ns(self) -> int:
        with self.probe.lock:
            states = self.probe.received["state"]
            last = to_ns(states[-1].header.stamp) if states else self.start_ns
        return last + self.ahead_ns

    def publish_clock(self, now_ns: int) -> None:
        from rosgraph_msgs.msg import Clock

        self.probe.clock_pub.publish(Clock(clock=stamp(now_ns)))

    def step(self, n: int = 1, proc: NodeProcess | None = None) -> None:
        for _ in range(n):
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"omni_flow_node exited ({proc.returncode})\n{proc.log()}")
            if self.lockstep:
                wait_for(lambda: self.now_ns + self.step_ns <= self._limit_ns(), 60,
                         "the node to finish the previous unit (lockstep)", proc)  # fmt: skip
            start = self.now_ns
            self.now_ns += self.step_ns
            if self.send_mic:
                self.probe.mic_pub.publish(mic_chunk(start, self.step_ns, seed=self.steps))
                self.mic_samples_sent += self.step_ns * 16_000 // NS_PER_S
            if self.frame_every and self.steps % self.frame_every == 0:
                self.probe.cam_pub.publish(image(start))
            self.publish_clock(self.now_ns)
            self.steps += 1
            time.sleep(self.pace_s)

    def start(self, proc: NodeProcess, timeout_s: float = 60.0) -> None:
        """Wait until the node subscribes ``/clock`` and the mic (so nothing sent is lost to
        discovery or judged against a zero clock), then publish the bag's first clock time."""
        probe = self.probe
        wait_for(
            lambda: probe.clock_pub.get_subscription_count() > 0,
            timeout_s,
            "the node's /clock subscription",
            proc,
        )
        wait_for(
            lambda: probe.mic_pub.get_subscription_count() > 0,
            timeout_s,
            "the node's mic subscription",
            proc,
        )

        # The node must hold the bag's time before any input arrives (else it judges the first
        # chunks against a zero clock): its /diagnostics are stamped with its ROS clock.
        def node_clock_set() -> bool:
            self.publish_clock(self.now_ns)
            return any(to_ns(d.header.stamp) >= self.start_ns for d in probe.snapshot("diag"))

        wait_for(node_clock_set, timeout_s, "the node's clock to reach the bag's start", proc)

    def run_until(
        self, condition: Callable[[], bool], timeout_s: float, what: str, proc: NodeProcess
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout_s} s waiting for {what}\n{proc.log()}"
                )
            self.step(1, proc)


@contextmanager
def running(proc: NodeProcess) -> Iterator[Probe]:
    """Yield a probe for a started node; always stop both."""
    probe = Probe(proc.domain_id, proc.namespace)
    try:
        yield probe
    finally:
        probe.close()
        proc.stop()


def diag_values(array_msg: Any, suffix: str = ": Omni-Flow") -> dict[str, str] | None:
    """Key/values of the Omni-Flow status in one DiagnosticArray (None if absent)."""
    for status in array_msg.status:
        if status.name.endswith(suffix):
            return {kv.key: kv.value for kv in status.values}
    return None
