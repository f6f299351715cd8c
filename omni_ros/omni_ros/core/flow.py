"""The Omni-Flow runner: inputs in, one worker thread, the backend at 1 Hz, stamped events out.

:class:`OmniFlow` ties the core together::

    push_audio(RawAudio) ─ decode ─ reorder ─ resample to the mic rate ─ AEC ─┬─ timeline ─ poll ─ units
                                                                              └─ VAD ─ barge-in (immediately)
    push_image(RawImage) ─────────────────────────────────────────── timeline (decoded lazily)
    units ─ overrun policy ─ backend.prefill/generate (helper thread, deadline) ─ session ─ emit()

Threading: the input methods (``push_audio``, ``push_image``, ``set_robot_speaking``, ``interrupt``,
``inject_text``, ``set_prompt``, ``reset``, ``pause``, ``resume``) only append to bounded queues or
store a value under a lock, so they are safe and cheap to call from ROS callbacks. Everything else
runs on one worker thread (:meth:`OmniFlow.start`), or on the caller's thread through the
deterministic :meth:`OmniFlow.step_once` / :meth:`OmniFlow.run_until_idle` used by tests and replay.

Controls: ``interrupt``, ``pause``, ``resume``, ``reset`` and ``set_prompt`` queue one frozen
control each (:class:`Interrupt`, :class:`Pause`, :class:`Resume`, :class:`Reset`,
:class:`SetPrompt`), applied by type at the start of the next step; anything else given to
:meth:`OmniFlow.control` is a ``TypeError`` (a bug), never ignored.

Time: :meth:`OmniFlow.step_once` runs at its ``now_ns`` (the worker reads the clock once per
step); nothing in a step reads the clock again, except where time really moves: while a backend
call runs, each wait tick is a new moment (input is taken in at it), and the moment the call
ended stamps what follows from it (speech is scheduled after the compute it took).

Backend calls run on a helper thread so that the worker can (a) keep ingesting microphone audio
while the model computes, which keeps barge-in live mid-unit, and (b) give up on a call after
``backend_deadline_ms``: a hang becomes a counted ``BackendTimeout``. Until a hung call returns,
units are dropped (``units_dropped_overrun``); when it does, the backend is reset and prepared
again, because its state is unknown.

Outputs: every processed (or paused / hung-dropped) unit ends with a ``StateOut`` stamped at the
unit's end; every cancelled span of speech (barge-in, interrupt, reset / new prompt / clock jump,
backend error, pause, :meth:`OmniFlow.stop`) emits a ``SpeechFlush`` with its reason and the
decision's clock time, whatever the session's mode, and right after it an extra ``StateOut``
stamped at the flush. A failed ``prepare`` emits a ``StateOut`` in mode ERROR with the reason
(retried with exponential backoff up to ``prepare_retry_max_ms``); the first good prepare after
failures emits one in the recovered mode. Units dropped by the overrun policy have no
``StateOut``; they are counted. A change of the VAD's "user is speaking" emits a
``VoiceActivity``.

Playback feedback: :meth:`OmniFlow.on_playback` takes the player's reports of what it really
played and when (``speaker/playback``). With ``echo_reference: auto`` (default) the echo
canceller's far-end reference is placed at the scheduled stamps until the first report arrives,
and from then on at the reported play times (a player that starts late shifts the echo by as
much; the reference must follow what the loudspeaker did, not what was planned). The reports
are also the source of ``StateOut.playing``.

Microphone path: :class:`~omni_ros.core.mic_stream.MicStream` (decode, reorder hold, resampler,
canceller, VAD, barge-in detector; its stream state in dataclasses with ``reset()``), then
:class:`~omni_ros.core.mic_stream.BargeInDecision` (acted on at once by the flow) and
:class:`~omni_ros.core.mic_stream.VoiceActivityReport`. Decoded blocks that continue the stream go
straight on; only a block after a gap or out of order waits (up to ``audio_reorder_ms``) for the
missing piece, so the in-order common case costs no latency.

Overrun: unlike the official demo, which queues every unit and drifts without bound when compute
exceeds real time, the ``drop_oldest`` policy keeps at most ``max_queued_units`` closed units
waiting; older ones are dropped and counted in ``units_dropped_overrun``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from omni_ros.core.aec import AecConfig, EchoCanceller, RobotSpeakingGate
from omni_ros.core.backend import Backend
from omni_ros.core.bargein import BargeInDetector
from omni_ros.core.clock import NS_PER_MS, NS_PER_S, Clock
from omni_ros.core.config import from_mapping
from omni_ros.core.echo_path import load_echo_path, save_echo_path
from omni_ros.core.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    ConfigError,
    DecodeError,
    OmniError,
    StateError,
)
from omni_ros.core.images import check_image
from omni_ros.core.mic_stream import BargeInDecision, MicStream, VoiceActivityReport, frames_of
from omni_ros.core.proactive import ProactiveClassifier
from omni_ros.core.session import DuplexSession, SessionConfig
from omni_ros.core.timeline import Timeline, TimelineConfig
from omni_ros.core.types import (
    Counters,
    FloatArray,
    Mode,
    OutputEvent,
    PlaybackReport,
    RawAudio,
    RawImage,
    SpeechFlush,
    SpeechOut,
    StateOut,
    Unit,
    UnitResult,
)
from omni_ros.core.vad import VadConfig, VoiceActivityDetector

_LOG = logging.getLogger(__name__)
OVERRUN_POLICIES = ("drop_oldest",)
ECHO_REFERENCES = ("auto", "schedule", "playback")
#: How long SpeechOut events are kept to look up the samples a playback report names.
_SPEECH_LOG_NS = 30 * NS_PER_S
T = TypeVar("T")


@dataclass(frozen=True)
class FlowConfig:
    """Everything the runner needs besides the backend, clock and emit callback.

    Attributes:
        timeline: unit cutting; ``unit_ns``, ``first_unit_ns`` and ``sample_rate`` are taken from
            the backend (it dictates them), the rest from here.
        session: duplex session settings.
        vad: voice activity detector settings.
        aec: echo canceller and ``robot_speaking`` gate settings (``aec.sample_rate`` is also the
            rate the VAD runs at).
        vad_enabled: run the VAD (without it there is no barge-in and no proactive detection).
        system_prompt: prompt given to ``backend.prepare``.
        backend_deadline_ms: longest a prefill + generate may take before it counts as a hang.
        prepare_deadline_ms: the same for ``prepare`` (model warm-up can be slow).
        prepare_retry_ms: a failed ``prepare`` is retried after this much clock time.
        overrun_policy: ``drop_oldest`` (see the module docstring).
        max_queued_units: closed units allowed to wait for the backend.
        max_queued_audio: raw audio messages buffered between worker runs; beyond it the oldest
            is dropped and counted (``dropped_audio_samples``).
        max_queued_images: raw images buffered between worker runs (oldest dropped, counted).
        audio_reorder_ms: decoded mic blocks wait this long in a stamp-ordered buffer before the
            resampler, echo canceller and VAD, which are stream filters: out-of-order chunks
            (within this window) are put back in order instead of breaking the stream and losing
            samples. Barge-in detection is delayed by as much. 0 disables it.
        max_chunk_ms: longest audio message accepted; a longer one is dropped whole and counted
            (``decode_errors`` and ``dropped_audio_samples``): microphones send 10-100 ms
            chunks, and a minutes-long message would stall the worker and buffer audio far
            into the future.
        idle_wait_ms: how long the worker sleeps when there is nothing to do (inputs wake it).
        log_interval_s: at most one log line per kind of recurring problem per interval.
        prepare_retry_max_ms: the retry interval of a failing ``prepare`` doubles from
            ``prepare_retry_ms`` up to this (a server that is down is not hammered).
        echo_reference: where the echo canceller's far-end reference comes from: ``schedule``
            (the speech's stamps), ``playback`` (only the player's reports) or ``auto``
            (schedule until the first playback report, then the reports).
    """

    timeline: TimelineConfig = field(default_factory=TimelineConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    aec: AecConfig = field(default_factory=AecConfig)
    vad_enabled: bool = True
    system_prompt: str = "Streaming Omni Conversation."
    backend_deadline_ms: int = 5_000
    prepare_deadline_ms: int = 120_000
    prepare_retry_ms: int = 1_000
    overrun_policy: str = "drop_oldest"
    max_queued_units: int = 2
    max_queued_audio: int = 500
    max_queued_images: int = 8
    max_chunk_ms: int = 5_000
    audio_reorder_ms: int = 60
    idle_wait_ms: int = 10
    log_interval_s: float = 10.0
    prepare_retry_max_ms: int = 30_000
    echo_reference: str = "auto"

    def __post_init__(self) -> None:
        if self.overrun_policy not in OVERRUN_POLICIES:
            raise ConfigError(
                f"FlowConfig.overrun_policy = {self.overrun_policy!r}; use one of {OVERRUN_POLICIES}"
            )
        if self.audio_reorder_ms < 0:
            raise ConfigError("FlowConfig.audio_reorder_ms must be >= 0")
        if self.echo_reference not in ECHO_REFERENCES:
            raise ConfigError(
                f"FlowConfig.echo_reference = {self.echo_reference!r}; use one of {ECHO_REFERENCES}"
            )
        if self.prepare_retry_max_ms < self.prepare_retry_ms:
            raise ConfigError("FlowConfig.prepare_retry_max_ms must be >= prepare_retry_ms")
        for name in (
            "backend_deadline_ms",
            "prepare_deadline_ms",
            "prepare_retry_ms",
            "max_queued_units",
            "max_queued_audio",
            "max_queued_images",
            "max_chunk_ms",
            "idle_wait_ms",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"FlowConfig.{name} must be >= 1")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> FlowConfig:
        """Build from a nested mapping: ``timeline``/``session``/``vad``/``aec`` are sub-mappings."""
        data = dict(mapping or {})
        nested: dict[str, Any] = {}
        for key, sub in (
            ("timeline", TimelineConfig),
            ("session", SessionConfig),
            ("vad", VadConfig),
            ("aec", AecConfig),
        ):
            if key in data:
                value = data.pop(key)
                if not isinstance(value, Mapping):
                    raise ConfigError(f"FlowConfig.{key} must be a mapping, got {value!r}")
                nested[key] = sub.from_mapping(dict(value))
        base = from_mapping(cls, data)
        return dataclasses.replace(base, **nested)


# ---- controls: what the input methods ask of the worker, one frozen type per kind ----
@dataclass(frozen=True)
class Interrupt:
    """Stop speaking now (:meth:`OmniFlow.interrupt`; the backend was told already)."""


@dataclass(frozen=True)
class Pause:
    """Stop running the backend, keep the state (:meth:`OmniFlow.pause`)."""


@dataclass(frozen=True)
class Resume:
    """Undo :class:`Pause` (:meth:`OmniFlow.resume`)."""


@dataclass(frozen=True)
class Reset:
    """Forget the conversation; prepare the backend again (:meth:`OmniFlow.reset`)."""


@dataclass(frozen=True, eq=False)
class SetPrompt:
    """Try a new system prompt and voice, prepare then swap (:meth:`OmniFlow.set_prompt`).

    Attributes:
        text: the system prompt.
        ref_voice: reference voice (mono float32 at the backend's input rate), or None.
        future: answered once the prompt is prepared, refused, superseded or withdrawn.
    """

    text: str
    ref_voice: FloatArray | None
    future: concurrent.futures.Future[None]


Control = Interrupt | Pause | Resume | Reset | SetPrompt
#: Every control kind; anything else given to :meth:`OmniFlow.control` is a bug (TypeError).
CONTROLS: tuple[type, ...] = (Interrupt, Pause, Resume, Reset, SetPrompt)


@dataclass(eq=False)
class PromptState:
    """The prompt in force and the one being tried: prepare, then swap.

    A :class:`SetPrompt` makes its prompt current at once (the next prepare uses it) and keeps
    the previous one, with the caller's future, as ``trial``; the prepare's outcome either
    accepts it or goes back to the previous prompt. Each future is answered exactly once.

    Attributes:
        text: the system prompt the next prepare uses.
        ref_voice: the reference voice it uses, or None.
        trial: while a new prompt is being tried: ((previous text, previous voice), the
            caller's future); None otherwise.
    """

    text: str
    ref_voice: FloatArray | None = None
    trial: tuple[tuple[str, FloatArray | None], concurrent.futures.Future[None]] | None = None

    def try_new(self, request: SetPrompt) -> None:
        """Make ``request`` current; a trial not yet prepared is superseded (its caller told)."""
        if self.trial is not None:
            _settle(self.trial[1], StateError("superseded by a newer prompt"))
            self.text, self.ref_voice = self.trial[0]
        self.trial = ((self.text, self.ref_voice), request.future)
        self.text, self.ref_voice = request.text, request.ref_voice

    def end_trial(self, refused: bool) -> concurrent.futures.Future[None] | None:
        """The prompt being tried was prepared (``refused`` False) or not (True: back to the
        previous one). Returns the caller's future for the caller to answer, or None when no
        prompt was being tried."""
        trial, self.trial = self.trial, None
        if trial is None:
            return None
        if refused:
            self.text, self.ref_voice = trial[0]
        return trial[1]


@dataclass
class PrepareState:
    """Where the backend is in its prepare cycle.

    Attributes:
        needed: prepare (after a reset, a new prompt, a clock jump, a hang) before the next unit.
        prepared_once: a prepare succeeded once (later ones reset the backend first).
        timeline_fresh: the timeline has just restarted on a new origin (a clock jump, a refused
            prompt): the next prepare must not reset it again and lose what arrived since.
        failures: failed prepares in a row (the retry interval doubles with each).
        last_attempt_ns: clock time of the last attempt not yet succeeded; the backoff counts
            from it (None: try at once).
        units_fed: units given to the backend since the last prepare (the overrun policy keeps
            unit 0, the longer first unit, while it is 0).
    """

    needed: bool = True
    prepared_once: bool = False
    timeline_fresh: bool = False
    failures: int = 0
    last_attempt_ns: int | None = None
    units_fed: int = 0


class _StoppedError(Exception):
    """Internal: stop() was called while the worker waited for the backend."""


@dataclass(frozen=True)
class CallOutcome(Generic[T]):
    """How a backend call ended: at clock time ``done_ns``, with ``value`` or ``error``."""

    done_ns: int
    value: T | None = None
    error: BaseException | None = None


class BackendCall(Generic[T]):
    """One backend call in flight: wait for it with :meth:`waiting`, then read ``outcome``."""

    def __init__(self, future: concurrent.futures.Future[T], deadline_ms: int) -> None:
        self.future = future
        self.deadline_ms = deadline_ms
        self._deadline_ns = time.monotonic_ns() + deadline_ms * NS_PER_MS  # compute time
        self.outcome: CallOutcome[T] | None = None

    def waiting(self, clock: Clock, tick_ms: int, stopping: Callable[[], bool]) -> Iterator[int]:
        """Yield the clock time of every ``tick_ms`` the call is still running; when the loop
        ends, ``outcome`` is set (the value, the error, or a :class:`BackendTimeout`).

        Raises:
            _StoppedError: ``stopping()`` said so (the call goes on running on its thread).
        """
        wait_s = tick_ms / 1000
        while True:
            remaining_s = (self._deadline_ns - time.monotonic_ns()) / NS_PER_S
            if remaining_s <= 0:
                timeout = BackendTimeout(
                    f"backend call exceeded its {self.deadline_ms} ms deadline"
                )
                self.outcome = CallOutcome(clock.now_ns(), error=timeout)
                return
            done, _ = concurrent.futures.wait([self.future], timeout=min(wait_s, remaining_s))
            if done:
                break
            if stopping():
                raise _StoppedError
            yield clock.now_ns()
        done_ns = clock.now_ns()
        error = self.future.exception()
        if error is None:
            self.outcome = CallOutcome(done_ns, value=self.future.result())
        elif isinstance(error, Exception):
            self.outcome = CallOutcome(done_ns, error=error)
        else:
            raise error  # KeyboardInterrupt, SystemExit: not the backend's failure


class CallRunner:
    """Runs callables one at a time on a daemon thread (a hung backend never blocks exit)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None
        ]
        self._jobs = queue.SimpleQueue()
        self._current: concurrent.futures.Future[Any] | None = None
        self._thread = threading.Thread(target=self._run, name="omni-backend", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._current is not None and not self._current.done()

    def wait_idle(self, timeout_s: float) -> bool:
        current = self._current
        if current is None:
            return True
        done, _ = concurrent.futures.wait([current], timeout=timeout_s)
        return bool(done)

    def start(self, fn: Callable[[], T], deadline_ms: int) -> BackendCall[T]:
        """Queue ``fn``; the returned call says when and how it ended."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._current = future
        self._jobs.put((fn, future))
        return BackendCall(future, deadline_ms)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def close(self) -> None:
        self._jobs.put(None)


class _RateLimitedLog:
    """Logs a recurring problem at most once per interval, with how many were suppressed."""

    def __init__(self, interval_s: float) -> None:
        self._interval_ns = int(interval_s * NS_PER_S)
        self._last: dict[str, int] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic_ns()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval_ns:
            self._suppressed[kind] += 1
            return
        extra = self._suppressed.pop(kind, 0)
        self._last[kind] = now
        suffix = f" ({extra} more since the last report)" if extra else ""
        _LOG.warning("%s%s", message, suffix)


class OmniFlow:
    """The Omni-Flow runner (see the module docstring).

    Args:
        config: runner settings.
        backend: a :class:`~omni_ros.core.backend.Backend` (not yet prepared).
        clock: the clock that closes units (ROS time, sim time, or a ManualClock in tests).
        emit: called with every output event, in order, from the worker thread.
        classifier: proactive-turn classifier (default: the tag classifier).
    """

    def __init__(
        self,
        config: FlowConfig,
        backend: Backend,
        clock: Clock,
        emit: Callable[[OutputEvent], None],
        classifier: ProactiveClassifier | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.clock = clock
        self._emit_cb = emit
        self.counters = Counters()
        timeline_config = dataclasses.replace(
            config.timeline,
            unit_ns=int(backend.unit_ns),
            first_unit_ns=int(backend.first_unit_ns),
            sample_rate=int(backend.input_sample_rate),
        )
        self.timeline = Timeline(timeline_config, self.counters)
        self.session = DuplexSession(
            config.session, int(backend.output_sample_rate), self.counters, classifier
        )
        self.vad = VoiceActivityDetector(config.vad) if config.vad_enabled else None
        self.aec = EchoCanceller(config.aec) if config.aec.enabled else None
        self.bargein = BargeInDetector(config.aec, config.vad) if config.vad_enabled else None
        self.gate = RobotSpeakingGate(config.aec)
        self.mic_rate = config.aec.sample_rate
        self._log = _RateLimitedLog(config.log_interval_s)
        # ---- the microphone path's parts (omni_ros.core.mic_stream) ----
        self.mic = MicStream(
            self.timeline,
            self.aec,
            self.vad,
            self.bargein,
            mic_rate=self.mic_rate,
            reorder_ms=config.audio_reorder_ms,
            max_chunk_ms=config.max_chunk_ms,
            counters=self.counters,
            log=self._log,
            on_heard=self._check_barge_in,
        )
        self._barge_in = (
            BargeInDecision(self.bargein, self.gate, config.vad, config.aec)
            if self.bargein is not None
            else None
        )
        self._activity = VoiceActivityReport(self.vad) if self.vad is not None else None
        self.backend_name = str(getattr(backend, "name", type(backend).__name__))
        # ---- inputs (any thread) ----
        self._lock = threading.Lock()
        self._audio_in: collections.deque[RawAudio] = collections.deque()
        self._images_in: collections.deque[RawImage] = collections.deque()
        self._texts_in: list[str] = []
        self._controls: collections.deque[Control] = collections.deque()
        self._robot_speaking = False
        self._playback_in: list[tuple[PlaybackReport, int]] = []  # (report, received_ns)
        self._dropped_in_audio = 0
        self._in_audio = 0  # samples pushed since the worker last took them (audio_samples_in)
        self._dropped_in_frames = 0
        self._wake = threading.Event()
        # ---- worker state ----
        self._runner = CallRunner()
        self._runner_closed = False
        self._worker_ident: int | None = None
        self._last_state: StateOut | None = None
        self._hung: concurrent.futures.Future[Any] | None = None
        self._pending: collections.deque[Unit] = collections.deque()
        self._prep = PrepareState()
        self._error = ""  # why the session is in ERROR (StateOut.error)
        self._speech_log: collections.deque[SpeechOut] = collections.deque()
        self._playback_seen = False
        self._heard_until_ns = 0  # end of what the player reported as played
        # Speech whose last reported chunk is still playing: (speech, when that chunk ends).
        self._pending_played: tuple[SpeechOut, int] | None = None
        self._prompt = PromptState(config.system_prompt)
        self._texts: list[str] = []
        self._paused = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: what became of ``aec.echo_path_file`` (diagnostics ``echo_path.*``)
        self.echo_path_status: dict[str, str] = {}

    # ============================================================ input methods (any thread, cheap)
    def push_audio(self, raw: RawAudio) -> None:
        """Queue a microphone chunk (decoded on the worker).

        A chunk without ``received_ns`` is marked received now (see :class:`RawAudio`).
        """
        if raw.received_ns <= 0:
            raw = dataclasses.replace(raw, received_ns=self.clock.now_ns())
        frames = frames_of(raw)
        with self._lock:
            self._in_audio += frames
            if len(self._audio_in) >= self.config.max_queued_audio:
                old = self._audio_in.popleft()
                self._dropped_in_audio += frames_of(old)
            self._audio_in.append(raw)
        self._wake.set()

    def push_image(self, raw: RawImage) -> None:
        """Queue a camera image (decoded lazily by the timeline, only if its unit chooses it)."""
        with self._lock:
            if len(self._images_in) >= self.config.max_queued_images:
                self._images_in.popleft()
                self._dropped_in_frames += 1
            self._images_in.append(raw)
        self._wake.set()

    def set_robot_speaking(self, speaking: bool) -> None:
        """The robot's other speech output (not ours) is active: barge-in needs the gate's evidence."""
        with self._lock:
            self._robot_speaking = bool(speaking)

    def on_playback(self, report: PlaybackReport) -> None:
        """The player reports what it really played (``speaker/playback``)."""
        received_ns = self.clock.now_ns()  # the schedule learns the device latency from it
        with self._lock:
            self._playback_in.append((report, received_ns))
        self._wake.set()

    def interrupt(self) -> None:
        """Stop speaking now (service call). The backend is told at once; the session on the worker."""
        self.backend.interrupt()  # thread-safe by the Backend contract: stops an in-flight turn early
        self.control(Interrupt())

    def inject_text(self, text: str) -> None:
        """Add text to the conversation with the next unit (e.g. an Ask goal)."""
        with self._lock:
            self._texts_in.append(str(text))
        self._wake.set()

    def set_prompt(
        self, text: str, ref_voice: FloatArray | None = None
    ) -> concurrent.futures.Future[None]:
        """Restart the conversation with a new system prompt (and reference voice).

        Prepare, then swap: the worker prepares the backend with the new prompt; only when that
        succeeds does it become the prompt. When the backend refuses it (its ``prepare``
        raises), the previous prompt and voice are prepared again at once and stay in force,
        ``prompt_errors`` is counted, a ``StateOut`` in mode ERROR says why, and the returned
        future fails with the backend's error. (A backend holds one conversation, so the
        conversation itself restarts either way; what a refused prompt cannot do is leave the
        robot without one.)

        Returns:
            A future: its result is None once the new prompt is prepared; its exception is the
            backend's error (or :class:`StateError` if the flow stopped first).
        """
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.control(SetPrompt(str(text), ref_voice, future))
        return future

    def withdraw_prompt(self, future: concurrent.futures.Future[None]) -> bool:
        """Take back a :meth:`set_prompt` the worker has not started on yet (it is busy in a
        backend call): nothing changes, the future fails. False if it is being tried already."""
        with self._lock:
            for item in self._controls:
                if isinstance(item, SetPrompt) and item.future is future:
                    self._controls.remove(item)
                    break
            else:
                return False
        _settle(future, StateError("withdrawn: the backend stayed busy"))
        return True

    def reset(self) -> None:
        """Forget the conversation: timeline, session, VAD/AEC state; the backend is prepared again."""
        self.control(Reset())

    def pause(self) -> None:
        """Stop running the backend (units are consumed and dropped, state is kept)."""
        self.control(Pause())

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        self.control(Resume())

    def control(self, control: Control) -> None:
        """Queue a control for the worker (the methods above build them; any thread).

        :class:`Interrupt` queued here does not tell the backend at once: :meth:`interrupt` does.

        Raises:
            TypeError: ``control`` is not one of :data:`CONTROLS` (a bug in the caller: an
                unknown control used to be ignored in silence).
        """
        if not isinstance(control, CONTROLS):
            raise TypeError(
                f"OmniFlow.control() takes one of {[c.__name__ for c in CONTROLS]}, "
                f"got {control!r}: use the flow's input methods (interrupt, set_prompt, ...)"
            )
        with self._lock:
            self._controls.append(control)
        self._wake.set()

    # ================================================================================ worker side
    def start(self) -> None:
        """Run the worker thread (driven by ``clock``). Can be called again after :meth:`stop`."""
        if self._thread is not None:
            return
        if self._runner_closed:
            self._runner = CallRunner()
            self._runner_closed = False
        self._stop.clear()
        self.load_echo_path()
        self._thread = threading.Thread(target=self._loop, name="omni-flow", daemon=True)
        self._thread.start()

    def load_echo_path(self) -> None:
        """Read ``aec.echo_path_file`` for the canceller's next fresh stream (omni_ros.core.
        echo_path; :meth:`start` calls it, :meth:`stop` writes the file). No file yet, or one
        that does not fit, means a cold start, said why (``echo_path_status``, the log)."""
        name = self.config.aec.echo_path_file
        if not name or self.mic.echo_path is None:
            return
        self.echo_path_status["echo_path.file"] = name
        try:
            path = load_echo_path(name, self.config.aec)
        except FileNotFoundError:
            self.echo_path_status["echo_path.start"] = "cold: no file yet"
            _LOG.info("no remembered echo path in %s yet: the echo canceller starts cold", name)
            return
        except ConfigError as exc:
            self.echo_path_status["echo_path.start"] = f"cold: refused: {exc}"
            _LOG.warning("%s; the echo canceller starts cold", exc)
            return
        self.mic.warm_path = path
        self.echo_path_status["echo_path.start"] = f"warm: {path.describe()}"
        _LOG.info("echo canceller starts warm from %s (%s)", name, path.describe())

    def echo_status(self) -> dict[str, str]:
        """The echo canceller's and barge-in detector's state for ``/diagnostics`` (``echo.*``;
        empty without a canceller). Read from another thread: plain attribute reads."""
        aec = self.aec
        if aec is None:
            return {}
        values = {
            "echo.delay_ms": f"{aec.delay_ns / 1e6:.1f}",
            "echo.delay_estimates": str(aec.delay_estimates),
            "echo.delay_rejected_no_echo": str(aec.delay_rejected_no_echo),
            "echo.filter_resets": str(aec.filter_resets),
            "echo.converged": str(aec.converged).lower(),
        }
        if self.bargein is not None:
            values["echo.residual_ratio_db"] = f"{self.bargein.residual_ratio_db:.1f}"
            values["echo.spectral_near_frames"] = str(self.bargein.state.spectral_near_frames)
        return values

    def _save_echo_path(self) -> None:
        """Write the latest echo-only stretch to ``aec.echo_path_file`` (the worker is gone)."""
        name = self.config.aec.echo_path_file
        if not name or self.mic.echo_path is None or self.aec is None:
            return
        path = self.mic.echo_path.snapshot(self.aec)
        if path is None:
            self.echo_path_status["echo_path.saved"] = self.mic.echo_path.why_nothing(self.aec)
            return
        try:
            save_echo_path(path, name)
        except OSError as exc:
            self.echo_path_status["echo_path.saved"] = f"failed: {exc}"
            _LOG.warning("could not write the echo path to %s: %s", name, exc)
            return
        self.echo_path_status["echo_path.saved"] = path.describe()
        _LOG.info("remembered the echo path in %s (%s)", name, path.describe())

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the worker thread. A backend call in flight is not waited for: it finishes on its
        helper thread, and the backend is prepared again before its next use (state unknown).

        Raises:
            StateError: the worker did not exit within ``timeout_s`` (a bug: it never blocks).
        """
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                raise StateError(f"omni_flow worker did not stop within {timeout_s} s")
            # The worker is gone, so this thread may touch the session: speech still queued at
            # the player belongs to a loop that no longer runs (a deactivated node).
            now_ns = self.clock.now_ns()  # stop() is its own moment, on the caller's thread
            self._emit_all(self.session.interrupt(now_ns, "stop"), now_ns)
        self._save_echo_path()  # nothing runs on the core objects now
        self._fail_prompt_requests(StateError("the flow stopped before the prompt was prepared"))

    def _fail_prompt_requests(self, error: Exception) -> None:
        """A stopped flow answers every set_prompt still waiting (queued or being tried)."""
        with self._lock:
            futures = [c.future for c in self._controls if isinstance(c, SetPrompt)]
        # Stopped mid-trial: the caller hears "failed", so the previous prompt is the one
        # prepared when the flow starts again (the worker is gone: this thread may write).
        trying = self._prompt.end_trial(refused=True)
        if trying is not None:
            futures.append(trying)
        for future in futures:
            _settle(future, error)

    def close(self) -> None:
        """Stop the worker and release the backend helper thread. Does not close the backend."""
        self.stop()
        if not self._runner_closed:
            self._runner.close()
            self._runner_closed = True

    def wait_backend_idle(self, timeout_s: float) -> bool:
        """Wait until no backend call is in flight (e.g. a hung call finally returned).

        Returns:
            False if one is still running after ``timeout_s``.
        """
        return self._runner.wait_idle(timeout_s)

    def _loop(self) -> None:
        self._worker_ident = threading.get_ident()
        while not self._stop.is_set():
            try:
                busy = self.step_once(self.clock.now_ns())
            except _StoppedError:
                return
            except Exception:  # the worker must survive anything; this is a bug if it happens
                _LOG.exception("omni_flow worker step failed")
                busy = False
            if not busy:
                self._wake.wait(self.config.idle_wait_ms / 1000)
                self._wake.clear()

    def run_until_idle(self, now_ns: int, max_steps: int = 10_000) -> int:
        """Call :meth:`step_once` until it has nothing left to do; returns the number of steps."""
        for steps in range(max_steps):
            if not self.step_once(now_ns):
                return steps
        return max_steps

    def step_once(self, now_ns: int) -> bool:
        """One worker iteration at clock time ``now_ns``: controls, inputs, poll, at most one unit.

        Returns:
            Whether a unit was processed or dropped (more work may be waiting).
        """
        self._apply_controls(now_ns)
        if not self._ensure_prepared(now_ns):
            self._ingest_inputs(now_ns)
            return False
        self._ingest_inputs(now_ns)
        units = self.timeline.poll(now_ns)
        if self.timeline.last_poll_jumped:
            self._on_clock_jump(now_ns)
            return True
        self._pending.extend(units)
        self._apply_overrun_policy()
        if not self._pending:
            return False
        self._process_unit(self._pending.popleft(), now_ns)
        return True

    # -------------------------------------------------------------------------------- controls
    def _apply_controls(self, now_ns: int) -> None:
        with self._lock:
            controls = list(self._controls)
            self._controls.clear()
        for control in controls:
            self._apply_control(control, now_ns)

    def _apply_control(self, control: Control, now_ns: int) -> None:
        if isinstance(control, Interrupt):
            self._emit_all(self.session.interrupt(now_ns, "interrupt"), now_ns)
        elif isinstance(control, Pause):
            self._paused = True
            self._emit_all(self.session.pause(now_ns), now_ns)
        elif isinstance(control, Resume):
            self._paused = False
            self.session.resume()
        elif isinstance(control, SetPrompt):
            self._prompt.try_new(control)
            self._restart_conversation(now_ns)
        elif isinstance(control, Reset):
            self._restart_conversation(now_ns)
        else:  # control() lets none through; a new kind must be handled here
            raise TypeError(f"OmniFlow has no handler for the control {control!r}")

    def _restart_conversation(self, now_ns: int, new_time_base: bool = False) -> None:
        """Forget the conversation; the backend is prepared again before the next unit.

        Speech still scheduled is flushed first (the player must not finish a forgotten turn).
        The echo canceller keeps its adapted filter (the room did not change) unless the time
        base changed (a clock jump), which invalidates every stamp it holds.
        """
        self._emit_all(self.session.interrupt(now_ns, "reset"), now_ns)
        self.session.reset()
        if self.vad is not None:
            self.vad.reset()
        if new_time_base:
            self.mic.restart_stream()
        self._drop_units(self._pending, "reset")
        if self._barge_in is not None:
            self._barge_in.state.reset()
        self._prep.needed = True
        self._prep.last_attempt_ns = None
        if self._paused:
            self.session.pause(now_ns)

    def _on_clock_jump(self, now_ns: int) -> None:
        """The timeline found the clock went backwards (a looping bag) and reset itself."""
        self._log.warning("clock_jump", "clock jumped backwards: resetting session and backend")
        # Held mic audio stamped ahead of the new clock belongs to the old pass: drop and count it.
        # What is left (the new pass, already arriving) stays held for the new time base.
        self.mic.drop_held_after(now_ns + self.timeline.config.max_future_ns)
        # Speech of the old pass: its stamps are ahead of the new ones, so pruning by stamp from
        # the front would never reach them (the soak's RSS grew with every pass's speech).
        self._speech_log.clear()
        self._restart_conversation(now_ns, new_time_base=True)
        # The timeline has already restarted on the new time base (a fresh origin, unit 0 next) and
        # kept the new pass's input: the reset before the next prepare must not throw that away.
        self._prep.timeline_fresh = True

    def _ensure_prepared(self, now_ns: int) -> bool:
        if self._hung is not None:
            if not self._hung.done():
                return True  # units are dropped in _process_unit until it returns
            self._hung = None
            self._prep.needed = True
        if not self._prep.needed:
            return True
        retry_ns = self._retry_ms() * NS_PER_MS
        if self._prep.last_attempt_ns is not None and (
            self._prep.last_attempt_ns <= now_ns < self._prep.last_attempt_ns + retry_ns
        ):
            return False  # a failed prepare is retried with backoff, in clock time
        self._prep.last_attempt_ns = now_ns
        prompt, ref = self._prompt.text, self._prompt.ref_voice
        was_prepared = self._prep.prepared_once
        backend = self.backend

        def prepare() -> None:
            if was_prepared:
                backend.reset()
            backend.prepare(prompt, ref)

        # The first unit after prepare() has the backend's first-unit length: start a new origin
        # now, so that audio arriving while the backend prepares is kept for that first unit.
        if not self._prep.timeline_fresh:
            self.timeline.reset()
        self._prep.timeline_fresh = False
        self._drop_units(self._pending, "reset")
        outcome = self._await_call(prepare, self.config.prepare_deadline_ms)
        done_ns = outcome.done_ns
        exc = outcome.error
        if exc is not None:
            self._prep.failures += 1
            future = self._prompt.end_trial(refused=True)
            if future is not None:
                # Prepare-then-swap: the new prompt was refused; the previous one is prepared
                # again at the next step (no backoff: it is the prompt, not the server).
                self.counters.prompt_errors += 1
                self._error = f"set_prompt refused by the backend (previous prompt kept): {exc}"
                self._prep.last_attempt_ns = None
                self._prep.timeline_fresh = True  # reset just now: keep what arrives for the retry
                self._log.warning("prompt", self._error)
                _settle(future, exc)
            else:
                self._error = f"backend prepare failed ({self._prep.failures}x): {exc}"
                retry_s = self._retry_ms() / 1000
                self._log.warning("prepare", f"{self._error}; retrying in {retry_s:g} s")
            self._emit_all(self.session.on_error(None, _as_backend_error(exc)), done_ns)
            self._emit_state(now_ns, -1, 0, now_ns=done_ns)
            return False
        accepted = self._prompt.end_trial(refused=False)
        if accepted is not None:
            _settle(accepted)
        if self._prep.failures:
            _LOG.warning("backend prepared again after %d failed attempt(s)", self._prep.failures)
            self._prep.failures = 0
            self._error = ""
            self.session.on_recovered()
            self._emit_state(now_ns, -1, 0, now_ns=done_ns)
        self._prep.prepared_once = True
        self._prep.needed = False
        self._prep.last_attempt_ns = None
        self._prep.units_fed = 0
        return True

    def _retry_ms(self) -> int:
        """Wait before the next prepare: doubles with every failure, up to the maximum."""
        doublings = min(max(self._prep.failures - 1, 0), 30)
        return min(self.config.prepare_retry_ms << doublings, self.config.prepare_retry_max_ms)

    # ---------------------------------------------------------------------------------- inputs
    def _ingest_inputs(self, now_ns: int) -> None:
        """Take everything the input methods queued, at clock time ``now_ns``."""
        with self._lock:
            audio = list(self._audio_in)
            self._audio_in.clear()
            images = list(self._images_in)
            self._images_in.clear()
            self._texts.extend(self._texts_in)
            self._texts_in.clear()
            self.gate.robot_speaking = self._robot_speaking
            playback, self._playback_in = self._playback_in, []
            self.counters.audio_samples_in += self._in_audio
            self.counters.drop_audio("queue_full", self._dropped_in_audio)
            self.counters.dropped_frames += self._dropped_in_frames
            self._dropped_in_audio = self._dropped_in_frames = self._in_audio = 0
        for report, received_ns in playback:
            self.session.on_playback(report, received_ns)
            self._apply_playback(report)
        # Judge stamps against this moment, not the last poll (a backend call can take seconds,
        # and this runs during it too).
        self.timeline.observe_clock(now_ns)
        for raw in audio:
            self.mic.push(raw, now_ns)
        self.mic.release(now_ns)
        if self._activity is not None:
            for change in self._activity.changes():
                self._emit(change)
        future_ns = now_ns + self.timeline.config.max_future_ns
        for image in images:
            # Checked on arrival (header only): a frame no unit chooses is never decoded, so a
            # malformed or far-future one would otherwise be dropped uncounted (issue 15).
            try:
                check_image(image)
            except DecodeError as exc:
                self.counters.decode_errors += 1
                self.counters.dropped_frames += 1
                self._log.warning("decode_image", f"dropped a malformed image: {exc}")
                continue
            if image.stamp_ns > future_ns:
                self.counters.future_messages += 1
                self.counters.dropped_frames += 1
                self._log.warning("future_image", "dropped an image stamped in the future")
                continue
            try:
                self.timeline.push_frame(image)
            except OmniError as exc:
                self.counters.dropped_frames += 1
                self._log.warning("image", f"dropped an image: {exc}")

    def _apply_playback(self, report: PlaybackReport) -> None:
        """A player report: what was heard when (the echo reference, "playing")."""
        if report.sample_rate <= 0:
            return
        end_ns = report.heard_ns + round(report.samples * NS_PER_S / report.sample_rate)
        if report.late:
            self.counters.playback_late_chunks += 1
        found = self._played_speech(report)
        self._tell_backend_played(report, found)
        if report.cut:
            self._heard_until_ns = min(max(self._heard_until_ns, report.heard_ns), end_ns)
            if self.aec is not None and self._playback_seen:
                self.aec.drop_reference_after(end_ns)
            return
        self._heard_until_ns = max(self._heard_until_ns, end_ns)
        if self.config.echo_reference == "schedule":
            return
        self._playback_seen = True
        if self.aec is None:
            return
        if found is None:
            return
        speech, offset = found
        samples = speech.samples[offset : offset + report.samples]
        if len(samples):
            self.aec.push_reference(report.heard_ns, samples, report.sample_rate)

    def _played_speech(self, report: PlaybackReport) -> tuple[SpeechOut, int] | None:
        """The speech a report names (by turn and scheduled stamp) and the report's offset in it."""
        for speech in reversed(self._speech_log):
            if speech.turn_id != report.turn_id or speech.sample_rate != report.sample_rate:
                continue
            offset = round((report.scheduled_ns - speech.stamp_ns) * speech.sample_rate / NS_PER_S)
            if 0 <= offset < len(speech.samples):
                return speech, offset
        return None

    def _tell_backend_played(
        self, report: PlaybackReport, found: tuple[SpeechOut, int] | None
    ) -> None:
        """Backends that keep the server's history truthful (vllm-omni's playback acks) learn
        how much of each unit's speech was really heard: a chunk counts once it has played to
        its end (the next report, or the clock, says so), a cut chunk up to the cut."""
        if getattr(self.backend, "on_played", None) is None or found is None:
            return
        speech, offset = found
        pending = self._pending_played
        if pending is not None and pending[0] is not speech:
            self._finish_played(pending[0], len(pending[0].samples))  # it played to its end
        if report.cut:
            self._pending_played = None
            self._finish_played(speech, offset + report.samples)
        else:
            self._finish_played(speech, offset)  # everything before this chunk was heard
            end_ns = report.heard_ns + round(report.samples * NS_PER_S / report.sample_rate)
            self._pending_played = (speech, end_ns)

    def _finish_pending_played(self, now_ns: int) -> None:
        pending = self._pending_played
        if pending is not None and pending[1] <= now_ns:
            self._pending_played = None
            self._finish_played(pending[0], len(pending[0].samples))

    def _finish_played(self, speech: SpeechOut, samples: int) -> None:
        on_played = getattr(self.backend, "on_played", None)  # optional hook, not in the Protocol
        if on_played is None:
            return
        try:
            on_played(speech.unit_index, samples)
        except Exception as exc:  # a backend's bookkeeping must not stop the worker
            self._log.warning("on_played", f"backend.on_played failed: {exc!r}")

    def _check_barge_in(self, now_ns: int) -> None:
        """After every mic block the detector took in: act on a barge-in at once (see
        :class:`~omni_ros.core.mic_stream.BargeInDecision` for when it is one)."""
        if self._barge_in is None:
            return
        start_ns = self._barge_in.decide(self.session.speech_span())
        if start_ns is None:
            return
        was_in_turn = self.session.mode is Mode.SPEAKING
        events = self.session.on_user_speech(start_ns)
        if was_in_turn and self.session.mode is Mode.INTERRUPTED:
            self.backend.interrupt()
        self._emit_all(events, now_ns)

    # ----------------------------------------------------------------------------------- units
    def _apply_overrun_policy(self) -> None:
        limit = self.config.max_queued_units
        while len(self._pending) > limit:
            oldest = self._pending[0]
            if oldest.index == 0 and self._prep.units_fed == 0 and len(self._pending) > 1:
                # The backend needs unit 0 (the longer first unit) first: drop the next one.
                dropped = self._pending[1]
                del self._pending[1]
            else:
                dropped = self._pending.popleft()
            self._drop_units([dropped], "overrun")
            self.counters.units_dropped_overrun += 1

    def _process_unit(self, unit: Unit, now_ns: int) -> None:
        user_speech = (
            self.vad.speech_in(unit.start_ns, unit.end_ns) if self.vad is not None else None
        )
        texts, self._texts = tuple(self._texts), []
        unit = dataclasses.replace(unit, user_speech=user_speech, texts=unit.texts + texts)
        compute_ns = 0
        done_ns = now_ns  # when the unit's outcome is known: after its backend call, if any
        self._finish_pending_played(now_ns)
        if self._paused:
            self._drop_units([unit], "paused")
        elif self._hung is not None:
            self._drop_units([unit], "overrun")
            self.counters.units_dropped_overrun += 1  # the backend is still stuck in a call
        else:
            backend = self.backend

            def run() -> UnitResult:
                backend.prefill(unit)
                return _check_result(backend.generate())

            t0 = time.monotonic_ns()
            outcome = self._await_call(run, self.config.backend_deadline_ms)
            compute_ns = time.monotonic_ns() - t0
            done_ns = outcome.done_ns
            exc = outcome.error
            if exc is not None:
                error = _as_backend_error(exc)
                self._error = f"backend failed on unit {unit.index}: {exc}"
                self._log.warning("backend", f"backend failed on unit {unit.index}: {exc!r}")
                self._emit_all(self.session.on_error(unit, error), done_ns)
                if not isinstance(exc, BackendError) or isinstance(exc, BackendTimeout):
                    # Unknown backend state (a hang, a bug, misuse): start it over.
                    self._prep.needed = True
            else:
                assert outcome.value is not None
                self._prep.units_fed += 1
                self._error = ""
                self._emit_all(self.session.step(unit, outcome.value, done_ns), done_ns)
        self._last_state = self._emit_state(
            unit.end_ns, unit.index, compute_ns, max(1, unit.duration_ns), now_ns=done_ns
        )

    def _drop_units(self, units: collections.deque[Unit] | list[Unit], cause: str) -> None:
        """Units the timeline emitted (their samples counted as used) that never reach the
        backend: their received samples move to ``audio_dropped_<cause>``. Empties a deque."""
        for unit in list(units):
            received = len(unit.audio) - unit.gap_samples
            self.counters.audio_samples_used -= received
            self.counters.drop_audio(cause, received)
        if isinstance(units, collections.deque):
            units.clear()

    def audio_accounting(self) -> dict[str, int]:
        """Where the microphone samples went, read on the worker thread (or a stopped flow):
        ``in`` = ``used`` + ``dropped`` (the sum of ``dropped_<cause>``) + ``held`` (queued,
        waiting in the reorder buffer, the canceller's unfinished frame, open units, closed
        units waiting for the backend)."""
        c = self.counters
        with self._lock:
            queued = sum(frames_of(r) for r in self._audio_in)
            pending_in, pending_dropped = self._in_audio, self._dropped_in_audio
        waiting = sum(len(u.audio) - u.gap_samples for u in self._pending)
        held = queued + waiting + self.mic.held_samples() + self.timeline.held_samples()
        drops = c.audio_drops()
        drops["queue_full"] += pending_dropped
        return {
            "in": c.audio_samples_in + pending_in,
            "used": c.audio_samples_used - waiting,
            "dropped": c.dropped_audio_samples + pending_dropped,
            "held": held,
            **{f"dropped_{k}": v for k, v in drops.items()},
        }

    def _emit_state(
        self,
        stamp_ns: int,
        unit_index: int,
        compute_ns: int,
        unit_ns: int = NS_PER_S,
        *,
        now_ns: int,
    ) -> StateOut:
        """Build and emit the one kind of ``StateOut`` (per unit, after a flush, on errors):
        the only place a ``StateOut`` is made. ``now_ns`` is the moment it describes."""
        mode = self.session.mode
        state = StateOut(
            stamp_ns=stamp_ns,
            mode=mode,
            unit_index=unit_index,
            unit_compute_ms=compute_ns / 1e6,
            real_time_factor=compute_ns / unit_ns,
            counters=self.counters.snapshot(),
            backend=self.backend_name,
            turn_id=self.session.turn_id,
            user_speaking=self._activity is not None and self._activity.state.user_speaking,
            playing=self._is_playing(now_ns),
            error=self._error if mode is Mode.ERROR else "",
        )
        self._emit(state)
        return state

    def _is_playing(self, now_ns: int) -> bool:
        if self._playback_seen or self.config.echo_reference == "playback":
            return self._heard_until_ns > now_ns
        return self.session.speech_playing(now_ns)

    def _await_call(self, fn: Callable[[], T], deadline_ms: int) -> CallOutcome[T]:
        """Run ``fn`` on the backend thread and wait for it, taking in input meanwhile.

        Time moves while the model computes: each wait tick is a new moment (the call's
        :meth:`BackendCall.waiting` reads it from the clock) at which the queued input is taken in, so
        barge-in stays live mid-unit; the moment the call ended (``CallOutcome.done_ns``) stamps what
        follows from it. A call past ``deadline_ms`` ends in a :class:`BackendTimeout`: it keeps
        running on its thread, the flow marks the backend hung until it returns.

        Raises:
            _StoppedError: :meth:`stop` was called on the worker meanwhile.
        """
        call = self._runner.start(fn, deadline_ms)
        try:
            for tick_ns in call.waiting(self.clock, self.config.idle_wait_ms, self._stopping):
                self._ingest_inputs(tick_ns)
        except _StoppedError:
            self._hung = call.future  # finishes on its own; prepared again before reuse
            raise
        outcome = call.outcome
        assert outcome is not None
        if isinstance(outcome.error, BackendTimeout):
            self._hung = call.future
            self.backend.interrupt()
        return outcome

    def _stopping(self) -> bool:
        return self._stop.is_set() and threading.get_ident() == self._worker_ident

    # ----------------------------------------------------------------------------------- output
    def _emit_all(self, events: list[OutputEvent], now_ns: int) -> None:
        """Emit the session's events, decided at ``now_ns``; a flush is followed by a state."""
        flush: SpeechFlush | None = None
        for event in events:
            if isinstance(event, SpeechFlush):
                event = dataclasses.replace(event, decided_ns=now_ns)
                flush = event
            self._emit(event)
        if flush is not None:
            # The mode change (INTERRUPTED / PAUSED) goes out at once too, repeating the last
            # unit's compute figures.
            last = self._last_state
            self._emit_state(
                flush.stamp_ns,
                last.unit_index if last is not None else -1,
                round(last.unit_compute_ms * 1e6) if last is not None else 0,
                now_ns=now_ns,
            )

    def _emit(self, event: OutputEvent) -> None:
        if isinstance(event, SpeechOut):
            self._speech_log.append(event)
            while self._speech_log and (
                self._speech_log[0].stamp_ns < event.stamp_ns - _SPEECH_LOG_NS
            ):
                self._speech_log.popleft()
        if self.aec is not None:
            if isinstance(event, SpeechOut):
                by_schedule = self.config.echo_reference == "schedule" or (
                    self.config.echo_reference == "auto" and not self._playback_seen
                )
                if by_schedule:
                    self.aec.push_reference(event.stamp_ns, event.samples, event.sample_rate)
            elif isinstance(event, SpeechFlush):
                self.aec.drop_reference_after(event.dropped_from_ns)
        try:
            self._emit_cb(event)
        except Exception:
            _LOG.exception("omni_flow emit callback failed for %s", type(event).__name__)


def _settle(future: concurrent.futures.Future[None], error: BaseException | None = None) -> None:
    """Answer a set_prompt future once (a stopped flow may already have answered it)."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _as_backend_error(exc: BaseException) -> BackendError:
    if isinstance(exc, BackendError):
        return exc
    return BackendError(f"{type(exc).__name__}: {exc}")


def _check_result(result: object) -> UnitResult:
    """Reject malformed backend output at the boundary (BackendProtocolError)."""
    if not isinstance(result, UnitResult):
        raise BackendProtocolError(f"generate() returned {type(result).__name__}, not UnitResult")
    if not isinstance(result.text, str):
        raise BackendProtocolError(f"UnitResult.text is {type(result.text).__name__}, not str")
    audio = result.audio
    if audio is None:
        return result
    try:
        array = np.asarray(audio, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise BackendProtocolError(f"UnitResult.audio is not numeric: {exc}") from exc
    if array.ndim != 1:
        raise BackendProtocolError(f"UnitResult.audio must be 1-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise BackendProtocolError("UnitResult.audio contains NaN or inf")
    if array is audio:
        return result
    return dataclasses.replace(result, audio=array)
