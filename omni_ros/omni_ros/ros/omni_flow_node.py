"""``omni_flow_node``: the Omni-Flow loop as a ROS 2 lifecycle (managed) node.

The node only translates: messages -> :mod:`omni_ros.ros.conversions` -> :class:`OmniFlow` (which
owns the worker thread that runs the backend), and output events -> messages. No callback ever
runs inference: input callbacks and services only queue work for OmniFlow, and the worker
publishes the outputs itself (rclpy publishing is thread-safe).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from typing import Any, ClassVar

from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Bool
from std_srvs.srv import Trigger

from omni_ros import topics
from omni_ros.backends.base import Backend, create_backend
from omni_ros.core.audio import ArrivalStamper
from omni_ros.core.errors import DecodeError, OmniError
from omni_ros.core.flow import OmniFlow
from omni_ros.core.mic_stream import frames_of
from omni_ros.core.session import DuplexSession
from omni_ros.core.types import (
    FloatArray,
    OutputEvent,
    ProactiveEvent,
    RawAudio,
    RawImage,
    SpeechFlush,
    SpeechOut,
    StateOut,
    TextOut,
    VoiceActivity,
)
from omni_ros.ros import conversions as conv
from omni_ros.ros._ask import AskTracker
from omni_ros.ros._ask_server import AskHost
from omni_ros.ros._camera import compressed_from_cdr, image_from_cdr
from omni_ros.ros._clock_watch import ClockWatch, mark_stall
from omni_ros.ros._diagnostics import DiagnosticsReporter
from omni_ros.ros._inputs import PromptLimits, check_prompt, read_voice
from omni_ros.ros._params import ParamSpec, accelerate_with_tensorrt, ros_value
from omni_ros.ros._run import spin_node
from omni_ros.ros._setup import FLOW_PARAM_SPECS, NODE_PARAMS, build_backend_config, node_setup
from omni_ros.ros.audio_common import mic_subscriptions
from omni_ros.ros.graph_advice import GraphAdvisor
from omni_ros.ros.qos import profile
from omni_ros_msgs.action import Ask
from omni_ros_msgs.msg import AudioChunk, OmniState, OmniText, Playback, ProactiveAction
from omni_ros_msgs.msg import SpeechFlush as SpeechFlushMsg
from omni_ros_msgs.srv import SetPrompt

#: Longest wait for a backend call in flight before the backend is closed anyway [s].
CLOSE_WAIT_S = 5.0
#: How much longer than the flow's prepare deadline omni/set_prompt waits for its outcome [s].
PROMPT_ANSWER_MARGIN_S = 5.0
#: A middleware receive time further back than this is not believed (clock skew) [ns].
MAX_WAITED_NS = 60_000_000_000


class RosClock:
    """The node's ROS clock as a core ``Clock`` (sim time under ``use_sim_time``)."""

    def __init__(self, node: LifecycleNode) -> None:
        self._ros_clock = node.get_clock()

    def now_ns(self) -> int:
        return int(self._ros_clock.now().nanoseconds)


