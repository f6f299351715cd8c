"""``vllm_omni``: the fleet engine, one vllm-omni realtime duplex session per robot.

The wire contract is vllm-omni's ``docs/serving/realtime_duplex_api.md``; every behaviour below names
the upstream file and function it follows (paths under ``vllm_omni/`` in vllm-project/vllm-omni).
The facts this module relies on are collected in ``docs/FLEET.md``.

Session
    Connect ``ws://host:port/v1/realtime?duplex=1`` and send ``session.update`` (instructions, pcm16
    in and out, the voice as a WAV data URI, ``turn_detection``, ``overlap_policy`` and
    ``extra_body{auto_response: true, force_listen_count, duplex_initial_user_text}``, plus
    ``minicpmo45_native_duplex: true``, which the previous server generation needs for the native
    lane). MiniCPM-o
    refuses a session without a voice with ``ref_audio_required``
    (``model_executor/models/minicpmo_4_5/duplex/plugin.py: prepare_runtime_config``), so
    :meth:`VllmOmniBackend.prepare` refuses it first. ``auto_response: true`` is what makes the
    session model-native: without it the runner treats the session as commit-driven and never
    answers streamed audio (``engine/duplex/session/emitter.py: SessionEmitter.auto_responds``,
    ``engine/duplex/config.py: DuplexCapabilities.supports_client_commit`` defaults to true). The
    answer must be ``session.created`` with ``session.capabilities`` (else the route fell back to
    turn-based; :class:`ConfigError`). ``session.close`` is answered with ``session.closed`` only once
    the engine released the admission slot (``engine/duplex/session/manager.py:
    DuplexSessionManager._close_runner``), so a reopen waits for it.

Units and events
    One ``input_audio_buffer.append`` per unit (base64 PCM16 16 kHz, the unit's newest camera frame
    in ``video_frames``). The first unit is 1030 ms (16480 samples) because Stage 0 closes model unit
    0 there and a frame must ride the append that closes its unit (``clients/duplex.py:
    DUPLEX_FIRST_UNIT_MS``). Server events are *not* one per append: while a response is active a
    unit where the model keeps listening emits nothing and the server appends its own silence
    continuation units (``engine/duplex/session/model_channel.py: ModelChannel._on_model_listen``,
    ``engine/duplex/session/runner.py: DuplexSessionRunner._schedule_silence_continuation``), and the
    speech of stage 1/2 arrives whenever the talker releases it
    (``ModelChannel.on_stage_output_item``). :meth:`VllmOmniBackend.generate` therefore reads the
    event stream, not a reply: outside a response it waits (``unit_timeout_s``) for the model's
    decision (``response.listen`` or a response starting), inside one it waits at most
    ``speech_wait_s`` for the next audio delta, and in both cases it then takes every event already
    received. Each audio delta is followed by exactly one transcript delta
    (``engine/duplex/realtime_events.py: _project``).

Playback truth and barge-in
    The runner forces ``playback_commit_policy = ack_only`` (``DuplexSessionRunner.start``): history
    holds only what ``playback.ack`` reported as played. The backend acknowledges what was heard,
    never what was handed over: either from the schedule (``playback_ack: scheduled``, the default:
    speech is assumed to play from ``playback_latency_ms`` after it is returned, back to back) or
    from the robot's speaker (``playback_ack: played``: the node calls :meth:`on_played`). On
    :meth:`interrupt` the next call sends a final ``playback.ack`` of what was heard, then
    ``barge_in`` (which already ends the response; a following ``response.cancel`` would be answered
    ``response_not_active``: ``engine/duplex/realtime_events.py: resolve_cancel_response``), then
    ``conversation.item.truncate`` at the heard position (the truncating form of ``playback.ack`` is
    dropped by ``engine/duplex/realtime_commands.py: translate_realtime_command``; the item truncate
    is what runs the hard truncate: ``resolve_truncate_item``). Late audio of the cancelled response
    is dropped.

Errors
    Not every ``error`` is fatal (codes: ``engine/duplex/events.py: REALTIME_ERROR_TYPES_BY_CODE``).
    :data:`NON_FATAL_CODES` are counted in :attr:`VllmOmniBackend.stats` and logged; an
    ``input_backpressure`` rejection drops that unit (``engine/duplex/session/manager.py:
    DuplexSessionManager._dispatch_command``). Capacity (``resource_exhausted``) means "next
    replica"; a lost session (``session_closed``, ``session.expired``...) means a new one;
    request-shape codes are our bug (:class:`BackendProtocolError`); everything else is a
    :class:`BackendError` naming the code.

Faults
    Every journaled server event carries ``server_event_seq``. On a dropped socket we reconnect to
    the *same* replica and send ``session.resume{session_id, resume_token,
    last_received_server_event_seq}`` (``entrypoints/duplex/serving.py:
    OmniDuplexSessionHandler._resume``); replays are de-duplicated by sequence number. If resume is
    impossible the call raises :class:`BackendUnavailable` and the next ``prefill`` opens a new
    session with the same prompt and voice. Opening retries every replica in ``urls`` for
    ``retries`` rounds with exponential backoff, then raises :class:`BackendUnavailable`; a session
    opened after failures is logged as a recovery (:attr:`VllmOmniBackend.recoveries`). A heartbeat
    thread keeps an idle session (a paused robot) alive: the server treats ``idle_timeout_s`` without
    a client message as a disconnect (``OmniDuplexSessionHandler._read_loop``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from omni_ros.backends import _wire
from omni_ros.backends.base import check_unit
from omni_ros.core.config import from_mapping
from omni_ros.core.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    StateError,
)
from omni_ros.core.types import FloatArray, Unit, UnitResult

log = logging.getLogger(__name__)

INPUT_SAMPLE_RATE = 16_000
OUTPUT_SAMPLE_RATE = 24_000
#: Stage 0 closes model unit 0 after 1030 ms and every later unit 1000 ms after it
#: (``clients/duplex.py: DUPLEX_FIRST_UNIT_MS``, ``DUPLEX_UNIT_MS``).
SERVER_FIRST_UNIT_MS = 1030
SERVER_UNIT_MS = 1000
_MAX_EVENTS_PER_CALL = 100_000
_UNIT_HISTORY = 256  # units whose returned audio on_played() can still be told about
#: A receive waits in slices of this length and checks, between slices, whether close() or (in
#: generate) interrupt() wants the call back: websockets cannot wake a blocked recv() otherwise.
_RECV_SLICE_S = 0.05

#: Capacity codes: the replica is full, try the next one (``manager.py: DuplexSessionManager.open``
#: raises ``resource_exhausted``; ``duplex_session_busy`` is the older spelling).
BUSY_CODES = frozenset({"resource_exhausted", "duplex_session_busy"})
#: Codes that answer one request and leave the session usable: counted and logged, never raised.
#: ``response_not_active`` (``realtime_events.py: resolve_cancel_response``, ``runner.py:
#: _on_cancel``), ``playback_*`` (``session/playback_ledger.py: apply_playback_ack``),
#: ``item_not_found`` (``realtime_events.py: resolve_truncate_item``), ``input_backpressure``
#: (``manager.py: _dispatch_command``; ``rate_limit_error``), ``output_backpressure``
#: (``session/emitter.py: fail_output``; a failed ``response.done`` follows),
#: ``server_vad_unavailable`` (``session/control.py: run_turn_detection`` turns VAD off and goes on),
#: ``invalid_event_ack`` / ``unsupported_session_resume`` (``serving.py: _handle_envelope_event``),
#: ``session_update_aborted`` (``control.py: on_session_update``), ``runtime_touch_failed``
#: (``runner.py: _on_heartbeat``).
NON_FATAL_CODES = frozenset(
    {
        "response_not_active",
        "response_already_active",
        "playback_ack_too_late",
        "playback_item_not_found",
        "playback_item_mismatch",
        "item_not_found",
        "missing_item_id",
        "input_backpressure",
        "output_backpressure",
        "server_vad_unavailable",
        "invalid_event_ack",
        "unsupported_session_resume",
        "session_update_aborted",
        "runtime_touch_failed",
    }
)
#: The session is gone on this replica: open a new one (``manager.py: _dispatch_command``).
SESSION_GONE_CODES = frozenset({"session_closed", "unknown_session"})
#: Our request was malformed: a client bug, not a server fault.
REQUEST_CODES = frozenset(
    {
        "bad_event",
        "bad_audio",
        "invalid_json",
        "event_too_large",
        "unknown_event",
        "unsupported_audio_format",
        "invalid_video_frames",
        "native_text_append_unsupported",
    }
)
#: Rejections of the session object at open: a configuration problem.
CONFIG_CODES = frozenset(
    {
        "ref_audio_required",
        "unsupported_turn_detection",
        "invalid_session_config",
        "invalid_duplex_runtime_config",
        "unsupported_ref_audio_path",
        "unsupported_audio_format",
        "unsupported_native_response_options",
        "bad_event",
    }
)
#: Resume refusals: the session cannot be re-attached (``serving.py: _resume``, ``_resume_claimed``).
RESUME_REFUSED_CODES = frozenset(
    {
        "session_resume_expired",
        "invalid_session_resume",
        "invalid_resume_token",
        "session_resume_conflict",
        "unsupported_session_resume",
        "runtime_resume_failed",
    }
)
_SESSION_GONE_EVENTS = frozenset(
    {"session.expired", "session.closed", "session.resync_required", "session.replaced"}
)
_AUDIO_DELTA = ("response.output_audio.delta", "response.audio.delta")
_TRANSCRIPT_DELTA = ("response.output_audio_transcript.delta", "response.audio_transcript.delta")
_TURN_DETECTION = ("none", "server_vad")
_OVERLAP_POLICIES = ("listen_only", "barge_in_on_speech")  # engine/duplex/config.py
_PLAYBACK_ACK = ("scheduled", "played")
_TEXT_INJECTION = ("reopen", "drop")

_START_HINT = (
    "start it with `vllm-omni serve openbmb/MiniCPM-o-4_5 --omni --deploy-config "
    "vllm_omni/deploy/minicpmo_4_5.yaml --trust-remote-code --port 8099` (a deploy file with "
    "session_mode: duplex)"
)


@dataclass(frozen=True)
class VllmOmniConfig:
    """Parameters of the ``vllm_omni`` backend (all validated here, at configure time).

    Attributes:
        urls: replica base URLs (``ws://host:port``), tried in order when a session is opened; the
            session then sticks to its replica. A comma-separated string is accepted.
        path: realtime duplex route and query.
        model: model name sent in ``session.update``.
        connect_timeout_s: WebSocket connect deadline per replica.
        handshake_timeout_s: deadline for ``session.created`` / ``session.resumed``.
        close_timeout_s: how long a close waits for ``session.closed`` (the slot is free then).
        unit_timeout_s: longest wait for the model's decision outside a response (a dead server).
            In the node and replay: derived from ``flow.backend_deadline_ms`` (80 %) unless set.
        speech_wait_s: inside a response, how long one ``generate`` waits for the next audio;
            below one unit, or the robot falls behind real time.
        retries / backoff_s / backoff_max_s: extra rounds over ``urls`` (busy or unreachable) and
            resume attempts after a drop, with exponential backoff between them.
        ref_audio_path: WAV used as the assistant voice when ``prepare`` gets no ``ref_voice``.
        force_listen_count: warm-up units the model must listen through (``extra_body``).
        turn_detection: ``none`` (the model owns listen/speak) or ``server_vad`` (the server's
            Silero VAD hears the user and barges in on speech).
        overlap_policy: ``""`` (derived: ``listen_only`` without, ``barge_in_on_speech`` with server
            VAD; the server rejects any other pairing), or one of the two explicitly.
        vad_threshold / vad_prefix_padding_ms / vad_silence_duration_ms /
        vad_min_speech_duration_ms: ``server_vad`` settings (``engine/duplex/turn_detection.py``).
        temperature: stage-0 sampling temperature (None: server default, 0.7).
        jpeg_quality: JPEG quality of camera frames.
        first_unit_ms: length of the first unit after ``prepare`` (the server's unit 0 is 1030 ms).
        playback_ack: ``scheduled`` (acknowledge from the speech schedule) or ``played`` (only
            what :meth:`VllmOmniBackend.on_played` reports).
        playback_latency_ms: for ``scheduled``: returned audio starts to be heard this much later.
        heartbeat_interval_s: send ``session.heartbeat`` after this long without sending (0: never).
        idle_timeout_s: the session's idle timeout sent to the server (must exceed the heartbeat).
        text_injection: injected text (omni/ask) cannot be appended to a native duplex session
            (``native_text_append_unsupported``); ``reopen`` opens a new session seeded with it
            (``duplex_initial_user_text``, history is lost), ``drop`` counts and drops it.
    """

    urls: tuple[str, ...] = ("ws://127.0.0.1:8099",)
    path: str = "/v1/realtime?duplex=1"
    model: str = "openbmb/MiniCPM-o-4_5"
    connect_timeout_s: float = 5.0
    handshake_timeout_s: float = 30.0
    close_timeout_s: float = 5.0
    unit_timeout_s: float = 10.0
    speech_wait_s: float = 0.5
    retries: int = 3
    backoff_s: float = 0.25
    backoff_max_s: float = 4.0
    ref_audio_path: str = ""
    force_listen_count: int = 0
    turn_detection: str = "none"
    overlap_policy: str = ""
    vad_threshold: float = 0.5
    vad_prefix_padding_ms: int = 300
    vad_silence_duration_ms: int = 500
    vad_min_speech_duration_ms: int = 96
    temperature: float | None = None
    jpeg_quality: int = 85
    first_unit_ms: int = SERVER_FIRST_UNIT_MS
    playback_ack: str = "scheduled"
    playback_latency_ms: int = 200
    heartbeat_interval_s: float = 30.0
    idle_timeout_s: float = 300.0
    text_injection: str = "reopen"

    #: Timeouts that one flow deadline bounds (one owner: ``omni_ros.ros._setup.node_setup``
    #: derives them from ``flow.backend_deadline_ms`` unless set): field -> (FlowConfig deadline,
    #: share). A dead replica then fails with this backend's own error, which opens a new session.
    FLOW_DEADLINE_SHARES: ClassVar[dict[str, tuple[str, float]]] = {
        "unit_timeout_s": ("backend_deadline_ms", 0.8),
    }

    def __post_init__(self) -> None:
        urls: Any = self.urls
        if isinstance(urls, str):
            urls = [u for u in (part.strip() for part in urls.split(",")) if u]
        if (
            not isinstance(urls, list | tuple)
            or not urls
            or not all(isinstance(u, str) for u in urls)
        ):
            raise ConfigError(
                f"VllmOmniConfig.urls = {self.urls!r}; expected a list of ws://host:port"
            )
        cleaned = tuple(u.rstrip("/") for u in urls)
        for url in cleaned:
            if not url.startswith(("ws://", "wss://")) or len(url.split("//", 1)[1]) == 0:
                raise ConfigError(f"VllmOmniConfig.urls entry {url!r} must be ws://host:port")
        object.__setattr__(self, "urls", cleaned)
        if not self.path.startswith("/"):
            raise ConfigError(f"VllmOmniConfig.path {self.path!r} must start with '/'")
        if not self.model:
            raise ConfigError("VllmOmniConfig.model must name the served model")
        for key in (
            "connect_timeout_s",
            "handshake_timeout_s",
            "close_timeout_s",
            "unit_timeout_s",
            "speech_wait_s",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"VllmOmniConfig.{key} must be > 0, got {getattr(self, key)}")
        if self.speech_wait_s >= SERVER_UNIT_MS / 1000:
            raise ConfigError(
                f"VllmOmniConfig.speech_wait_s = {self.speech_wait_s} must be below one unit "
                f"({SERVER_UNIT_MS / 1000} s), or the robot falls behind real time"
            )
        if self.force_listen_count < 0:
            raise ConfigError("VllmOmniConfig.force_listen_count must be >= 0")
        if self.first_unit_ms != SERVER_FIRST_UNIT_MS:
            raise ConfigError(
                f"VllmOmniConfig.first_unit_ms = {self.first_unit_ms}; vllm-omni closes model unit "
                f"0 after {SERVER_FIRST_UNIT_MS} ms (camera frames would land one unit off)"
            )
        self._check_choice("turn_detection", _TURN_DETECTION)
        self._check_choice("playback_ack", _PLAYBACK_ACK)
        self._check_choice("text_injection", _TEXT_INJECTION)
        # engine/duplex/turn_detection.py: validate_realtime_turn_detection pairs the two.
        expected_policy = (
            "barge_in_on_speech" if self.turn_detection == "server_vad" else "listen_only"
        )
        if self.overlap_policy == "":
            object.__setattr__(self, "overlap_policy", expected_policy)
        elif self.overlap_policy not in _OVERLAP_POLICIES:
            raise ConfigError(
                f"VllmOmniConfig.overlap_policy = {self.overlap_policy!r}; choose one of "
                f"{list(_OVERLAP_POLICIES)} (or '' to derive it from turn_detection)"
            )
        elif self.overlap_policy != expected_policy:
            raise ConfigError(
                f"VllmOmniConfig.overlap_policy = {self.overlap_policy!r} conflicts with "
                f"turn_detection = {self.turn_detection!r}: vllm-omni requires {expected_policy!r} "
                "(server VAD implies barge_in_on_speech; model-owned turns imply listen_only)"
            )
        if not 0.0 < self.vad_threshold <= 1.0:
            raise ConfigError("VllmOmniConfig.vad_threshold must be in (0, 1]")
        for key in (
            "vad_prefix_padding_ms",
            "vad_silence_duration_ms",
            "vad_min_speech_duration_ms",
            "playback_latency_ms",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"VllmOmniConfig.{key} must be >= 0")
        if self.temperature is not None and self.temperature < 0:
            raise ConfigError("VllmOmniConfig.temperature must be >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("VllmOmniConfig.jpeg_quality must be in 1..100")
        if self.heartbeat_interval_s < 0:
            raise ConfigError("VllmOmniConfig.heartbeat_interval_s must be >= 0 (0: off)")
        if self.idle_timeout_s <= 0 or (
            self.heartbeat_interval_s > 0 and self.idle_timeout_s <= self.heartbeat_interval_s
        ):
            raise ConfigError(
                "VllmOmniConfig.idle_timeout_s must be > 0 and longer than heartbeat_interval_s, "
                "or an idle robot is disconnected between heartbeats"
            )
        if self.ref_audio_path:
            try:
                data = Path(self.ref_audio_path).read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"vllm_omni.ref_audio_path {self.ref_audio_path!r}: {exc}"
                ) from None
            try:
                _wire.parse_wav(data, what=self.ref_audio_path)
            except BackendProtocolError as exc:
                raise ConfigError(f"vllm_omni.ref_audio_path: {exc}") from None
        _wire.Backoff(self.retries, self.backoff_s, self.backoff_max_s)

    def _check_choice(self, key: str, choices: tuple[str, ...]) -> None:
        if getattr(self, key) not in choices:
            raise ConfigError(
                f"VllmOmniConfig.{key} = {getattr(self, key)!r}; choose one of {list(choices)}"
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> VllmOmniConfig:
        return from_mapping(cls, mapping)

    @property
    def backoff(self) -> _wire.Backoff:
        return _wire.Backoff(self.retries, self.backoff_s, self.backoff_max_s)


class _DroppedError(Exception):
    """The socket closed under us (internal; converted to a resume attempt or BackendUnavailable)."""


class _ClosingError(BackendUnavailable):
    """close() was called while this call waited on the server (another thread is closing)."""


class _InterruptedError(Exception):
    """interrupt() was called while generate() waited (internal: generate returns a listen)."""


class _BusyError(Exception):
    """A replica answered with a capacity error."""


@dataclass
class _Response:
    """What the client knows about one assistant response (``response_id``)."""

    response_id: str
    returned_samples: int = 0  # 24 kHz samples handed to the robot
    heard_ms: int = 0  # the playback truth (schedule or on_played)
    acked_ms: int = 0  # last played_ms sent
    done: bool = False
    end_reported: bool = False  # a result already said end_of_turn for it
    cancelled_by_us: bool = False
    cut: bool = False  # a barge-in already reported where its playback stopped
    #: scheduled mode: (start monotonic s, samples) of each returned chunk, in play order.
    schedule: list[tuple[float, int]] = field(default_factory=list)


@dataclass
class _Collected:
    """Everything one ``generate`` read off the event stream."""

    chunks: list[FloatArray] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    chunk_responses: list[str] = field(default_factory=list)
    decided: bool = False  # the model decided for a unit (listen, or a response started)
    listen: bool = False
    speech_started: bool = False
    ended: str | None = None  # the response that ended its turn in what was read
    awaiting_transcript: bool = False
    server_barge_in: bool = False
    unit_dropped: bool = False


class VllmOmniBackend:
    """MiniCPM-o 4.5 through a vllm-omni realtime duplex session (fleet). See the module docstring.

    Thread model: the Omni-Flow worker calls prepare/prefill/generate/reset; :meth:`interrupt`,
    :meth:`on_played` and :meth:`close` may come from any thread; a daemon thread sends heartbeats.
    Every socket send holds ``_send_lock``; one thread receives at a time (``_call_lock``).
    """

    name: ClassVar[str] = "vllm_omni"
    config_class: ClassVar[type[VllmOmniConfig]] = VllmOmniConfig

    input_sample_rate: int = INPUT_SAMPLE_RATE
    output_sample_rate: int = OUTPUT_SAMPLE_RATE
    unit_ns: int = SERVER_UNIT_MS * 1_000_000

    def __init__(self, config: VllmOmniConfig) -> None:
        self.config = config
        self.first_unit_ns = int(config.first_unit_ms) * 1_000_000
        self._interrupt = threading.Event()
        self._interrupt_at: float | None = None
        self._send_lock = threading.RLock()
        #: Held by every worker-side call (prepare/prefill/generate/reset) and by close(): the
        #: connection has one reader at a time (websockets raises ConcurrencyError otherwise).
        self._call_lock = threading.RLock()
        #: Set by close(): a call in flight stops waiting and no reconnect or resume starts.
        self._closing = threading.Event()
        self._closer: int | None = None
        self._ledger_lock = threading.Lock()
        self._conn: Any = None
        self._url = config.urls[0]
        self._session_id = ""
        self._resume_token = ""
        self._incarnation = 0
        self._capabilities: dict[str, Any] = {}
        self._last_seq = 0
        self._acked_seq = 0
        self._audio_end_ms = 0
        self._responses: OrderedDict[str, _Response] = OrderedDict()
        self._active: _Response | None = None
        self._audio_spelling: str | None = None
        self._transcript_spelling: str | None = None
        self._prompt = ""
        self._ref_audio_uri: str | None = None
        self._initial_text: str | None = None
        self._prepared = False
        self._needs_new_session = False
        self._prefilled = False
        self._force_listen = False
        self._unit_index = -1
        #: event_id -> (audio_end_ms before, duration_ms) of recent appends (refusals name them).
        self._appends: OrderedDict[str, tuple[int, int]] = OrderedDict()
        self._pad_first_append = 0
        self._flow_first_unit = True
        self._closed = False
        self._failed_opens = 0
        self._event_counter = 0
        self._last_send = time.monotonic()
        #: unit index -> [(response_id, sample offset in the response, samples)] returned for it.
        self._unit_audio: OrderedDict[int, list[tuple[str, int, int]]] = OrderedDict()
        #: Non-fatal server errors by code, barge-ins, drops and the like (for /diagnostics).
        self.stats: dict[str, int] = {}
        #: Events that were not part of a unit's answer, by type (diagnostics and tests).
        self.ignored_events: dict[str, int] = {}
        #: Sessions opened after at least one failed attempt (the server came back).
        self.recoveries = 0
        #: The reason of the last failure to reach a replica ("" once a session is open again).
        self.last_error = ""
        self._heartbeat_stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        if config.heartbeat_interval_s > 0:
            self._heartbeat = threading.Thread(
                target=self._heartbeat_loop, name="vllm-omni-heartbeat", daemon=True
            )
            self._heartbeat.start()

    # ------------------------------------------------------------------------------------ protocol
    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        """Open a duplex session on the first replica that has room."""
        with self._call_lock:
            self._check_open()
            self._prepare(system_prompt, ref_voice)

    def prefill(self, unit: Unit) -> None:
        """Append one unit of 16 kHz audio (+ its newest frame) to the session."""
        with self._call_lock:
            self._check_open()
            self._prefill(unit)

    def generate(self) -> UnitResult:
        """Read what the server said since the last call (see the module docstring).

        An :meth:`interrupt` while this waits ends the wait: the result is a listen.
        """
        with self._call_lock:
            self._check_open()
            return self._generate()

    def _prepare(self, system_prompt: str, ref_voice: FloatArray | None) -> None:
        self._prompt = system_prompt
        if ref_voice is not None:
            voice = np.asarray(ref_voice, dtype=np.float32).reshape(-1)
            if voice.size == 0:
                raise ConfigError(
                    "ref_voice is empty; pass None to use ref_audio_path from the config"
                )
            self._ref_audio_uri = "data:audio/wav;base64," + _wire.b64encode(
                _wire.wav_bytes(voice, INPUT_SAMPLE_RATE)
            )
        elif self.config.ref_audio_path:
            data = Path(self.config.ref_audio_path).read_bytes()  # checked at configure
            self._ref_audio_uri = "data:audio/wav;base64," + _wire.b64encode(data)
        else:
            # plugin.py: prepare_runtime_config answers ref_audio_required; say so before connecting.
            raise ConfigError(
                "vllm-omni (MiniCPM-o) requires a reference voice: set the node's ref_voice_path, "
                "pass prepare(..., ref_voice=<16 kHz float32>) or set vllm_omni.ref_audio_path"
            )
        self._initial_text = None
        self._flow_first_unit = True  # the flow's next unit is the longer first one
        self._end_session()
        self._open_new_session()

    def _prefill(self, unit: Unit) -> None:
        if not self._prepared and not self._needs_new_session:
            raise StateError(
                "prefill() before prepare(): call backend.prepare(system_prompt) first"
            )
        first = self._flow_first_unit
        check_unit(unit, self, first, which="the first unit of a session" if first else "")
        if self._needs_new_session:
            self._open_new_session()
        if unit.texts:
            self._inject_text(unit.texts)
        if self._audio_end_ms == 0 and not first:
            # A session opened mid-stream (recovery, text injection) gets 1000 ms units from the
            # flow: lead its first append with 30 ms of silence so that model unit 0 still closes
            # on a unit's last sample (clients/duplex.py: DUPLEX_FIRST_UNIT_MS).
            self._pad_first_append = (
                (SERVER_FIRST_UNIT_MS - SERVER_UNIT_MS) * INPUT_SAMPLE_RATE // 1000
            )
        if self._interrupt.is_set():
            self._barge_in()
        self._send_playback_acks()
        audio = np.asarray(unit.audio, dtype=np.float32)
        if self._pad_first_append:
            audio = np.concatenate([np.zeros(self._pad_first_append, np.float32), audio])
            self._pad_first_append = 0
        duration_ms = round(len(audio) * 1000 / INPUT_SAMPLE_RATE)
        event_id = self._next_event_id()
        message: dict[str, Any] = {
            "type": "input_audio_buffer.append",
            "event_id": event_id,
            "audio": _wire.b64encode(_wire.float_to_pcm16(audio)),
            "input_audio_format": "pcm16",
            "format": "pcm16",
            "sample_rate_hz": INPUT_SAMPLE_RATE,
            "duration_ms": duration_ms,
            "audio_end_ms": self._audio_end_ms + duration_ms,
        }
        if unit.user_speech is not None:
            message["is_speech"] = bool(unit.user_speech)
        if unit.frames:
            message["video_frames"] = [
                _wire.b64encode(_wire.jpeg_bytes(unit.frames[-1].rgb, self.config.jpeg_quality))
            ]
        self._send_with_resume(message)
        self._appends[event_id] = (self._audio_end_ms, duration_ms)
        while len(self._appends) > 16:
            self._appends.popitem(last=False)
        self._audio_end_ms += duration_ms
        self._unit_index = unit.index
        self._flow_first_unit = False
        self._prefilled = True

    def _generate(self) -> UnitResult:
        if not self._prefilled:
            raise StateError("generate() without a prefilled unit: call prefill(unit) first")
        self._prefilled = False
        t0 = time.perf_counter()
        forced = self._force_listen
        self._force_listen = False
        if self._interrupt.is_set():
            self._barge_in()
            forced = True
        got = _Collected()
        now = time.monotonic()
        if forced:
            wait_until = now  # the cut turn's leftovers are dropped; take only what is there
        elif self._active is not None:
            wait_until = now + self.config.speech_wait_s
        else:
            wait_until = now + self.config.unit_timeout_s
        for _ in range(_MAX_EVENTS_PER_CALL):
            if self._satisfied(got):
                wait_until = min(wait_until, time.monotonic())  # take what is there, then return
            event = self._recv_with_resume(wait_until)
            if event is None:
                continue  # a replayed duplicate
            if event.get("type") == "_interrupted":
                # A barge-in (or a node stopping) while this unit waited: the unit is a listen;
                # take what already arrived and return now (the next call tells the server).
                forced = True
                wait_until = time.monotonic()
                continue
            if event.get("type") == "_timeout":
                if forced or self._active is not None or self._satisfied(got):
                    break
                # No decision for a unit within unit_timeout_s: the replica is stuck. A fresh
                # session is the only state we can vouch for.
                self._end_session(wait=False)
                self._prepared = False
                self._needs_new_session = True
                raise BackendTimeout(
                    f"vllm-omni at {self._url} gave no listen/speak decision within "
                    f"{self.config.unit_timeout_s} s; the next prefill opens a new session"
                )
            self._on_event(event, got)
            if got.decided and self._active is not None and not got.chunks:
                # A response began: give its first audio the speech budget, not the unit timeout.
                wait_until = min(wait_until, time.monotonic() + self.config.speech_wait_s)
        else:
            raise BackendProtocolError("vllm-omni sent too many events for one unit")
        result = self._result(got, forced or self._interrupt.is_set())
        self._send_playback_acks()
        if self._last_seq > self._acked_seq:
            self._acked_seq = self._last_seq
            self._send_quiet({"type": "session.event_ack", "server_event_seq": self._last_seq})
        return UnitResult(
            is_listen=result.is_listen,
            text=result.text,
            audio=result.audio,
            end_of_turn=result.end_of_turn,
            timings_ms={"unit": (time.perf_counter() - t0) * 1e3},
            barge_in=got.server_barge_in,  # the session flushes what is still scheduled
        )

    def interrupt(self) -> None:
        """Barge-in (thread-safe): speech stops being heard now; the next call tells the server."""
        self._interrupt_at = time.monotonic()
        self._interrupt.set()

    def on_played(self, unit_index: int, samples: int) -> None:
        """Report playback truth (thread-safe): ``samples`` of the audio returned for unit
        ``unit_index`` have been heard, counted from that audio's first sample (cumulative; after a
        cut, the final count). Used when ``playback_ack`` is ``played``; acknowledged to the server
        at the next call. Unknown units (older than the last 256) are ignored.
        """
        if samples < 0:
            raise ValueError(f"on_played: samples must be >= 0, got {samples}")
        with self._ledger_lock:
            segments = self._unit_audio.get(int(unit_index))
            if not segments:
                return
            offset = 0
            for response_id, start, n in segments:
                response = self._responses.get(response_id)
                heard_here = min(n, max(0, int(samples) - offset))
                offset += n
                if response is not None and heard_here > 0:
                    heard = round((start + heard_here) * 1000 / OUTPUT_SAMPLE_RATE)
                    response.heard_ms = max(response.heard_ms, heard)

    def metrics(self) -> dict[str, float | int | str]:
        """Client figures for ``/diagnostics`` (a fresh flat dict; any thread may call it):
        every counter of :attr:`stats`, ``recoveries`` and ``last_error``."""
        out: dict[str, float | int | str] = dict(self.stats)
        out["recoveries"] = self.recoveries
        out["last_error"] = self.last_error
        return out

    def reset(self) -> None:
        """Close the session (the server forgets it); prepare() must be called again."""
        with self._call_lock:
            self._check_open()
            self._end_session()
            self._prepared = False
            self._needs_new_session = False
            self._interrupt.clear()

    def close(self) -> None:
        """Close the session and socket. Idempotent; safe from any thread, with a call in flight.

        A call still running on another thread (the flow's backend-call thread at shutdown or
        cleanup) may be inside ``recv()``. websockets allows one reader per connection: a second
        ``recv()`` raises ``ConcurrencyError`` ("cannot call recv while another thread is already
        running recv", websockets 17.4 ``sync/connection.py: Connection.recv`` over
        ``sync/messages.py: Assembler.get``), which is what reading ``session.closed`` here did.
        So ``close()`` never reads while a call is in flight: it tells the call to stop (the
        call's ``recv()`` waits in slices of ``_RECV_SLICE_S`` and checks for it between them),
        waits for it to leave (``close_timeout_s``), then closes the session politely from this
        thread, the only reader left. If the call does not leave (a send blocked on a dead
        socket), the socket is shut down under it (``Assembler.close`` and a socket shutdown are
        safe concurrently with ``get()``: the reader gets ``EOFError`` -> ``ConnectionClosed``)
        and the session is left to the server's disconnect grace.
        """
        if self._closed:
            return
        self._heartbeat_stop.set()
        self._closer = threading.get_ident()  # this thread's own reads are not stopped
        if not self._call_lock.acquire(blocking=False):
            self._closing.set()  # the call in flight returns (BackendUnavailable) at its next slice
            if not self._call_lock.acquire(timeout=self.config.close_timeout_s):
                log.warning(
                    "vllm_omni: a call was still running %.1f s after close(); dropping the "
                    "connection under it (session %s is left to the server's disconnect grace)",
                    self.config.close_timeout_s,
                    self._session_id or "?",
                )
                self._closed = True
                self._abort_socket()
                self._join_heartbeat()
                return
        try:
            self._closing.set()
            self._end_session()
        finally:
            self._closed = True
            self._call_lock.release()
        self._join_heartbeat()

    def _join_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=2.0)

    # ---------------------------------------------------------------------------- introspection
    @property
    def session_id(self) -> str:
        """The server-allocated id of the current session ('' when none)."""
        return self._session_id

    @property
    def replica_url(self) -> str:
        """The replica the current session lives on (sticky)."""
        return self._url

    @property
    def capabilities(self) -> dict[str, Any]:
        return dict(self._capabilities)

    # -------------------------------------------------------------------------- event handling
    def _satisfied(self, got: _Collected) -> bool:
        """Whether this call has what it waits for (then it only drains what already arrived)."""
        if got.awaiting_transcript:
            return False
        if got.server_barge_in or got.unit_dropped or got.ended is not None:
            return True
        if self._active is None:
            return got.decided
        return bool(got.chunks)

    def _on_event(self, event: dict[str, Any], got: _Collected) -> None:
        kind = str(event.get("type"))
        if kind == "response.listen":
            self._on_listen(event, got)
        elif kind == "response.created":
            response_id = _str_or_none(event.get("response_id")) or _str_or_none(
                _dict(event.get("response")).get("id")
            )
            if response_id is None:
                raise BackendProtocolError(f"response.created without a response id: {event!r}")
            response = _Response(response_id)
            self._remember_response(response)
            self._active = response
            got.decided = True
        elif kind == "response.speak":
            got.decided = True
        elif kind in _AUDIO_DELTA:
            if self._spelling("audio", kind):
                self._on_audio(event, got)
        elif kind in _TRANSCRIPT_DELTA:
            if self._spelling("transcript", kind):
                self._on_transcript(event, got)
        elif kind == "response.done":
            self._on_response_done(event, got)
        elif kind == "error":
            self._on_error(event, got)
        elif kind == "overlap.decision":
            if event.get("action") == "barge_in":
                self._count("overlap_barge_in")
        elif kind == "input_audio_buffer.speech_started":
            got.speech_started = True
            self._count("speech_started")
        elif kind in _SESSION_GONE_EVENTS:
            reason = event.get("reason")
            self._lose_session()
            raise BackendUnavailable(
                f"vllm-omni at {self._url} ended the session: {kind} {reason!r}; "
                "the next prefill opens a new session"
            )
        else:
            self.ignored_events[kind] = self.ignored_events.get(kind, 0) + 1

    def _on_listen(self, event: Mapping[str, Any], got: _Collected) -> None:
        response_id = _str_or_none(event.get("response_id"))
        got.decided = True
        if response_id is not None and self._responses.get(response_id) is not None:
            # model_channel.py: _on_model_listen: a listen that ends the response; its
            # response.done follows.
            got.ended = got.ended or response_id
        else:
            got.listen = True

    def _on_audio(self, event: Mapping[str, Any], got: _Collected) -> None:
        response_id = _str_or_none(event.get("response_id"))
        response = self._responses.get(response_id or "") if response_id else self._active
        if response is None or response.cancelled_by_us or response.done:
            # Late speech of a response we cancelled (the server's stale-epoch filter can race our
            # barge-in): it must not play.
            self._count("stale_audio_dropped")
            got.awaiting_transcript = False
            return
        rate = event.get("sample_rate_hz", OUTPUT_SAMPLE_RATE)
        if rate != OUTPUT_SAMPLE_RATE:
            raise BackendProtocolError(
                f"vllm-omni audio delta is {rate} Hz; expected {OUTPUT_SAMPLE_RATE}"
            )
        fmt = event.get("format", "pcm16")
        if fmt not in ("pcm16", "pcm"):
            raise BackendProtocolError(
                f"vllm-omni audio delta format {fmt!r}; session asked for pcm16"
            )
        chunk = _wire.pcm16_to_float(_wire.b64decode(event.get("delta"), "audio delta"))
        got.chunks.append(chunk)
        got.chunk_responses.append(response.response_id)
        got.decided = True
        got.awaiting_transcript = True
        if bool(_dict(event.get("metadata")).get("end_of_turn", False)):
            got.ended = response.response_id

    def _on_transcript(self, event: Mapping[str, Any], got: _Collected) -> None:
        delta = event.get("delta", "")
        if not isinstance(delta, str):
            raise BackendProtocolError(f"transcript delta is not a string: {event!r}")
        response_id = _str_or_none(event.get("response_id"))
        response = self._responses.get(response_id or "") if response_id else self._active
        got.awaiting_transcript = False
        if response is None or response.cancelled_by_us or response.done:
            return
        got.texts.append(delta)

    def _on_response_done(self, event: Mapping[str, Any], got: _Collected) -> None:
        response_info = _dict(event.get("response"))
        response_id = _str_or_none(event.get("response_id")) or _str_or_none(
            response_info.get("id")
        )
        status = response_info.get("status", event.get("status"))
        details = _dict(response_info.get("status_details"))
        response = self._responses.get(response_id or "")
        if status not in ("completed", "cancelled", "failed"):
            raise BackendProtocolError(f"response.done with unknown status {status!r}")
        if response is not None:
            response.done = True
        is_active = self._active is not None and (
            response_id is None or self._active.response_id == response_id
        )
        if is_active:
            self._active = None
        if status == "cancelled" and (response is None or not response.cancelled_by_us):
            # The server barged in by itself (server VAD / barge_in_on_speech:
            # runner.py: _barge_in_for_overlap): what it said after this point must not play.
            got.server_barge_in = True
            got.chunks.clear()
            got.texts.clear()
            got.chunk_responses.clear()
            self._count("server_barge_ins")
            log.info(
                "vllm-omni cancelled response %s itself (%s)", response_id, details.get("reason")
            )
            return
        if status == "failed":
            self._count("failed_responses")
            raise BackendError(
                f"vllm-omni response {response_id!r} failed: {details.get('reason')!r}"
            )
        if response is not None and status == "completed":
            got.ended = got.ended or response.response_id

    def _on_error(self, event: Mapping[str, Any], got: _Collected) -> None:
        code = _error_code(event)
        message = _error_message(event)
        if code in NON_FATAL_CODES or _error_retryable(event):
            self._count(f"error.{code}")
            log.warning("vllm-omni %s (non-fatal): %s", code, message)
            if code == "input_backpressure":
                # manager.py: _dispatch_command rejected the append: this unit never reaches the
                # model, so no decision will come for it.
                got.unit_dropped = True
                self._count("units_dropped_backpressure")
                self._forget_append(_error_event_id(event))
            return
        if code in BUSY_CODES:
            raise BackendUnavailable(f"vllm-omni at {self._url} is at capacity ({code}: {message})")
        if code in SESSION_GONE_CODES:
            self._lose_session()
            raise BackendUnavailable(
                f"vllm-omni at {self._url} lost the session ({code}: {message}); "
                "the next prefill opens a new session"
            )
        if code in REQUEST_CODES:
            raise BackendProtocolError(f"vllm-omni rejected a request: {code}: {message}")
        raise BackendError(f"vllm-omni error {code}: {message}")

    def _result(self, got: _Collected, forced: bool) -> UnitResult:
        if forced or got.server_barge_in:
            return UnitResult(is_listen=True)
        ended = self._responses.get(got.ended) if got.ended is not None else None
        end = ended is not None and not ended.end_reported
        if ended is not None:
            ended.end_reported = True
        samples = 0
        segments: list[tuple[str, int, int]] = []
        for chunk, response_id in zip(got.chunks, got.chunk_responses, strict=True):
            response = self._responses[response_id]
            segments.append((response_id, response.returned_samples, len(chunk)))
            response.returned_samples += len(chunk)
            samples += len(chunk)
        if samples:
            self._record_returned(segments)
            audio = np.concatenate(got.chunks).astype(np.float32)
            return UnitResult(
                is_listen=False, text="".join(got.texts), audio=audio, end_of_turn=end
            )
        if end and ended is not None and ended.returned_samples > 0:
            return UnitResult(is_listen=False, text="".join(got.texts), end_of_turn=True)
        if self._active is not None:
            return UnitResult(is_listen=False)  # speaking; the next audio has not arrived yet
        return UnitResult(is_listen=True)

    def _forget_append(self, event_id: str | None) -> None:
        """An append the server refused never reached it: keep our audio clock on its side."""
        sent = self._appends.pop(event_id, None) if event_id else None
        if sent is None:
            return
        start_ms, duration_ms = sent
        self._audio_end_ms -= duration_ms
        if start_ms == 0 and self._audio_end_ms == 0:
            # The refused append was the 1030 ms first one: the next (1000 ms) one must carry the
            # 30 ms, or every later unit (and frame) lands off the server's boundaries.
            self._pad_first_append = (
                (SERVER_FIRST_UNIT_MS - SERVER_UNIT_MS) * INPUT_SAMPLE_RATE // 1000
            )

    # -------------------------------------------------------------------------------- playback
    def _record_returned(self, segments: list[tuple[str, int, int]]) -> None:
        now = time.monotonic()
        with self._ledger_lock:
            self._unit_audio[self._unit_index] = segments
            while len(self._unit_audio) > _UNIT_HISTORY:
                self._unit_audio.popitem(last=False)
            if self.config.playback_ack == "scheduled":
                start = now + self.config.playback_latency_ms / 1000
                for response_id, _, n in segments:
                    schedule = self._responses[response_id].schedule
                    if schedule:
                        last_start, last_n = schedule[-1]
                        start = max(start, last_start + last_n / OUTPUT_SAMPLE_RATE)
                    schedule.append((start, n))
                    start += n / OUTPUT_SAMPLE_RATE

    def _heard_ms(self, response: _Response, at: float) -> int:
        """Milliseconds of ``response`` heard by time ``at`` (monotonic seconds)."""
        if self.config.playback_ack == "played":
            return response.heard_ms
        heard = 0.0
        for start, n in response.schedule:
            heard += min(n / OUTPUT_SAMPLE_RATE, max(0.0, at - start))
        return int(heard * 1000)

    def _send_playback_acks(self, at: float | None = None) -> None:
        """Acknowledge, per response, how much has been heard (only when it grew)."""
        at = time.monotonic() if at is None else at
        with self._ledger_lock:
            pending = []
            for response in self._responses.values():
                if response.returned_samples == 0 or response.cancelled_by_us:
                    continue
                heard = self._heard_ms(response, at)
                if heard > response.acked_ms:
                    response.acked_ms = heard
                    pending.append((response.response_id, heard))
        for response_id, heard in pending:
            self._count("playback_acks")
            self._send_quiet(
                {
                    "type": "playback.ack",
                    "response_id": response_id,
                    "played_ms": heard,
                    "committed_ms": heard,
                }
            )

    def _barge_in(self) -> None:
        """Tell the server about an interrupt: heard position, ``barge_in``, item truncate."""
        self._interrupt.clear()
        at = self._interrupt_at if self._interrupt_at is not None else time.monotonic()
        self._interrupt_at = None
        self._force_listen = True
        self._count("barge_ins")
        response = self._active
        if response is None:
            recent = next(reversed(self._responses.values()), None) if self._responses else None
            if recent is not None and recent.returned_samples and not recent.cut:
                response = recent  # completed, but its speech may still have been playing
        heard = 0
        if response is not None:
            with self._ledger_lock:
                heard = min(
                    self._heard_ms(response, at),
                    round(response.returned_samples * 1000 / OUTPUT_SAMPLE_RATE),
                )
                response.acked_ms = max(response.acked_ms, heard)
            # The ledger must hold the heard position before the cancel: runner.py:
            # _cancel_active_response truncates history at the committed_ms it has then.
            if heard > 0:
                self._send_with_resume(
                    {
                        "type": "playback.ack",
                        "response_id": response.response_id,
                        "played_ms": heard,
                        "committed_ms": heard,
                    }
                )
        if self._capabilities.get("supports_barge_in", False):
            # barge_in ends the active response itself; response.cancel after it is refused with
            # response_not_active (realtime_events.py: resolve_cancel_response).
            self._send_with_resume({"type": "barge_in", "event_id": self._next_event_id()})
        elif self._active is not None:
            self._send_with_resume(
                {
                    "type": "response.cancel",
                    "event_id": self._next_event_id(),
                    "response_id": self._active.response_id,
                }
            )
        if response is not None:
            response.cancelled_by_us = not response.done
            response.cut = True
            returned_ms = round(response.returned_samples * 1000 / OUTPUT_SAMPLE_RATE)
            if 0 < heard < returned_ms and self._capabilities.get("supports_audio_truncate", False):
                # The hard history cut at what the user heard (realtime_events.py:
                # resolve_truncate_item; the truncate flag on playback.ack does not reach it).
                self._count("truncates")
                self._send_with_resume(
                    {
                        "type": "conversation.item.truncate",
                        "event_id": self._next_event_id(),
                        "item_id": f"item_{response.response_id}",
                        "content_index": 0,
                        "audio_end_ms": heard,
                    }
                )
        self._active = None

    # ------------------------------------------------------------------------------ text (ask)
    def _inject_text(self, texts: tuple[str, ...]) -> None:
        """Injected text cannot be appended to a native session (``runner.py: _on_command``
        answers ``native_text_append_unsupported``); seed a new session with it instead."""
        text = "\n".join(t for t in texts if t)
        if not text:
            return
        if self.config.text_injection == "drop":
            self._count("texts_dropped")
            log.warning("vllm_omni: dropped injected text (text_injection: drop): %r", text[:80])
            return
        self._count("sessions_reopened_for_text")
        self._end_session()
        self._initial_text = text
        try:
            self._open_new_session()
        finally:
            self._initial_text = None

    # -------------------------------------------------------------------------------- sessions
    def _session_object(self) -> dict[str, Any]:
        cfg = self.config
        extra_body: dict[str, Any] = {
            # emitter.py: auto_responds(): the model answers streamed audio without commits.
            "auto_response": True,
            # The model-native lane's switch in earlier server generations, which otherwise serve a
            # plain turn-based session adapter (minicpmo_4_5/duplex/adapter.py: is_enabled in the
            # August 2026 code, checked against that code's handler); later folded into the plugin.
            "minicpmo45_native_duplex": True,
            "native_duplex": True,
            "force_listen_count": cfg.force_listen_count,
        }
        if self._initial_text:
            # plugin.py: prepare_runtime_config seeds the session context with it.
            extra_body["duplex_initial_user_text"] = self._initial_text
        turn_detection: dict[str, Any] | None = None
        if cfg.turn_detection == "server_vad":
            turn_detection = {
                "type": "server_vad",
                "threshold": cfg.vad_threshold,
                "prefix_padding_ms": cfg.vad_prefix_padding_ms,
                "silence_duration_ms": cfg.vad_silence_duration_ms,
                "min_speech_duration_ms": cfg.vad_min_speech_duration_ms,
                "interrupt_response": True,
            }
        session: dict[str, Any] = {
            "model": cfg.model,
            "modalities": ["audio", "text"],
            "instructions": self._prompt,
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "sample_rate_hz": INPUT_SAMPLE_RATE,
            "audio": {
                "input": {"sample_rate_hz": INPUT_SAMPLE_RATE},
                "output": {"sample_rate_hz": OUTPUT_SAMPLE_RATE},
            },
            "turn_detection": turn_detection,
            "overlap_policy": cfg.overlap_policy,
            "playback_commit_policy": "ack_only",
            "idle_timeout_s": cfg.idle_timeout_s,
            "extra_body": extra_body,
        }
        if self._ref_audio_uri is not None:
            session["ref_audio"] = self._ref_audio_uri
        if cfg.temperature is not None:
            session["temperature"] = cfg.temperature
        return session

    def _open_new_session(self) -> None:
        """Open a session: sticky replica first, then the others; back off between rounds."""
        self._close_socket()
        order = [self._url] + [u for u in self.config.urls if u != self._url]
        failures: list[str] = []
        delays = iter(self.config.backoff.delays())
        busy_seen = False
        while True:
            for url in order:
                if self._stopping():
                    raise self._closing_error()
                try:
                    self._handshake_new(url)
                except _ClosingError:
                    self._close_socket()
                    raise
                except _BusyError as exc:
                    busy_seen = True
                    failures.append(f"{url}: busy ({exc})")
                    continue
                except (BackendUnavailable, BackendTimeout, _DroppedError) as exc:
                    self._close_socket()
                    failures.append(f"{url}: {type(exc).__name__}: {exc}")
                    continue
                self._url = url
                self._prepared = True
                self._needs_new_session = False
                if self._failed_opens:
                    self.recoveries += 1
                    log.warning(
                        "vllm-omni recovered: session %s on %s after %d failed attempt(s)",
                        self._session_id,
                        url,
                        self._failed_opens,
                    )
                self._failed_opens = 0
                self.last_error = ""
                return
            delay = next(delays, None)
            if delay is None:
                break
            self._closing.wait(delay)  # a close() ends the backoff
        self._needs_new_session = True
        self._prepared = False
        self._failed_opens += len(failures)
        what = (
            "every replica is full (resource_exhausted)" if busy_seen else "no replica is reachable"
        )
        hint = "add replicas or raise duplex_session.max_sessions" if busy_seen else _START_HINT
        self.last_error = (
            f"vllm-omni: {what} after {len(failures)} attempts; {hint}. "
            f"Tried: {failures[-len(order) :]}"
        )
        raise BackendUnavailable(self.last_error)

    def _handshake_new(self, url: str) -> None:
        self._connect(url)
        self._send(
            {
                "type": "session.update",
                "event_id": self._next_event_id(),
                "session": self._session_object(),
            }
        )
        deadline = time.monotonic() + self.config.handshake_timeout_s
        for _ in range(_MAX_EVENTS_PER_CALL):
            event = self._recv(deadline, "session.update")
            kind = event.get("type")
            if kind == "error":
                code = _error_code(event)
                self._close_socket()
                if code in BUSY_CODES:
                    raise _BusyError(f"{code}: {_error_message(event)}")
                if code == "ref_audio_required":
                    raise ConfigError(
                        "vllm-omni (MiniCPM-o) requires a reference voice: pass prepare(..., "
                        "ref_voice=<16 kHz float32>) or set vllm_omni.ref_audio_path"
                    )
                if code in CONFIG_CODES:
                    raise ConfigError(
                        f"vllm-omni at {url} refused the session settings: {code}: "
                        f"{_error_message(event)}"
                    )
                raise BackendError(
                    f"vllm-omni at {url} refused the session: {code} {_error_message(event)}"
                )
            if kind == "session.created":
                session = _dict(event.get("session"))
                caps = session.get("capabilities")
                if not isinstance(caps, dict):
                    self._end_session()
                    raise ConfigError(
                        f"vllm-omni at {url}: server fell back to turn-based (session.created has no "
                        "capabilities); deploy with session_mode: duplex"
                    )
                level = caps.get("implementation_level", "model_native_duplex")
                if level != "model_native_duplex" or caps.get("supports_input_append") is False:
                    # An earlier handler serves its generic session adapter unless told otherwise
                    # (minicpmo_4_5/duplex/adapter.py: is_enabled): it would never decide on
                    # streamed units.
                    self._end_session()
                    raise ConfigError(
                        f"vllm-omni at {url} opened a {level!r} session, not a model-native duplex "
                        "one (no input append); deploy MiniCPM-o with session_mode: duplex"
                    )
                period = caps.get("chunk_period_ms", SERVER_UNIT_MS)
                if period != SERVER_UNIT_MS:
                    self._end_session()
                    raise ConfigError(
                        f"vllm-omni at {url} serves {period} ms units; the vllm_omni backend speaks "
                        f"MiniCPM-o's {SERVER_UNIT_MS} ms units (is another model deployed?)"
                    )
                self._capabilities = caps
                self._session_id = str(session.get("id", ""))
                self._resume_token = str(event.get("resume_token", ""))
                incarnation = event.get("incarnation", 0)
                self._incarnation = incarnation if isinstance(incarnation, int) else 0
                self._last_seq = _seq(event, default=0)
                self._acked_seq = 0
                self._audio_end_ms = 0
                self._pad_first_append = 0
                self._appends.clear()
                self._active = None
                with self._ledger_lock:
                    self._responses.clear()
                    self._unit_audio.clear()
                self._audio_spelling = self._transcript_spelling = None
                return
            self.ignored_events[str(kind)] = self.ignored_events.get(str(kind), 0) + 1
        raise BackendProtocolError("vllm-omni sent no session.created")

    def _resume(self) -> bool:
        """Re-attach the session on a new socket to the same replica; False if it cannot be."""
        if (
            not self._session_id
            or not self._resume_token
            or not self._capabilities.get("supports_session_resume", False)
        ):
            return False
        for delay in [0.0, *self.config.backoff.delays()]:
            if self._closing.wait(delay) and self._stopping():
                return False  # closing: no new socket behind close()'s back
            try:
                self._connect(self._url, resume=True)
                self._send(
                    {
                        "type": "session.resume",
                        "session_id": self._session_id,
                        "resume_token": self._resume_token,
                        # Required by earlier server generations (their parse_resume_request
                        # refuses a resume without it: invalid_session_resume); ignored later.
                        "incarnation": self._incarnation,
                        # serving.py: parse_resume_request wants a non-negative sequence.
                        "last_received_server_event_seq": max(0, self._last_seq),
                    }
                )
                deadline = time.monotonic() + self.config.handshake_timeout_s
                for _ in range(_MAX_EVENTS_PER_CALL):
                    event = self._recv(deadline, "session.resume")
                    kind = event.get("type")
                    if kind == "session.resumed":
                        self._resume_token = str(event.get("resume_token", self._resume_token))
                        self._count("resumes")
                        log.info("vllm-omni session %s resumed on %s", self._session_id, self._url)
                        return True
                    if kind == "error" or kind in _SESSION_GONE_EVENTS:
                        self._close_socket()
                        return False  # expired / unknown / journal gap: a new session is needed
            except _ClosingError:
                self._close_socket()
                return False
            except (_DroppedError, BackendUnavailable, BackendTimeout):
                self._close_socket()
                continue
        return False

    def _lose_session(self) -> None:
        self._close_socket()
        self._session_id = ""
        self._resume_token = ""
        self._active = None
        self._prepared = False
        self._needs_new_session = True

    def _end_session(self, wait: bool = True) -> None:
        """Close politely: ``session.close``, then wait for ``session.closed``, which the server
        sends once the admission slot is free (``manager.py: _close_runner``)."""
        if self._conn is not None:
            self._send_quiet({"type": "session.close"})
        if self._conn is not None and wait:
            deadline = time.monotonic() + self.config.close_timeout_s
            with contextlib.suppress(
                _DroppedError, BackendTimeout, BackendProtocolError, _ClosingError
            ):
                for _ in range(_MAX_EVENTS_PER_CALL):
                    if self._recv(deadline, "session.close").get("type") in (
                        "session.closed",
                        "session.expired",
                    ):
                        break
        self._close_socket()
        self._session_id = ""
        self._resume_token = ""
        self._active = None
        self._prefilled = False

    # --------------------------------------------------------------------------------- transport
    def _connect(self, url: str, resume: bool = False) -> None:
        from websockets.exceptions import InvalidHandshake, WebSocketException

        self._close_socket()
        target = url + self.config.path + ("&autostart=0" if resume else "")
        try:
            conn = _wire.open_websocket(target, self.config.connect_timeout_s)
        except (OSError, TimeoutError, InvalidHandshake, WebSocketException) as exc:
            raise BackendUnavailable(
                f"vllm-omni replica {target} is not reachable ({type(exc).__name__}: {exc}); "
                f"{_START_HINT}"
            ) from None
        with self._send_lock:
            self._conn = conn

    def _close_socket(self) -> None:
        with self._send_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _send(self, message: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed

        with self._send_lock:
            if self._conn is None:
                raise _DroppedError("no socket")
            try:
                self._conn.send(json.dumps(message))
            except (ConnectionClosed, OSError) as exc:
                raise _DroppedError(str(exc)) from None
            self._last_send = time.monotonic()

    def _send_quiet(self, message: dict[str, Any]) -> None:
        """Best-effort send (acks, close): a failure here surfaces at the next real call."""
        with contextlib.suppress(_DroppedError):
            self._send(message)

    def _recv(self, deadline: float, what: str, interruptible: bool = False) -> dict[str, Any]:
        """The next event, waiting until ``deadline`` (monotonic s).

        Raises:
            BackendTimeout: nothing arrived by ``deadline``.
            _ClosingError: close() was called from another thread meanwhile.
            _InterruptedError: ``interruptible`` and interrupt() was called meanwhile.
            _DroppedError: the socket closed.
        """
        from websockets.exceptions import ConcurrencyError, ConnectionClosed

        conn = self._conn
        if conn is None:
            raise self._closing_error() if self._stopping() else _DroppedError("no socket")
        while True:
            remaining = deadline - time.monotonic()
            try:
                raw = conn.recv(timeout=max(0.0, min(remaining, _RECV_SLICE_S)))
                break
            except TimeoutError:
                if self._stopping():
                    raise self._closing_error() from None
                if remaining <= _RECV_SLICE_S:
                    raise BackendTimeout(
                        f"vllm-omni {what} at {self._url} did not answer within its deadline"
                    ) from None
                if interruptible and self._interrupt.is_set():
                    raise _InterruptedError from None
            except ConcurrencyError as exc:
                # Another thread is reading this connection (websockets allows one reader:
                # sync/messages.py: Assembler.get). Never expected with _call_lock; if it happens
                # the connection's state is unknown to this call: a new session is the safe way.
                raise BackendUnavailable(
                    f"vllm-omni {what}: the connection is being read by another thread ({exc})"
                ) from None
            except (ConnectionClosed, OSError) as exc:
                self._close_socket()
                if self._stopping():
                    raise self._closing_error() from None
                raise _DroppedError(str(exc)) from None
        try:
            event = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise BackendProtocolError(
                f"vllm-omni sent malformed JSON during {what}: {exc}: {str(raw)[:200]!r}"
            ) from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise BackendProtocolError(
                f"vllm-omni event without a type during {what}: {str(raw)[:200]!r}"
            )
        return event

    def _stopping(self) -> bool:
        """close() runs on another thread: this call must give up (no wait, resume or reopen)."""
        return self._closing.is_set() and self._closer != threading.get_ident()

    def _closing_error(self) -> _ClosingError:
        return _ClosingError(f"vllm_omni backend is closing (session {self._session_id or '?'})")

    def _abort_socket(self) -> None:
        """Shut the TCP socket down without the close handshake or any lock (close() fallback):
        a send or recv blocked on it returns at once."""
        import socket

        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.socket.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                conn.socket.close()

    def _send_with_resume(self, message: dict[str, Any]) -> None:
        try:
            self._send(message)
            return
        except _DroppedError:
            pass
        if not self._resume():
            self._lose_session()
            raise BackendUnavailable(
                f"vllm-omni replica {self._url} dropped the connection and the session could not "
                "be resumed; the next prefill opens a new session"
            )
        try:
            self._send(message)
        except _DroppedError:
            self._lose_session()
            raise BackendUnavailable(
                f"vllm-omni replica {self._url} dropped the connection again"
            ) from None

    def _recv_with_resume(self, deadline: float) -> dict[str, Any] | None:
        """The next new event; ``{"type": "_timeout"}`` at ``deadline``, ``{"type":
        "_interrupted"}`` when interrupt() was called meanwhile; None for a replay."""
        try:
            event = self._recv(deadline, "unit", interruptible=True)
        except _InterruptedError:
            return {"type": "_interrupted"}
        except _DroppedError:
            if not self._resume():
                self._lose_session()
                raise BackendUnavailable(
                    f"vllm-omni replica {self._url} vanished mid-turn and session "
                    f"{self._session_id or '?'} could not be resumed; the next prefill opens a new "
                    "session"
                ) from None
            return None
        except BackendTimeout:
            return {"type": "_timeout"}
        seq = _seq(event, default=None)
        if seq is not None:
            if seq <= self._last_seq:
                return None  # replayed after a resume: already seen
            self._last_seq = seq
        return event

    # ----------------------------------------------------------------------------------- helpers
    def _heartbeat_loop(self) -> None:
        """Keep an idle session alive (``runner.py: _on_heartbeat`` refreshes the engine lease)."""
        interval = self.config.heartbeat_interval_s
        while not self._heartbeat_stop.wait(min(interval, 1.0) / 2):
            if time.monotonic() - self._last_send < interval:
                continue
            with self._send_lock:
                if self._conn is None or not self._session_id:
                    continue
                try:
                    self._send({"type": "session.heartbeat"})
                except _DroppedError:
                    continue  # the worker finds the drop at its next call and resumes
            self._count("heartbeats")

    def _remember_response(self, response: _Response) -> None:
        with self._ledger_lock:
            self._responses[response.response_id] = response
            while len(self._responses) > 32:
                self._responses.popitem(last=False)

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def _spelling(self, which: str, kind: str) -> bool:
        """Lock onto the first delta spelling seen, so a server sending both is not counted twice."""
        attr = "_audio_spelling" if which == "audio" else "_transcript_spelling"
        current = getattr(self, attr)
        if current is None:
            setattr(self, attr, kind)
            return True
        if current != kind:
            self.ignored_events[kind] = self.ignored_events.get(kind, 0) + 1
            return False
        return True

    def _next_event_id(self) -> str:
        self._event_counter += 1
        return f"omni_ros_{self._event_counter:08d}"

    def _check_open(self) -> None:
        if self._closed:
            raise StateError("backend is closed; create a new one")


def _dict(value: object) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one (optional event fields)."""
    return value if isinstance(value, dict) else {}


def _seq(event: Mapping[str, Any], default: Any) -> Any:
    seq = event.get("server_event_seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else default


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _error_code(event: Mapping[str, Any]) -> str:
    err = event.get("error")
    if isinstance(err, dict):
        return str(err.get("code", ""))
    return str(event.get("code", ""))  # the flat native shape of older handshake errors


def _error_message(event: Mapping[str, Any]) -> str:
    err = event.get("error")
    if isinstance(err, dict):
        return str(err.get("message", ""))
    return str(err or "")


def _error_event_id(event: Mapping[str, Any]) -> str | None:
    """The client ``event_id`` an error answers (``events.py: ErrorEvent.error``)."""
    err = event.get("error")
    return _str_or_none(err.get("event_id")) if isinstance(err, dict) else None


def _error_retryable(event: Mapping[str, Any]) -> bool:
    """``error.retryable`` when the server sets it (``session/emitter.py: emit_error``)."""
    err = event.get("error")
    return isinstance(err, dict) and err.get("retryable") is True
