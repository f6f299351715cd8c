"""``vllm_omni``: the fleet engine, one vllm-omni realtime duplex session per robot.

Wire protocol (``shared/notes/serving-protocols.md``; upstream ``docs/serving/realtime_duplex_api.md``):

1. Connect ``ws://host:port/v1/realtime?duplex=1`` and send ``session.update`` (instructions, pcm16 in
   and out, ``ref_audio`` as a WAV data URI — MiniCPM-o rejects a session without it with
   ``ref_audio_required`` — ``turn_detection: null`` so the model owns listen/speak, and
   ``extra_body.native_duplex``). The answer must be ``session.created`` *with*
   ``session.capabilities``; without them the server fell back to its turn-based handler and we refuse
   (:class:`ConfigError`: deploy with ``session_mode: duplex``).
2. Per unit, one ``input_audio_buffer.append`` (base64 PCM16 16 kHz) that also carries the unit's
   camera frame (``video_frames``: frames ride the append that closes a 1 s unit). Then the unit's
   ``response.*`` events are read under a per-unit deadline: ``response.listen`` (listen), or
   ``response.output_audio.delta`` (base64 PCM16 24 kHz, ``metadata.end_of_turn``) followed by its
   one ``response.output_audio_transcript.delta`` (text). The beta spellings
   (``response.audio.delta`` / ``response.audio_transcript.delta``) are accepted too; whichever
   spelling arrives first is used for the rest of the session, so a server that emits both is not
   counted twice.
3. After returning a unit's speech we send ``playback.ack`` with the cumulative milliseconds handed to
   the robot (with ``playback_commit_policy: ack_only`` the server's history holds only what was
   acknowledged, which keeps it honest after a barge-in), and ``session.event_ack`` so the server can
   trim its resume journal.
4. ``interrupt()`` -> at the next call, ``barge_in`` + ``response.cancel`` and this unit's speech is
   dropped (the result is a forced listen).

Faults: every server event carries ``server_event_seq``. On a dropped socket we reconnect to the *same*
replica (sessions live in one server process) and send ``session.resume{session_id, resume_token,
last_received_server_event_seq}``; replayed events are de-duplicated by ``server_event_seq`` and the
unit completes as if nothing happened. If resume is impossible (replica dead, ``disconnect_grace_s``
passed) the call raises :class:`BackendUnavailable` and the next ``prefill`` opens a new session with
the same prompt and voice (history is lost). ``duplex_session_busy`` (or vllm-omni's
``resource_exhausted``) on open: try the next URL in ``urls``, then back off and retry, then
:class:`BackendUnavailable`. See ``docs/FLEET.md`` for how this maps onto a fleet.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from omni_ros.backends import _wire
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
_MAX_EVENTS_PER_UNIT = 100_000
_BUSY_CODES = frozenset({"duplex_session_busy", "resource_exhausted"})
_SESSION_GONE = frozenset(
    {"session.expired", "session.closed", "session.resync_required", "session.replaced"}
)
_AUDIO_DELTA = ("response.output_audio.delta", "response.audio.delta")
_TRANSCRIPT_DELTA = ("response.output_audio_transcript.delta", "response.audio_transcript.delta")

_START_HINT = (
    "start it with `vllm serve openbmb/MiniCPM-o-4_5 --omni --deploy-config "
    "vllm_omni/deploy/minicpmo_4_5.yaml --trust-remote-code --port 8099` (deploy file with "
    "session_mode: duplex)"
)


@dataclass(frozen=True)
class VllmOmniConfig:
    """Parameters of the ``vllm_omni`` backend.

    Attributes:
        urls: replica base URLs (``ws://host:port``), tried in order when a session is opened; the
            session then sticks to its replica. A comma-separated string is accepted.
        path: realtime duplex route and query.
        model: model name sent in ``session.update``.
        connect_timeout_s: WebSocket connect deadline per replica.
        handshake_timeout_s: deadline for ``session.created`` / ``session.resumed``.
        unit_timeout_s: deadline for one unit's events after its append.
        retries / backoff_s / backoff_max_s: rounds over ``urls`` (busy or unreachable) and resume
            attempts after a drop, with exponential backoff between them.
        ref_audio_path: WAV used as the assistant voice when ``prepare`` gets no ``ref_voice``.
        force_listen_count: warm-up units the model must listen through (``extra_body``).
        overlap_policy: what the server does with user speech during a response.
        playback_commit_policy: ``ack_only`` (history = acknowledged audio) or ``commit_all_on_done``.
        temperature: sampling temperature (None: server default).
        jpeg_quality: JPEG quality of camera frames.
        send_playback_ack: acknowledge delivered audio with ``playback.ack``.
        first_unit_ms: length of the server's first unit (vllm-omni cuts 1000 ms units from the start).
    """

    urls: tuple[str, ...] = ("ws://127.0.0.1:8099",)
    path: str = "/v1/realtime?duplex=1"
    model: str = "openbmb/MiniCPM-o-4_5"
    connect_timeout_s: float = 5.0
    handshake_timeout_s: float = 10.0
    unit_timeout_s: float = 10.0
    retries: int = 3
    backoff_s: float = 0.25
    backoff_max_s: float = 4.0
    ref_audio_path: str = ""
    force_listen_count: int = 0
    overlap_policy: str = "listen_only"
    playback_commit_policy: str = "ack_only"
    temperature: float | None = None
    jpeg_quality: int = 85
    send_playback_ack: bool = True
    first_unit_ms: int = 1000

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
            if not url.startswith(("ws://", "wss://")):
                raise ConfigError(
                    f"VllmOmniConfig.urls entry {url!r} must start with ws:// or wss://"
                )
        object.__setattr__(self, "urls", cleaned)
        for key in ("connect_timeout_s", "handshake_timeout_s", "unit_timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"VllmOmniConfig.{key} must be > 0, got {getattr(self, key)}")
        if self.first_unit_ms <= 0 or self.force_listen_count < 0:
            raise ConfigError(
                "VllmOmniConfig.first_unit_ms must be > 0 and force_listen_count >= 0"
            )
        if self.playback_commit_policy not in ("ack_only", "commit_all_on_done"):
            raise ConfigError(
                "VllmOmniConfig.playback_commit_policy must be 'ack_only' or 'commit_all_on_done'"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("VllmOmniConfig.jpeg_quality must be in 1..100")
        _wire.Backoff(self.retries, self.backoff_s, self.backoff_max_s)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> VllmOmniConfig:
        return from_mapping(cls, mapping)

    @property
    def backoff(self) -> _wire.Backoff:
        return _wire.Backoff(self.retries, self.backoff_s, self.backoff_max_s)


class _DroppedError(Exception):
    """The socket closed under us (internal; converted to a resume attempt or BackendUnavailable)."""


class _BusyError(Exception):
    """A replica answered with a capacity error."""


class VllmOmniBackend:
    """MiniCPM-o 4.5 through a vllm-omni realtime duplex session (fleet). See the module docstring."""

    name: ClassVar[str] = "vllm_omni"
    config_class: ClassVar[type[VllmOmniConfig]] = VllmOmniConfig

    input_sample_rate: int = INPUT_SAMPLE_RATE
    output_sample_rate: int = OUTPUT_SAMPLE_RATE
    unit_ns: int = 1_000_000_000

    def __init__(self, config: VllmOmniConfig) -> None:
        self.config = config
        self.first_unit_ns = int(config.first_unit_ms) * 1_000_000
        self._interrupt = threading.Event()
        self._conn: Any = None
        self._url = config.urls[0]
        self._session_id = ""
        self._resume_token = ""
        self._capabilities: dict[str, Any] = {}
        self._last_seq = -1
        self._audio_end_ms = 0
        self._response_id: str | None = None
        self._delivered_ms = 0
        self._audio_spelling: str | None = None
        self._transcript_spelling: str | None = None
        self._prompt = ""
        self._ref_audio_uri: str | None = None
        self._prepared = False
        self._needs_new_session = False
        self._prefilled = False
        self._force_listen = False
        self._closed = False
        self._event_counter = 0
        #: Events that were not part of a unit's answer, by type (diagnostics and tests).
        self.ignored_events: dict[str, int] = {}

    # ------------------------------------------------------------------------------------ protocol
    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        """Open a duplex session on the first replica that has room."""
        self._check_open()
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
            try:
                data = Path(self.config.ref_audio_path).read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"vllm_omni.ref_audio_path {self.config.ref_audio_path!r}: {exc}"
                ) from None
            _wire.parse_wav(data, what=self.config.ref_audio_path)  # fail here, not on the server
            self._ref_audio_uri = "data:audio/wav;base64," + _wire.b64encode(data)
        else:
            self._ref_audio_uri = (
                None  # the server will say ref_audio_required; we make that a ConfigError
            )
        self._end_session()
        self._open_new_session()

    def prefill(self, unit: Unit) -> None:
        """Append one unit of 16 kHz audio (+ its newest frame) to the session."""
        self._check_open()
        if not self._prepared and not self._needs_new_session:
            raise StateError(
                "prefill() before prepare(): call backend.prepare(system_prompt) first"
            )
        if unit.sample_rate != INPUT_SAMPLE_RATE:
            raise ConfigError(
                f"unit audio is {unit.sample_rate} Hz; vllm_omni wants {INPUT_SAMPLE_RATE} Hz"
            )
        first = self._audio_end_ms == 0
        expected = (
            (self.first_unit_ns if first else self.unit_ns) * INPUT_SAMPLE_RATE // 1_000_000_000
        )
        if len(unit.audio) != expected:
            # The server cuts its own 1 s units from the stream: a short append would shift every
            # later camera frame off its unit boundary.
            which = "the first unit of a session" if first else "a unit"
            raise ConfigError(
                f"{which} must hold exactly {expected} samples at {INPUT_SAMPLE_RATE} Hz, got {len(unit.audio)}"
            )
        if self._needs_new_session:
            self._open_new_session()
        forced = self._interrupt.is_set()
        if forced:
            self._send_barge_in()  # clears the flag
        duration_ms = round(len(unit.audio) * 1000 / INPUT_SAMPLE_RATE)
        message: dict[str, Any] = {
            "type": "input_audio_buffer.append",
            "event_id": self._next_event_id(),
            "audio": _wire.b64encode(_wire.float_to_pcm16(unit.audio)),
            "input_audio_format": "pcm16",
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
        self._audio_end_ms += duration_ms
        self._force_listen = forced
        self._prefilled = True

    def generate(self) -> UnitResult:
        """Read the unit's decision: ``response.listen`` or one audio delta + its transcript."""
        self._check_open()
        if not self._prefilled:
            raise StateError("generate() without a prefilled unit: call prefill(unit) first")
        self._prefilled = False
        t0 = time.perf_counter()
        forced = self._force_listen
        self._force_listen = False
        if self._interrupt.is_set():
            self._send_barge_in()
            forced = True
        deadline = time.monotonic() + self.config.unit_timeout_s
        is_listen = False
        texts: list[str] = []
        chunks: list[FloatArray] = []
        end_of_turn = False
        waiting_transcript = False
        for _ in range(_MAX_EVENTS_PER_UNIT):
            event = self._recv_with_resume(deadline)
            if event is None:
                continue  # a replayed duplicate
            kind = event.get("type")
            if kind == "response.listen":
                is_listen = True
                break
            if kind == "response.created":
                self._response_id = _str_or_none(event.get("response_id")) or self._response_id
                self._delivered_ms = 0
            elif kind in _AUDIO_DELTA and self._spelling("audio", kind):
                chunks.append(self._audio_from(event))
                meta = _dict(event.get("metadata"))
                end_of_turn = end_of_turn or bool(meta.get("end_of_turn", False))
                self._response_id = _str_or_none(event.get("response_id")) or self._response_id
                waiting_transcript = True
            elif kind in _TRANSCRIPT_DELTA and self._spelling("transcript", kind):
                delta = event.get("delta", "")
                if not isinstance(delta, str):
                    raise BackendProtocolError(f"transcript delta is not a string: {event!r}")
                texts.append(delta)
                if waiting_transcript:
                    break  # one audio delta + its transcript = this unit's speech
            elif kind == "response.done":
                self._on_response_done(event)
            elif kind == "error":
                self._raise_error(event, during="unit")
            elif kind in _SESSION_GONE:
                self._lose_session()
                raise BackendUnavailable(
                    f"vllm-omni at {self._url} ended session {self._session_id}: {kind} "
                    f"{event.get('reason')!r}; the next prefill opens a new session"
                )
            else:
                self.ignored_events[str(kind)] = self.ignored_events.get(str(kind), 0) + 1
        else:
            raise BackendProtocolError("vllm-omni sent too many events for one unit")
        audio = np.concatenate(chunks).astype(np.float32) if chunks else None
        if forced or self._interrupt.is_set():
            # Barge-in: whatever this unit produced is stale; the robot must fall silent.
            if self._interrupt.is_set():
                self._send_barge_in()
            return UnitResult(is_listen=True, timings_ms={"unit": (time.perf_counter() - t0) * 1e3})
        if audio is not None and self.config.send_playback_ack and self._response_id:
            self._delivered_ms += round(len(audio) * 1000 / OUTPUT_SAMPLE_RATE)
            self._send_quiet(
                {
                    "type": "playback.ack",
                    "response_id": self._response_id,
                    "played_ms": self._delivered_ms,
                    "committed_ms": self._delivered_ms,
                }
            )
        if self._last_seq >= 0:
            self._send_quiet({"type": "session.event_ack", "server_event_seq": self._last_seq})
        return UnitResult(
            is_listen=is_listen,
            text="" if is_listen else "".join(texts),
            audio=audio,
            end_of_turn=end_of_turn,
            timings_ms={"unit": (time.perf_counter() - t0) * 1e3},
        )

    def interrupt(self) -> None:
        """Barge-in (thread-safe): the next prefill/generate sends barge_in + response.cancel."""
        self._interrupt.set()

    def reset(self) -> None:
        """Close the session (the server forgets it); prepare() must be called again."""
        self._check_open()
        self._end_session()
        self._prepared = False
        self._needs_new_session = False
        self._interrupt.clear()

    def close(self) -> None:
        """Close the session and socket. Idempotent."""
        if self._closed:
            return
        self._end_session()
        self._closed = True

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

    # -------------------------------------------------------------------------------- sessions
    def _session_object(self) -> dict[str, Any]:
        session: dict[str, Any] = {
            "model": self.config.model,
            "modalities": ["audio", "text"],
            "instructions": self._prompt,
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "turn_detection": None,  # the model owns listen/speak (native duplex lane)
            "overlap_policy": self.config.overlap_policy,
            "playback_commit_policy": self.config.playback_commit_policy,
            "extra_body": {
                "native_duplex": True,
                "force_listen_count": self.config.force_listen_count,
            },
        }
        if self._ref_audio_uri is not None:
            session["ref_audio"] = self._ref_audio_uri
        if self.config.temperature is not None:
            session["temperature"] = self.config.temperature
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
                try:
                    self._handshake_new(url)
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
                return
            delay = next(delays, None)
            if delay is None:
                break
            time.sleep(delay)
        self._needs_new_session = True
        self._prepared = False
        what = (
            "every replica is full (duplex_session_busy)"
            if busy_seen
            else "no replica is reachable"
        )
        hint = "add replicas or raise duplex_session.max_sessions" if busy_seen else _START_HINT
        raise BackendUnavailable(
            f"vllm-omni: {what} after {len(failures)} attempts; {hint}. Tried: {failures[-len(order) :]}"
        )

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
        for _ in range(_MAX_EVENTS_PER_UNIT):
            event = self._recv(deadline, "session.update")
            kind = event.get("type")
            if kind == "error":
                code = _error_code(event)
                self._close_socket()
                if code in _BUSY_CODES:
                    raise _BusyError(_error_message(event))
                if code == "ref_audio_required":
                    raise ConfigError(
                        "vllm-omni (MiniCPM-o) requires a reference voice: pass prepare(..., "
                        "ref_voice=<16 kHz float32>) or set vllm_omni.ref_audio_path to a WAV file"
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
                self._capabilities = caps
                self._session_id = str(session.get("id", ""))
                self._resume_token = str(event.get("resume_token", ""))
                self._last_seq = _seq(event, default=self._last_seq)
                self._audio_end_ms = 0
                self._response_id = None
                self._delivered_ms = 0
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
            time.sleep(delay)
            try:
                self._connect(self._url, resume=True)
                self._send(
                    {
                        "type": "session.resume",
                        "session_id": self._session_id,
                        "resume_token": self._resume_token,
                        "last_received_server_event_seq": self._last_seq,
                    }
                )
                deadline = time.monotonic() + self.config.handshake_timeout_s
                for _ in range(_MAX_EVENTS_PER_UNIT):
                    event = self._recv(deadline, "session.resume")
                    kind = event.get("type")
                    if kind == "session.resumed":
                        self._resume_token = str(event.get("resume_token", self._resume_token))
                        log.info("vllm-omni session %s resumed on %s", self._session_id, self._url)
                        return True
                    if kind == "error" or kind in _SESSION_GONE:
                        self._close_socket()
                        return False  # expired / unknown: a new session is needed
            except (_DroppedError, BackendUnavailable, BackendTimeout):
                self._close_socket()
                continue
        return False

    def _lose_session(self) -> None:
        self._close_socket()
        self._session_id = ""
        self._resume_token = ""
        self._prepared = False
        self._needs_new_session = True

    def _end_session(self, wait: bool = True) -> None:
        """Close the session politely: ``session.close``, then wait (briefly, unless ``wait`` is
        False) for ``session.closed`` so the replica has freed the slot before we return."""
        if self._conn is not None:
            self._send_quiet({"type": "session.close"})
        if self._conn is not None and wait:
            deadline = time.monotonic() + min(1.0, self.config.handshake_timeout_s)
            with contextlib.suppress(_DroppedError, BackendTimeout, BackendProtocolError):
                for _ in range(1000):
                    if self._recv(deadline, "session.close").get("type") == "session.closed":
                        break
        self._close_socket()
        self._session_id = ""
        self._resume_token = ""
        self._prefilled = False

    # --------------------------------------------------------------------------------- transport
    def _connect(self, url: str, resume: bool = False) -> None:
        from websockets.exceptions import InvalidHandshake, WebSocketException

        self._close_socket()
        target = url + self.config.path + ("&autostart=0" if resume else "")
        try:
            self._conn = _wire.open_websocket(target, self.config.connect_timeout_s)
        except (OSError, TimeoutError, InvalidHandshake, WebSocketException) as exc:
            raise BackendUnavailable(
                f"vllm-omni replica {target} is not reachable ({type(exc).__name__}: {exc}); {_START_HINT}"
            ) from None

    def _close_socket(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _send(self, message: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed

        if self._conn is None:
            raise _DroppedError("no socket")
        try:
            self._conn.send(json.dumps(message))
        except (ConnectionClosed, OSError) as exc:
            self._close_socket()
            raise _DroppedError(str(exc)) from None

    def _send_quiet(self, message: dict[str, Any]) -> None:
        """Best-effort send (acks, close): a failure here surfaces at the next real call."""
        with contextlib.suppress(_DroppedError):
            self._send(message)

    def _recv(self, deadline: float, what: str) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        if self._conn is None:
            raise _DroppedError("no socket")
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            raw = self._conn.recv(timeout=remaining)
        except TimeoutError:
            raise BackendTimeout(
                f"vllm-omni {what} at {self._url} did not answer within its deadline"
            ) from None
        except (ConnectionClosed, OSError) as exc:
            self._close_socket()
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

    def _send_with_resume(self, message: dict[str, Any]) -> None:
        try:
            self._send(message)
            return
        except _DroppedError:
            pass
        if not self._resume():
            self._lose_session()
            raise BackendUnavailable(
                f"vllm-omni replica {self._url} dropped the connection and the session could not be resumed; the next prefill opens a new session"
            )
        try:
            self._send(message)
        except _DroppedError:
            self._lose_session()
            raise BackendUnavailable(
                f"vllm-omni replica {self._url} dropped the connection again"
            ) from None

    def _recv_with_resume(self, deadline: float) -> dict[str, Any] | None:
        try:
            event = self._recv(deadline, "unit")
        except _DroppedError:
            if not self._resume():
                self._lose_session()
                raise BackendUnavailable(
                    f"vllm-omni replica {self._url} vanished mid-turn and session {self._session_id or '?'} "
                    "could not be resumed; the next prefill opens a new session"
                ) from None
            return None
        except BackendTimeout:
            # Events carry no unit index, so a late answer would be taken for the next unit's. The
            # only safe way to stay aligned is a fresh session (history is lost, units stay honest).
            self._end_session(wait=False)  # a stuck replica will not answer session.close either
            self._prepared = False
            self._needs_new_session = True
            raise
        seq = _seq(event, default=None)
        if seq is not None:
            if seq <= self._last_seq:
                return None  # replayed after a resume: already seen
            self._last_seq = seq
        return event

    # ----------------------------------------------------------------------------------- helpers
    def _send_barge_in(self) -> None:
        self._interrupt.clear()
        if self._capabilities.get("supports_barge_in", False):
            self._send_with_resume({"type": "barge_in"})
        if self._response_id:
            self._send_with_resume({"type": "response.cancel", "response_id": self._response_id})

    def _on_response_done(self, event: Mapping[str, Any]) -> None:
        response = _dict(event.get("response"))
        status = response.get("status", event.get("status"))
        if status == "failed":
            raise BackendError(
                f"vllm-omni response {event.get('response_id')!r} failed: {response.get('status_details')!r}"
            )
        if status not in ("completed", "cancelled", "failed"):
            raise BackendProtocolError(f"response.done with unknown status {status!r}")
        self._response_id = None
        self._delivered_ms = 0

    def _raise_error(self, event: Mapping[str, Any], during: str) -> None:
        code = _error_code(event)
        message = _error_message(event)
        if code in _BUSY_CODES:
            raise BackendUnavailable(f"vllm-omni at {self._url} is at capacity ({code}: {message})")
        raise BackendError(f"vllm-omni error during {during}: {code} {message}")

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

    def _audio_from(self, event: Mapping[str, Any]) -> FloatArray:
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
        return _wire.pcm16_to_float(_wire.b64decode(event.get("delta"), "audio delta"))

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
    return str(event.get("code", ""))  # handshake-stage errors use the flat native shape


def _error_message(event: Mapping[str, Any]) -> str:
    err = event.get("error")
    if isinstance(err, dict):
        return str(err.get("message", ""))
    return str(err or "")