class OmniFlowNode(LifecycleNode):
    """Runs MiniCPM-o style full-duplex Omni-Flow on ROS topics (a lifecycle node).

    Lifecycle: configure validates the parameters, creates the backend (loading its weights) and
    the OmniFlow runner; activate starts the loop; deactivate stops it; cleanup / shutdown close
    the backend (releasing the GPU). With ``autostart`` the node configures and activates itself.

    Parameters (read at configure; change them, then cleanup + configure to apply): the node's
    own are ``omni_ros.ros._setup.NODE_PARAMS`` (name -> default, description; README's table is
    tested against it), plus ``<backend>.*`` (the chosen backend's config fields, ``omni-ros
    backends`` lists them) and ``timeline.*``, ``session.*``, ``vad.*``, ``aec.*``, ``flow.*``
    (every field of ``FlowConfig`` and its nested configs, same names, types and defaults;
    ``flow.system_prompt`` is ``system_prompt``, and ``timeline.unit_ns``, ``first_unit_ns`` and
    ``sample_rate`` are dictated by the backend). Every name and type is checked by
    ``omni_ros.ros._setup.node_setup``.

    Names and QoS come from the topic table (``omni_ros/topics.py``, :func:`omni_ros.ros.qos.profile`).
    Subscribes (relative names; sensor-data QoS, depth 100 for the mic; robot_speaking reliable):
        camera/image_raw (sensor_msgs/Image) or camera/image_raw/compressed
        (sensor_msgs/CompressedImage), audio/mic (omni_ros_msgs/AudioChunk or ``mic.type``),
        robot_speaking (std_msgs/Bool: OTHER speech on the robot, not ours),
        speaker/playback (omni_ros_msgs/Playback, reliable: what the speaker really played; the
        echo canceller's reference and OmniState.playing).
    Publishes:
        omni/speech (omni_ros_msgs/AudioChunk, 24 kHz, reliable, ``turn_id`` set),
        omni/speech_flush (omni_ros_msgs/SpeechFlush, reliable: every cancelled span of speech),
        omni/text (OmniText, reliable), omni/proactive (ProactiveAction, reliable, when a
        proactive turn completes), omni/state (OmniState, reliable + transient-local, every unit,
        after every flush and on backend errors), omni/user_speaking (std_msgs/Bool, reliable +
        transient-local: the VAD hears the user), /diagnostics (DiagnosticArray).
    Services: omni/interrupt (std_srvs/Trigger), omni/set_prompt (omni_ros_msgs/SetPrompt),
        omni/reset (std_srvs/Trigger). Action: omni/ask (omni_ros_msgs/Ask).

    Unstamped input (``header.stamp`` 0, which many drivers publish) is stamped on arrival (audio
    laid end to end, see :class:`~omni_ros.core.audio.ArrivalStamper`) and counted in
    ``/diagnostics`` (``unstamped_audio``, ``unstamped_images``). ``omni/set_prompt`` answers
    success only after the prompt and the voice passed every check and the backend prepared
    them (it is served by the ``omni/ask`` companion's executor, since it waits); a request
    refused by a check leaves the running conversation untouched, one the backend refuses
    leaves the previous prompt in force (``prompt_errors``). Every dropped or zero-filled mic
    sample is counted by cause in OmniState and ``/diagnostics`` (docs/RELIABILITY.md).
    """

    param_specs: ClassVar[list[ParamSpec]] = FLOW_PARAM_SPECS

    def __init__(self, node_name: str = "omni_flow_node", **kwargs: Any) -> None:
        # Overrides are declared automatically so that ``<backend>.*`` (whose fields depend on the
        # backend) arrive as given, and a typo inside a known namespace fails configure loudly.
        super().__init__(node_name, automatically_declare_parameters_from_overrides=True, **kwargs)
        for name, (default, text) in NODE_PARAMS.items():
            self._declare(name, default, text)
        for spec in self.param_specs:
            self._declare(
                spec.name, ros_value(spec.default), f"{spec.type_name}: {spec.description}"
            )
        self._group = ReentrantCallbackGroup()
        self._omni_clock = RosClock(self)
        self._flow: OmniFlow | None = None
        self._backend: Backend | None = None
        self._entities: list[Any] = []
        self._publishers_lc: list[Any] = []
        self._active: bool = False
        self._ask = AskTracker()
        # One action server for the node's lifetime (not per configure: its executor threads
        # would be created again at every lifecycle cycle); goals are refused while inactive.
        self._ask_host: AskHost | None = AskHost(
            self,
            self._execute_ask,
            lambda: self._active,
            max_goals=int(self.get_parameter("ask.max_goals").value),
        )
        # omni/set_prompt waits for the backend to prepare the new prompt (the flow prepares,
        # then swaps), so it is served by the companion's executor: the callbacks of this node's
        # single-threaded executor (mic, clock, camera) must never wait.
        self._prompt_service = self._ask_host.node.create_service(
            SetPrompt,
            self.resolve_service_name(topics.SET_PROMPT),
            self._on_prompt,
            callback_group=ReentrantCallbackGroup(),
        )
        self._stamper = ArrivalStamper()
        self._unstamped_images = 0
        self._oversize_images = 0  # refused from the serialized header, never deserialized
        # Input that arrives while the node is not active (configured or not) is not processed:
        # counted, so that what a publisher sent is accounted for (mic samples, camera frames).
        self._inactive_audio_samples = 0
        self._inactive_images = 0
        self._diag = DiagnosticsReporter()
        self._diag.inputs = self._input_counts
        self._diag_pub = self.create_publisher(
            DiagnosticArray, topics.DIAGNOSTICS.name, profile(topics.DIAGNOSTICS)
        )
        # Warns once when the camera / mic is in the graph under another name or type.
        self._graph_advisor = GraphAdvisor(
            self,
            lambda: self._active,
            self._camera_input,
            lambda: (topics.MIC.name, self._mic_type()),
        )
        try:
            period_s = max(float(self.get_parameter("diagnostics.period_s").value), 0.05)
        except (TypeError, ValueError):
            self.get_logger().error("diagnostics.period_s must be a number; using 1.0")
            period_s = 1.0
        try:
            stall_s = float(self.get_parameter("diagnostics.clock_stall_s").value)
        except (TypeError, ValueError):
            self.get_logger().error("diagnostics.clock_stall_s must be a number; using 2.0")
            stall_s = 2.0
        self._clock_watch = ClockWatch(stall_s)
        # Steady time: diagnostics keep coming while a replayed bag (sim time) is paused.
        self.create_timer(
            period_s, self._publish_diagnostics, clock=Clock(clock_type=ClockType.STEADY_TIME)
        )

    def _declare(self, name: str, default: Any, text: str) -> None:
        if self.has_parameter(name):  # given as an override, declared already
            return
        descriptor = ParameterDescriptor(description=text, dynamic_typing=default is None)
        self.declare_parameter(name, default, descriptor)

    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    # ---------------------------------------------------------------------------------- lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except Exception as exc:  # a backend's own error included: report it, never crash
            kind = "" if isinstance(exc, OmniError) else f"{type(exc).__name__}: "
            self.get_logger().error(f"configure failed: {kind}{exc}")
            self._release()
            return TransitionCallbackReturn.FAILURE
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        # The one configuration path (ros/_setup.py), shared with both replay modes.
        setup = node_setup({name: p.value for name, p in self._parameters.items()})
        name, params, config = setup.backend, setup.backend_params, setup.flow
        build_backend_config(setup)  # its own checks first: a derived timeout is named as such
        # Checked before anything embeds it: a 1 MB prompt must be refused, not tokenised.
        check_prompt(config.system_prompt, self._limits())
        self.get_logger().info(f"loading backend {name!r} {params} ...")
        started = time.monotonic()
        self._backend = create_backend(name, params)
        # Backends that build their networks lazily (reference) expose them as ``model``:
        # touching it loads the weights now, in configure, not in the first unit.
        getattr(self._backend, "model", None)
        if self._param("tensorrt.enabled"):
            self._diag.components = accelerate_with_tensorrt(
                self._backend,
                str(self._param("tensorrt.engine_dir")),
                str(self._param("tensorrt.components")),
            )
        voice = self._load_voice(str(self._param("ref_voice_path")))
        self._flow = OmniFlow(config, self._backend, self._omni_clock, self._emit)
        self._diag.schedule = functools.partial(_schedule_values, self._flow.session)
        self._diag.echo_path = functools.partial(dict, self._flow.echo_path_status)
        self._diag.echo = self._flow.echo_status
        metrics = getattr(self._backend, "metrics", None)
        self._diag.backend_metrics = metrics if callable(metrics) else dict
        if voice is not None:
            self._flow.set_prompt(config.system_prompt, voice)
        self.get_logger().info(f"backend {name!r} ready in {time.monotonic() - started:.1f} s")
        self._create_entities()

    def _load_voice(self, path: str) -> FloatArray | None:
        if self._backend is None:
            raise OmniError("no backend: configure the node before loading a reference voice")
        return read_voice(path, int(self._backend.input_sample_rate), self._limits())

    def _limits(self) -> PromptLimits:
        return PromptLimits(
            max_prompt_bytes=int(self._param("prompt.max_bytes")),
            min_voice_s=float(self._param("ref_voice.min_s")),
            max_voice_s=float(self._param("ref_voice.max_s")),
        )

    def _input_counts(self) -> dict[str, int]:
        return {
            "unstamped_audio": self._stamper.unstamped,
            "unstamped_images": self._unstamped_images,
            "oversize_images": self._oversize_images,
            "inactive_audio_samples": self._inactive_audio_samples,
            "inactive_images": self._inactive_images,
            "ask_goals_rejected": self._ask_host.rejected if self._ask_host is not None else 0,
        }

    def _create_entities(self) -> None:
        # Names and QoS from the topic table (omni_ros/topics.py), the one list bags and tools use.
        group = self._group

        def lc_pub(msg_type: Any, topic: topics.Topic) -> Any:
            return self.create_lifecycle_publisher(msg_type, topic.name, profile(topic))

        def sub(msg_type: Any, topic: topics.Topic, callback: Any, **kwargs: Any) -> Any:
            qos = profile(topic, subscriber=True)
            return self.create_subscription(msg_type, topic.name, callback, qos, **kwargs)

        self._speech_pub = lc_pub(AudioChunk, topics.SPEECH)
        self._flush_pub = lc_pub(SpeechFlushMsg, topics.SPEECH_FLUSH)
        self._text_pub = lc_pub(OmniText, topics.TEXT)
        self._proactive_pub = lc_pub(ProactiveAction, topics.PROACTIVE)
        self._state_pub = lc_pub(OmniState, topics.STATE)
        self._user_speaking_pub = lc_pub(Bool, topics.USER_SPEAKING)
        self._publishers_lc = [
            self._speech_pub,
            self._flush_pub,
            self._text_pub,
            self._proactive_pub,
            self._state_pub,
            self._user_speaking_pub,
        ]
        if self._param("camera.compressed"):
            cam = (CompressedImage, topics.CAMERA_COMPRESSED, conv.compressed_to_raw)
        else:
            cam = (Image, topics.CAMERA, conv.image_to_raw)
        self._entities = [
            # Serialized (raw=True): the size is read from the bytes before anything is
            # deserialized, so a huge frame never holds the executor (ros/_camera.py).
            sub(cam[0], cam[1], lambda buf: self._on_camera(buf, cam[0], cam[2]), raw=True),
            *mic_subscriptions(
                self,
                self._mic_type(),
                self._on_mic,
                self._on_mic_raw,
                profile(topics.MIC, subscriber=True),
                str(self.get_parameter("mic.info_topic").value),
                str(self.get_parameter("mic.format").value),
            ),
            sub(Bool, topics.ROBOT_SPEAKING, self._on_robot_speaking),
            sub(Playback, topics.PLAYBACK, self._on_playback),
            self.create_service(
                Trigger, topics.INTERRUPT, self._on_interrupt, callback_group=group
            ),
            self.create_service(Trigger, topics.RESET, self._on_reset, callback_group=group),
        ]

    def _mic_type(self) -> str:
        return str(self.get_parameter("mic.type").value)

    def _camera_input(self) -> tuple[str, str]:
        cam = (
            topics.CAMERA_COMPRESSED
            if self.get_parameter("camera.compressed").value
            else topics.CAMERA
        )
        return cam.name, cam.type

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # enables the lifecycle publishers first
        if self._flow is None:
            return TransitionCallbackReturn.FAILURE
        self._flow.start()
        self._active = True
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        if not self._stop_flow():
            return TransitionCallbackReturn.ERROR
        return super().on_deactivate(state)

    def _stop_flow(self) -> bool:
        self._active = False
        try:
            if self._flow is not None:
                self._flow.stop()
                saved = self._flow.echo_path_status.get("echo_path.saved")
                if saved is not None:  # aec.echo_path_file is set
                    self.get_logger().info(
                        f"echo path ({self._flow.config.aec.echo_path_file}): {saved}"
                    )
        except OmniError as exc:
            self.get_logger().error(f"stopping the Omni-Flow loop failed: {exc}")
            return False
        return True

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.close()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.close()  # back to unconfigured, holding nothing
        return TransitionCallbackReturn.SUCCESS

    def close(self) -> None:
        """Stop the loop and release the backend without a transition (used at process exit)."""
        self._stop_flow()
        self._release()

    def destroy_node(self) -> None:
        if self._ask_host is not None:
            self._ask_host.close()
            self._ask_host = None
        super().destroy_node()

    def _release(self) -> None:
        """Destroy the configure-time entities and close the backend (frees the GPU)."""
        for entity in self._entities:
            destroy = (
                self.destroy_service if hasattr(entity, "srv_type") else self.destroy_subscription
            )
            destroy(entity)
        for publisher in self._publishers_lc:
            self.destroy_lifecycle_publisher(publisher)
        self._entities, self._publishers_lc = [], []
        self._close_backend()
        self._stamper.reset()
        self._diag.clear()

    def _close_backend(self) -> None:
        """Close the flow's backend-call thread and then the backend, never both at once.

        A backend call may still be in flight (the worker does not wait for it when it stops). A
        backend's connection is not safe to close from another thread while that call uses it
        (vllm_omni's websocket raised ``ConcurrencyError`` at SIGTERM), so the call is asked to
        stop (``interrupt``), waited for (bounded), and only then is the backend closed. A close
        that still fails is logged: the node must reach unconfigured, never stay half-finalized.
        """
        flow, backend = self._flow, self._backend
        self._backend, self._flow = None, None
        if flow is not None:
            if not flow.wait_backend_idle(0.0) and backend is not None:
                try:
                    backend.interrupt()
                except Exception as exc:  # best effort: the wait below still bounds it
                    self.get_logger().warning(f"backend interrupt at close failed: {exc!r}")
            if not flow.wait_backend_idle(CLOSE_WAIT_S):
                self.get_logger().warning(
                    f"a backend call was still running after {CLOSE_WAIT_S:.0f} s; closing anyway"
                )
            flow.close()  # ends its backend-call thread (which also holds the old backend)
        if backend is not None:
            try:
                backend.close()
            except Exception as exc:
                self.get_logger().error(f"closing the backend failed: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------------------------ inputs
    def _push(self, method: str, raw: Any) -> None:
        if method in ("push_audio", "push_image"):
            self._clock_watch.inputs += 1
        if self._flow is not None and self._active:
            getattr(self._flow, method)(raw)  # queues only; bad data is counted by the core
        elif method == "push_audio":
            self._inactive_audio_samples += frames_of(raw)
        elif method == "push_image":
            self._inactive_images += 1

    def _on_mic(self, msg: AudioChunk, info: Any) -> None:
        """``info`` (rclpy's MessageInfo) says when the middleware received the chunk: a chunk
        that waited for this callback past its unit's close is an executor stall, not late."""
        self._on_mic_raw(conv.audio_chunk_to_raw(msg), _waited_ns(info))

    def _on_mic_raw(self, raw: RawAudio, waited_ns: int = 0) -> None:  # or audio_common's
        now = self._omni_clock.now_ns()
        raw = dataclasses.replace(self._stamper.stamp(raw, now), received_ns=now - waited_ns)
        self._push("push_audio", raw)

    def _on_camera(self, buf: bytes, msg_type: Any, convert: Any) -> None:
        try:
            frame = (compressed_from_cdr if msg_type is CompressedImage else image_from_cdr)(buf)
        except DecodeError:
            # Not the CDR layout read here (another middleware's encoding?): the slow way.
            self._push("push_image", self._stamped(convert(deserialize_message(buf, msg_type))))
            return
        if frame.refused:
            self._oversize_images += 1
            self.get_logger().warning(
                f"camera: refused a frame before deserializing it: {frame.refused} "
                f"({self._oversize_images} so far)",
                throttle_duration_sec=5.0,
            )
        # A refused frame goes on without its pixels: the core counts it (decode_errors,
        # dropped_frames) like any frame it refuses.
        self._push("push_image", self._stamped(frame.image))

    def _stamped(self, raw: RawImage) -> RawImage:
        if raw.stamp_ns != 0:
            return raw
        self._unstamped_images += 1
        return dataclasses.replace(raw, stamp_ns=self._omni_clock.now_ns())

    def _on_playback(self, msg: Playback) -> None:
        self._push("on_playback", conv.msg_to_playback(msg))

    def _on_robot_speaking(self, msg: Bool) -> None:
        self._push("set_robot_speaking", bool(msg.data))

    def _on_interrupt(self, _req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        resp.success, resp.message = self._call("interrupt")
        return resp

    def _on_reset(self, _req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        resp.success, resp.message = self._call("reset")
        return resp

    def _on_prompt(self, req: SetPrompt.Request, resp: SetPrompt.Response) -> SetPrompt.Response:
        """Checks everything first; only a request that passed them all goes to the backend,
        and the answer waits for its prepare: a prompt the backend refuses is ``success: false``
        with the backend's reason, and the previous prompt stays in force."""
        if self._flow is None or self._backend is None or not self._active:
            resp.success, resp.message = self._call("set_prompt")  # the "not active" answer
            return resp
        try:
            prompt = check_prompt(str(req.system_prompt), self._limits())
            voice = self._load_voice(str(req.ref_voice_path))
        except Exception as exc:  # never let a caller's file take the node down
            kind = "" if isinstance(exc, OmniError) else f"{type(exc).__name__}: "
            self.get_logger().warning(f"omni/set_prompt refused: {kind}{exc}")
            resp.success, resp.message = False, f"refused (conversation unchanged): {kind}{exc}"
            return resp
        flow = self._flow
        if flow is None or not self._active:
            resp.success, resp.message = self._call("set_prompt")
            return resp
        future = flow.set_prompt(prompt, voice)
        busy_s = float(self._param("prompt.answer_timeout_s"))
        wait_s = flow.config.prepare_deadline_ms / 1000 + PROMPT_ANSWER_MARGIN_S
        try:
            try:
                future.result(timeout=busy_s)
            except concurrent.futures.TimeoutError:
                if flow.withdraw_prompt(future):  # never started: the backend is in a call
                    resp.success = False
                    resp.message = (
                        f"the backend stayed busy for {busy_s:g} s (a call in flight): nothing "
                        "changed, try again (prompt.answer_timeout_s)"
                    )
                    return resp
                future.result(timeout=wait_s)  # being prepared: its own deadline bounds it
        except concurrent.futures.TimeoutError:
            resp.success = False
            resp.message = f"no answer from the backend's prepare within {wait_s:.0f} s"
        except Exception as exc:
            resp.success = False
            resp.message = f"refused by the backend (previous prompt kept): {exc}"
        else:
            resp.success, resp.message = True, "set_prompt: prepared, conversation restarted"
        return resp

    def _call(self, method: str, *args: Any) -> tuple[bool, str]:
        flow = self._flow
        if flow is None or not self._active:
            return False, "omni_flow_node is not active (lifecycle): activate it first"
        getattr(flow, method)(*args)  # queues a control for the worker; returns at once
        return True, f"{method} accepted"

    def _execute_ask(self, goal_handle: Any) -> Ask.Result:
        request = goal_handle.request
        waiter = self._ask.open()  # before injecting, so no reply can be missed
        ok, message = self._call("inject_text", request.text)
        reply, spoken, done = self._ask.wait(
            waiter,
            (request.timeout_s or float(self._param("ask.default_timeout_s"))) if ok else 0.0,
            lambda: goal_handle.is_cancel_requested or not self._active,
            lambda text: goal_handle.publish_feedback(Ask.Feedback(partial_text=text)),
        )
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        elif done:
            goal_handle.succeed()
        else:
            self.get_logger().warning(f"omni/ask gave up: {message if not ok else 'no reply'}")
            goal_handle.abort()
        return Ask.Result(reply=reply, spoken=spoken)

    # ----------------------------------------------------------------------------------- outputs
    def _emit(self, event: OutputEvent) -> None:
        """Called on the OmniFlow worker thread, in order.

        After Ctrl-C / SIGTERM shut the context down, the worker can still be finishing a unit
        (the loop stops after the spin returns): its events are dropped quietly instead of each
        printing an RCLError traceback ("publisher's context is invalid", seen under the real
        ``ros2 launch`` on Ctrl-C).
        """
        if not self.context.ok():
            return
        try:
            self._publish_event(event)
        except Exception:
            if self.context.ok():
                raise

    def _publish_event(self, event: OutputEvent) -> None:
        if isinstance(event, SpeechOut):
            chunk = max(1, int(self._param("speech.chunk_ms")) * event.sample_rate // 1000)
            for msg in conv.speech_to_chunks(event, chunk, str(self._param("speech.encoding"))):
                self._speech_pub.publish(msg)
            self._ask.on_speech(event)
        elif isinstance(event, TextOut):
            self._text_pub.publish(conv.text_to_msg(event))
            self._ask.on_text(event)
        elif isinstance(event, ProactiveEvent):
            if event.completed:  # ProactiveAction is defined as "published when the turn completes"
                self._proactive_pub.publish(conv.proactive_to_msg(event))
        elif isinstance(event, StateOut):
            self._state_pub.publish(conv.state_to_msg(event))
            self._diag.on_state(event, self._omni_clock.now_ns())
        elif isinstance(event, SpeechFlush):
            self._flush_pub.publish(conv.flush_to_msg(event))
        elif isinstance(event, VoiceActivity):
            self._user_speaking_pub.publish(Bool(data=event.speaking))

    def _publish_diagnostics(self) -> None:
        if not self.context.ok():
            return  # the steady-time timer can fire once more after Ctrl-C shut the context down
        lifecycle = self._state_machine.current_state[1]
        backend, now_ns = str(self._param("backend")), self._omni_clock.now_ns()
        array = self._diag.report(self.get_name(), backend, lifecycle, now_ns)
        if self._active:
            mark_stall(array.status[0], self._clock_watch.observe(now_ns, time.monotonic_ns()))
        else:
            self._clock_watch.reset()
        self._diag_pub.publish(array)


def _schedule_values(session: DuplexSession) -> dict[str, str]:
    """What the speech schedule adds to a unit's end now (read from the diagnostics timer)."""
    return {
        "schedule.lag_p95_ms": f"{session.lag_p95_ns() / 1e6:.1f}",
        "schedule.device_latency_ms": f"{session.device_latency_ns() / 1e6:.1f}",
        "schedule.margin_ms": f"{session.margin_ns() / 1e6:.1f}",
    }


def _waited_ns(info: Any) -> int:
    """How long a message waited between the middleware's receipt and its callback [ns]
    (``received_timestamp`` is system time; 0 if the middleware does not say)."""
    try:
        received = int(info["received_timestamp"])
    except (KeyError, TypeError, ValueError):
        return 0
    waited = time.time_ns() - received
    return waited if received > 0 and 0 <= waited < MAX_WAITED_NS else 0


def main(args: list[str] | None = None) -> None:
    """Run the node; with ``autostart`` (default) it configures and activates itself.

    SIGINT and SIGTERM both end the spin (rclpy's handlers shut the context down); the node then
    stops its loop and closes the backend (waiting, bounded, for a call in flight). A second
    SIGINT while closing ends the wait without a traceback (backend threads are daemons). Either
    signal while the node is still starting (the backend loading) interrupts the start and
    exits 0 (see :func:`omni_ros.ros._run._terminate`).
    """
    spin_node(
        OmniFlowNode, "omni_flow_node", args, start=_autostart, before_destroy=OmniFlowNode.close
    )


def _autostart(node: OmniFlowNode) -> None:
    """With ``autostart``: configure, then activate if that succeeded."""
    autostart = bool(node.get_parameter("autostart").value)
    if autostart and node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
        node.trigger_activate()


if __name__ == "__main__":
    main()
