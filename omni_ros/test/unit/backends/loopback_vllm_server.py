"""``LoopbackVllmServer``: a test double of vllm-omni's realtime duplex endpoint, on 127.0.0.1.

It reproduces what the real server does for a MiniCPM-o 4.5 deployment. Each behaviour names the
upstream file and function (vllm-project/vllm-omni, paths under ``vllm_omni/``); ``serving`` is
``entrypoints/duplex/serving.py``, ``runner`` ``engine/duplex/session/runner.py``, ``manager``
``engine/duplex/session/manager.py``, ``projection`` ``engine/duplex/realtime_events.py``.

Handshake and lifecycle
- The first client event opens the session: ``session.update`` (``serving: _open``) or
  ``session.resume`` (``serving: _resume``). The answer is ``session.created`` with ``resume_token``
  and ``session.capabilities`` (with ``duplex=False``: the turn-based fallback, no capabilities),
  which is *not* journaled and carries no ``server_event_seq`` (``serving: _UNJOURNALED_EVENTS``),
  then ``session.updated`` (``projection: _project``, ``initial_session_update``).
- Refusals use the Realtime error shape ``{type: error, event_id, error: {type, code, message}}``
  (``serving: _open`` -> ``RealtimeEnvelope.error_payload`` -> ``ErrorEvent.to_realtime``; classes
  from ``engine/duplex/events.py: REALTIME_ERROR_TYPES_BY_CODE``): ``ref_audio_required`` when
  audio output has no voice (``minicpmo_4_5/duplex/plugin.py: prepare_runtime_config``),
  ``unsupported_turn_detection`` for a pairing ``engine/duplex/turn_detection.py:
  validate_realtime_turn_detection`` rejects, ``resource_exhausted`` (``rate_limit_error``) beyond
  ``max_sessions`` live *or closing* sessions (``manager: open``, ``_admission_count``).
- ``session.close`` is answered with ``session.closed`` only after ``teardown_s`` (the stage
  cleanup), and the slot stays taken until then (``manager: _close_runner``); commands meanwhile
  get ``session_closed`` (``manager: _dispatch_command``).
- Every session event is journaled with an increasing ``server_event_seq`` starting at 1
  (``entrypoints/duplex/session_attachment.py: DuplexEventJournal.record``); ``session.event_ack``
  trims the journal, one beyond the head is ``invalid_event_ack`` (``serving:
  _handle_envelope_event``). A dropped socket detaches the session for ``disconnect_grace_s``;
  ``session.resume`` answers ``session.resumed`` (rotated token, not journaled) and replays the
  journal after ``last_received_server_event_seq`` (``session_attachment.py: resume``), or
  ``invalid_session_resume`` / ``session_resume_expired`` / ``invalid_resume_token`` /
  ``session_resume_conflict`` / ``session.resync_required`` (``serving: _resume``). No client
  message for ``idle_timeout_s`` counts as a disconnect (``serving: _read_loop``);
  ``session.heartbeat`` -> ``session.heartbeat_ack`` (``runner: _on_heartbeat``).

Units and responses
- Appends are cut into model units: unit 0 closes at 16480 samples, every later one 16000 samples
  after it (``clients/duplex.py: DUPLEX_FIRST_UNIT_MS``). A camera frame binds to the first unit
  its append closes; a frame on an append that closes none is stranded (``clients/duplex.py:
  DuplexClient.stream_pcm``).
- Without ``extra_body.auto_response: true`` the session is commit-driven: quiet appends get
  ``response.listen`` (``silence_or_noise``), speech waits for a commit that never comes (``runner:
  _on_append_audio``; ``session/emitter.py: auto_responds``).
- Outside a response each unit gets ``response.listen`` or a response start (``response.created``
  and its item fan-out). Inside a response a unit where the model listens emits *nothing*, and
  when the client sends no audio for ``continuation_period_s`` the server runs a unit of silence
  itself (``session/model_channel.py: ModelChannel._on_model_listen``, ``runner:
  _schedule_silence_continuation``; at most 64 per response, ``_AUTO_RESPONSE_MAX_CONTINUATION_UNITS``).
- Speech is released ``audio_delay_s`` after its unit, in order (stage 1/2 outputs:
  ``ModelChannel.on_stage_output_item``): ``response.speak`` before the first delta, then per unit
  one audio delta (base64 PCM16 24 kHz, ``metadata.end_of_turn``) and exactly one transcript delta;
  the last unit adds ``.done`` events, ``response.done{completed}`` and ``rate_limits.updated``
  (``projection: _project``). Output of a superseded epoch is dropped (``session/emitter.py:
  is_stale_model_output``). ``spelling`` picks the delta names (``"ga"``, ``"beta"``, ``"both"``).
- ``barge_in`` clears buffered input, ends the active response (``response.done{cancelled,
  barge_in}``; with none active: ``input_audio_buffer.cleared``) and advances the epoch (``runner:
  _on_cancel``, ``_cancel_active_response``). ``response.cancel`` of a response that already ended
  is ``response_not_active`` (``projection: resolve_cancel_response``).
- With ``turn_detection: server_vad`` (overlap ``barge_in_on_speech``) speech during a response
  barges in by itself: ``speech_started``, ``overlap.decision{barge_in}``, ``response.done
  {cancelled, turn_detected}`` (``session/overlap_policy.py: decide``, ``runner:
  _barge_in_for_overlap``). The VAD here is an RMS threshold standing in for Silero.

Playback truth
- ``playback.ack`` raises the response's committed position (``session/playback_ledger.py:
  apply_playback_ack``); its ``truncate`` flag is dropped on the way in
  (``engine/duplex/realtime_commands.py: translate_realtime_command``). History holds, per
  assistant item, only the committed audio (the runner forces ``ack_only``: ``runner: start``); a
  cancel cuts it at the committed position (``runner: _cancel_active_response``);
  ``conversation.item.truncate`` cuts it hard (``projection: resolve_truncate_item``; unknown item:
  ``item_not_found``). ``history_ms`` is what the tests read.

Server generations: ``generation="2026-08"`` reproduces the August 2026 handler
(chickeyton/vllm-omni branch fullduplex3, run against this client on loopback): without
``extra_body.minicpmo45_native_duplex: true`` it serves its generic, non-native session adapter,
and ``session.resume`` without ``incarnation`` is ``invalid_session_resume``
(``entrypoints/duplex/realtime_input.py: parse_resume_request`` there). ``supports_barge_in=False``
advertises what that generation advertised for MiniCPM-o; ``barge_in`` is then refused with
``barge_in_unsupported`` (``session/helpers.py: barge_in_unsupported_error``).

Fault switches: ``fault`` = ``"drop_mid_turn"`` (cut the socket after the next audio delta, before
its transcript; the session survives for resume), ``"hang"`` (appends swallowed), ``"malformed"``
(the next event is broken JSON), ``"ack_too_late"`` (the next ``playback.ack`` is refused with
``playback_ack_too_late``, ``apply_playback_ack``); ``backpressure_appends = n`` refuses the next n
appends with ``input_backpressure`` (``manager: _dispatch_command``). ``stop()`` kills the
"process": every session is lost.

The listen/speak decisions come from :class:`DuplexModelDouble` (no weights).
"""

from __future__ import annotations

import base64
import heapq
import io
import itertools
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omni_ros.backends import _wire
from PIL import Image
from unit.backends.loopback_duplex_model import DuplexModelDouble

FIRST_UNIT_SAMPLES = 16_480  # clients/duplex.py: DUPLEX_FIRST_UNIT_MS = 1030
UNIT_SAMPLES = 16_000
OUTPUT_RATE = 24_000
MAX_CONTINUATIONS = 64  # model_channel.py: _AUTO_RESPONSE_MAX_CONTINUATION_UNITS
SILENCE_RMS = 0.003  # engine/duplex/config.py: DuplexSessionConfig.overlap_silence_rms
VAD_RMS = 0.02  # stand-in for Silero's speech decision

_ERROR_TYPES = {  # engine/duplex/events.py: REALTIME_ERROR_TYPES_BY_CODE (the codes used here)
    "resource_exhausted": "rate_limit_error",
    "input_backpressure": "rate_limit_error",
    "internal_error": "server_error",
}


@dataclass
class _Response:
    id: str
    epoch: int
    generated_ms: int = 0
    committed_ms: int = 0
    audio_emitted: bool = False
    speak_emitted: bool = False
    done: bool = False
    model_ended: bool = False  # stage 0 ended the turn; the talker has not released it all yet
    status: str = "in_progress"
    continuations: int = 0


@dataclass
class _Session:
    id: str
    resume_token: str
    config: dict[str, Any]
    model: DuplexModelDouble
    auto_response: bool
    server_vad: bool
    seq: int = 0
    journal: list[tuple[int, str]] = field(default_factory=list)
    conn: Any = None
    attachment_generation: int = 1
    detached_at: float | None = None
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    units: int = 0
    client_units: int = 0
    continuation_units: int = 0
    frames: list[tuple[int, tuple[int, int]]] = field(default_factory=list)
    stranded_frames: int = 0
    epoch: int = 0
    active: _Response | None = None
    last_response: _Response | None = None
    responses: dict[str, _Response] = field(default_factory=dict)
    response_count: int = 0
    history_ms: dict[str, int] = field(default_factory=dict)
    continuation_token: int = 0
    release_at: float = 0.0
    acks: list[dict[str, Any]] = field(default_factory=list)
    barge_ins: int = 0
    cancels: int = 0
    heartbeats: int = 0
    truncates: list[dict[str, Any]] = field(default_factory=list)
    closing: bool = False
    closed: bool = False


class LoopbackVllmServer:
    """Test double of a vllm-omni replica serving MiniCPM-o 4.5 duplex sessions."""

    def __init__(
        self,
        port: int = 0,
        *,
        max_sessions: int = 4,
        duplex: bool = True,
        disconnect_grace_s: float = 30.0,
        spelling: str = "ga",
        audio_delay_s: float = 0.0,
        continuation_period_s: float = 1.0,
        teardown_s: float = 0.05,
        idle_timeout_s: float = 300.0,
        generation: str = "current",
        supports_barge_in: bool = True,
    ) -> None:
        if generation not in ("current", "2026-08"):
            raise ValueError(f"unknown server generation {generation!r}")
        self.generation = generation
        self.supports_barge_in = supports_barge_in
        self.max_sessions = max_sessions
        self.duplex = duplex
        self.disconnect_grace_s = disconnect_grace_s
        self.spelling = spelling
        self.audio_delay_s = audio_delay_s
        self.continuation_period_s = continuation_period_s
        self.teardown_s = teardown_s
        self.idle_timeout_s = idle_timeout_s
        self.fault: str | None = None
        self.backpressure_appends = 0
        self.model_factory: Callable[[], DuplexModelDouble] = DuplexModelDouble
        self.lock = threading.RLock()
        self.sessions: dict[str, _Session] = {}
        self.received: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.resumes = 0
        self.idle_disconnects = 0
        #: Sessions closed politely: ``session.close`` answered with ``session.closed``.
        self.closed_sessions = 0
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._conns: set[Any] = set()
        self._jobs: list[tuple[float, int, Callable[[], None]]] = []
        self._job_ids = itertools.count()
        self._wake = threading.Condition(self.lock)
        self._stopping = False
        self._scheduler: threading.Thread | None = None

    # ------------------------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}"

    def start(self) -> LoopbackVllmServer:
        from websockets.sync.server import serve

        self._server = serve(self._handler, "127.0.0.1", self._port, max_size=64 * 1024 * 1024)
        self._port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._stopping = False
        self._scheduler = threading.Thread(target=self._run_jobs, daemon=True)
        self._scheduler.start()
        return self

    def stop(self) -> None:
        """Kill the replica: close every socket and lose every session."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        with self.lock:
            conns, self._conns = list(self._conns), set()
            self.sessions.clear()
            self._jobs.clear()
            self._stopping = True
            self._wake.notify_all()
        for conn in conns:
            _kill(conn)
        for thread in (self._thread, self._scheduler):
            if thread is not None:
                thread.join(timeout=5)
        self._thread = self._scheduler = None

    def live_sessions(self) -> list[_Session]:
        with self.lock:
            self._reap()
            return [s for s in self.sessions.values() if not s.closed]

    def session(self) -> _Session:
        """The one live session (tests with a single robot)."""
        (only,) = self.live_sessions()
        return only

    # --------------------------------------------------------------------------------- jobs
    def _later(self, delay_s: float, job: Callable[[], None]) -> None:
        """Run ``job`` under the lock after ``delay_s`` (the engine's asynchronous work)."""
        with self.lock:
            heapq.heappush(self._jobs, (time.monotonic() + delay_s, next(self._job_ids), job))
            self._wake.notify_all()

    def _run_jobs(self) -> None:
        with self.lock:
            while not self._stopping:
                if not self._jobs:
                    self._wake.wait(0.5)
                    continue
                due, _, job = self._jobs[0]
                now = time.monotonic()
                if due > now:
                    self._wake.wait(due - now)
                    continue
                heapq.heappop(self._jobs)
                try:
                    job()
                except Exception:  # a job must never kill the scheduler
                    import logging

                    logging.getLogger(__name__).exception("loopback vllm job failed")

    # --------------------------------------------------------------------------------- handler
    def _handler(self, conn: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        path = conn.request.path
        if not path.startswith("/v1/realtime") and not path.startswith("/v1/duplex"):
            conn.close(code=1008, reason="unknown route")
            return
        with self.lock:
            self._conns.add(conn)
        session: _Session | None = None
        try:
            while True:
                try:
                    raw = conn.recv(timeout=self.idle_timeout_s)
                except TimeoutError:
                    # serving.py: _read_loop: the idle window passed without a client message.
                    with self.lock:
                        self.idle_disconnects += 1
                    break
                try:
                    msg = json.loads(raw)
                except json.JSONDecodeError:
                    self._send_raw(conn, _error("invalid_json", "Invalid JSON event"))
                    continue
                with self.lock:
                    self.received.append(msg)
                    if session is None:
                        session = self._open(conn, msg)
                        if session is None:
                            conn.close()
                            return
                        continue
                    if session.conn is not conn:
                        return  # replaced by a resumed socket
                    if not self._dispatch(session, msg):
                        return
        except (ConnectionClosed, OSError):
            pass
        finally:
            with self.lock:
                self._conns.discard(conn)
                if session is not None and session.conn is conn and not session.closed:
                    session.conn = None
                    session.detached_at = time.monotonic()
            _kill(conn)

    def _open(self, conn: Any, msg: dict[str, Any]) -> _Session | None:
        kind = msg.get("type")
        if kind == "session.resume":
            return self._resume(conn, msg)
        if kind != "session.update" or not isinstance(msg.get("session"), dict):
            self._send_raw(conn, _error("bad_event", "first event must be session.update"))
            return None
        config = msg["session"]
        event_id = msg.get("event_id")
        self._reap()
        # manager.py: _admission_count: live and still-closing sessions hold a slot.
        if len(self.sessions) >= self.max_sessions:
            self.refused.append("resource_exhausted")
            self._send_raw(
                conn,
                _error(
                    "resource_exhausted",
                    f"duplex_session_capacity_exhausted: limit={self.max_sessions}",
                ),
            )
            return None
        rejection = _turn_detection_rejection(config)
        if rejection is not None:
            self.refused.append("unsupported_turn_detection")
            self._send_raw(
                conn,
                _error("unsupported_turn_detection", rejection, event_id, param="turn_detection"),
            )
            return None
        ref = config.get("ref_audio")
        modalities = config.get("modalities") or ["text", "audio"]
        if "audio" in modalities and not isinstance(ref, str):
            self.refused.append("ref_audio_required")
            self._send_raw(
                conn,
                _error("ref_audio_required", "MiniCPM-o duplex audio output requires ref_audio"),
            )
            return None
        if isinstance(ref, str):
            _wire.parse_wav(base64.b64decode(ref.split(",", 1)[1]), "ref_audio")
        extra = config.get("extra_body") if isinstance(config.get("extra_body"), dict) else {}
        session = _Session(
            id=f"duplex-{uuid.uuid4().hex}",
            resume_token=f"rt_{uuid.uuid4().hex}",
            config=config,
            model=self.model_factory(),
            auto_response=extra.get("auto_response") is True,
            server_vad=isinstance(config.get("turn_detection"), dict),
            conn=conn,
        )
        self.sessions[session.id] = session
        info: dict[str, Any] = {
            "object": "realtime.session",
            "type": "realtime",
            "id": session.id,
            "model": config.get("model"),
            "state": "open",
            "turn_state": "idle",
            "epoch": 0,
            "turn_id": 0,
            "instructions": config.get("instructions"),
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "overlap_policy": config.get("overlap_policy", "listen_only"),
            "playback_commit_policy": "ack_only",  # runner.py: start forces it
            "turn_detection": config.get("turn_detection"),
            "playback": {"generated_ms": 0, "sent_ms": 0, "played_ms": 0, "committed_ms": 0},
        }
        native = self.generation == "current" or extra.get("minicpmo45_native_duplex") is True
        if self.duplex and not native:
            # The August 2026 handler serves its generic session adapter unless extra_body asks
            # for the native lane (minicpmo_4_5/duplex/adapter.py: is_enabled; serving.py:
            # _uses_native_input_append; capabilities of the registry default, as served there).
            info["capabilities"] = {
                "implementation_level": "serving_session_adapter",
                "supports_input_append": False,
                "supports_barge_in": True,
                "supports_session_resume": False,
                "chunk_period_ms": 1000,
                "input_modes": ["turn_commit_only", "reencode_context"],
            }
        elif self.duplex:
            # minicpmo_4_5/duplex/capabilities.py: minicpmo45_native_capabilities (the August 2026
            # generation served supports_barge_in: false for MiniCPM-o)
            info["capabilities"] = {
                "implementation_level": "model_native_duplex",
                "supports_input_append": True,
                "supports_barge_in": self.supports_barge_in,
                "supports_session_resume": True,
                "supports_session_lease": True,
                "supports_audio_truncate": True,
                "supports_client_commit": True,
                "chunk_period_ms": 1000,
                "input_modes": ["append_audio_chunk"],
            }
        created = {
            "type": "session.created",
            "event_id": _event_id(),
            "attachment_generation": 1,
            "incarnation": 0,
            "resume_token": session.resume_token,
            "session": info,
        }
        self._send_raw(conn, created)  # serving.py: _UNJOURNALED_EVENTS: no server_event_seq
        self._emit(session, {"type": "session.updated", "session": info})
        return session

    def _resume(self, conn: Any, msg: dict[str, Any]) -> _Session | None:
        self._reap()
        session_id, token = msg.get("session_id"), msg.get("resume_token")
        last = msg.get("last_received_server_event_seq", 0)
        incarnation_ok = self.generation == "current" or isinstance(msg.get("incarnation"), int)
        if (
            not incarnation_ok
            or not isinstance(session_id, str)
            or not session_id
            or not isinstance(token, str)
            or not token
            or not isinstance(last, int)
            or last < 0
        ):
            # serving.py: parse_resume_request
            self._send_raw(
                conn,
                _error(
                    "invalid_session_resume",
                    "session.resume requires session_id, resume_token, and a non-negative "
                    "event sequence",
                ),
            )
            return None
        session = self.sessions.get(session_id)
        if session is None or session.closed or session.closing:
            self._send_raw(
                conn,
                _error(
                    "session_resume_expired", f"Unknown or expired duplex session: {session_id}"
                ),
            )
            return None
        if token != session.resume_token:
            self._send_raw(
                conn, _error("invalid_resume_token", "Invalid duplex session resume token")
            )
            return None
        if last > session.seq:
            self._send_raw(
                conn,
                _error("session_resume_conflict", f"sequence {last} is newer than the journal"),
            )
            return None
        if session.journal and last < session.journal[0][0] - 1:
            self._send_raw(
                conn,
                {
                    "type": "session.resync_required",
                    "event_id": _event_id(),
                    "session_id": session.id,
                    "reason": "journal_gap",
                },
            )
            return None
        old = session.conn
        if old is not None and old is not conn:
            self._send_raw(
                old,
                {
                    "type": "session.replaced",
                    "event_id": _event_id(),
                    "session_id": session.id,
                    "attachment_generation": session.attachment_generation,
                },
            )
            _kill(old)
        self.resumes += 1
        session.conn = conn
        session.detached_at = None
        session.attachment_generation += 1
        session.resume_token = f"rt_{uuid.uuid4().hex}"
        self._send_raw(
            conn,
            {
                "type": "session.resumed",
                "event_id": _event_id(),
                "session_id": session.id,
                "attachment_generation": session.attachment_generation,
                "resume_token": session.resume_token,
                "session": {"id": session.id, "state": "open", "epoch": session.epoch},
            },
        )
        for seq, text in list(session.journal):
            if seq > last:
                self._send_text(conn, text)
        return session

    # -------------------------------------------------------------------------------- commands
    def _dispatch(self, s: _Session, msg: dict[str, Any]) -> bool:
        kind = msg.get("type")
        event_id = msg.get("event_id")
        if kind == "session.event_ack":
            upto = msg.get("server_event_seq")
            if not isinstance(upto, int) or upto < 0 or upto > s.seq:
                self._send_raw(s.conn, _error("invalid_event_ack", f"bad event ack {upto!r}"))
            else:
                s.journal = [(seq, text) for seq, text in s.journal if seq > upto]
            return True
        if kind == "session.resume":
            self._send_raw(
                s.conn,
                _error(
                    "unsupported_session_resume",
                    "session.resume must be the first message of a new connection",
                ),
            )
            return True
        if s.closing:
            self._emit(s, _error("session_closed", f"Duplex session is closing: {s.id}", event_id))
            return True
        if kind == "input_audio_buffer.append":
            self._append(s, msg)
        elif kind == "barge_in":
            s.barge_ins += 1
            if not self.supports_barge_in:
                # runner.py: _on_cancel -> helpers.barge_in_unsupported_error
                self._emit(
                    s,
                    _error(
                        "barge_in_unsupported",
                        "Barge-in is not supported by this duplex model",
                        event_id,
                    ),
                )
                return True
            self._cancel(s, reason="barge_in", clear_input=True)
        elif kind == "response.cancel":
            s.cancels += 1
            self._response_cancel(s, msg)
        elif kind in ("playback.ack", "audio.playback_ack"):
            self._playback_ack(s, msg)
        elif kind == "conversation.item.truncate":
            self._truncate(s, msg)
        elif kind == "session.heartbeat":
            s.heartbeats += 1
            self._emit(s, {"type": "session.heartbeat_ack", "session_id": s.id})
        elif kind in ("session.close", "close", "close_session"):
            self._close(s)
        elif kind == "session.update":
            self._emit(s, {"type": "session.updated", "session": {"id": s.id}})
        elif kind in ("input.text.append", "input_text.append", "push_text"):
            self._emit(
                s,
                _error(
                    "native_text_append_unsupported",
                    "The selected native duplex runtime accepts audio append only",
                    event_id,
                ),
            )
        else:
            # realtime_commands.py: translate_realtime_command; sent by the transport, unjournaled.
            self._send_raw(
                s.conn, _error("unknown_event", f"Unknown duplex event type: {kind}", event_id)
            )
        return True

    def _append(self, s: _Session, msg: dict[str, Any]) -> None:
        if self.backpressure_appends > 0:
            self.backpressure_appends -= 1
            self._emit(
                s,
                _error(
                    "input_backpressure",
                    "Duplex session has too many pending input bytes",
                    msg.get("event_id"),
                ),
            )
            return
        pcm = _wire.pcm16_to_float(base64.b64decode(msg.get("audio", "")))
        sizes: list[tuple[int, int]] = []
        for frame in msg.get("video_frames", []) or []:
            try:
                with Image.open(io.BytesIO(base64.b64decode(frame, validate=True))) as im:
                    im.load()
                    sizes.append(im.size)
            except Exception:
                self._send_raw(
                    s.conn, _error("invalid_video_frames", "video_frames must be base64 JPEG/PNG")
                )
                return
        if self.fault == "hang":
            return
        rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64)))) if len(pcm) else 0.0
        hint = msg.get("is_speech")
        looks_like_speech = hint if isinstance(hint, bool) else rms >= SILENCE_RMS
        if not s.auto_response and not looks_like_speech:
            # runner.py: _on_append_audio, turn mode: skip silent chunks.
            self._emit(
                s,
                {
                    "type": "response.listen",
                    "session_id": s.id,
                    "epoch": s.epoch,
                    "response": {
                        "object": "realtime.response",
                        "status": "listening",
                        "metadata": {"reason": "silence_or_noise"},
                    },
                },
            )
            return
        if s.server_vad and s.active is not None and rms >= VAD_RMS:
            # overlap_policy.py: decide -> barge_in (server_vad_speech_started); the append then
            # continues in the new epoch (runner.py: _barge_in_for_overlap).
            self._emit(s, {"type": "input_audio_buffer.speech_started", "audio_start_ms": 0})
            self._emit(
                s,
                {
                    "type": "overlap.decision",
                    "session_id": s.id,
                    "epoch": s.epoch,
                    "policy": "barge_in_on_speech",
                    "action": "barge_in",
                    "reason": "server_vad_speech_started",
                    "metadata": {},
                },
            )
            self._cancel(s, reason="turn_detected", clear_input=False)
        s.continuation_token += 1  # runner.py: _mark_pending_silence_superseded
        s.buffer = np.concatenate([s.buffer, pcm])
        closed_any = False
        while len(s.buffer) >= (FIRST_UNIT_SAMPLES if s.units == 0 else UNIT_SAMPLES):
            size = FIRST_UNIT_SAMPLES if s.units == 0 else UNIT_SAMPLES
            unit, s.buffer = s.buffer[:size], s.buffer[size:]
            if not closed_any:
                s.frames.extend((s.units, wh) for wh in sizes)
                closed_any = True
            s.client_units += 1
            if s.auto_response:
                self._unit(s, unit)
            else:
                s.units += 1  # buffered for a commit
        if sizes and not closed_any:
            s.stranded_frames += len(sizes)

    def _unit(self, s: _Session, audio: np.ndarray) -> None:
        index = s.units
        s.units += 1
        decision = s.model.step(audio)
        if not decision.speak:
            if s.active is not None:
                # model_channel.py: _on_model_listen: a non-terminal listen inside a response
                # emits nothing; a silence continuation follows while the turn is open.
                if not s.active.model_ended:
                    self._schedule_continuation(s)
                return
            self._emit(
                s,
                {
                    "type": "response.listen",
                    "session_id": s.id,
                    "epoch": s.epoch,
                    "response": {
                        "object": "realtime.response",
                        "status": "listening",
                        "metadata": {"type": "response.listen", "reason": "model_listen"},
                    },
                },
            )
            return
        response = s.active
        if response is None or response.model_ended:
            s.response_count += 1
            response = _Response(id=f"resp_{s.response_count:02d}", epoch=s.epoch)
            s.responses[response.id] = response
            s.active = s.last_response = response
            item = {
                "id": f"item_{response.id}",
                "object": "realtime.item",
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            self._emit(
                s,
                {
                    "type": "response.created",
                    "response_id": response.id,
                    "response": {
                        "id": response.id,
                        "object": "realtime.response",
                        "status": "in_progress",
                        "status_details": None,
                        "output": [],
                    },
                },
            )
            self._emit(s, {"type": "conversation.item.added", "item": item})
            self._emit(s, {"type": "conversation.item.created", "item": item})
            self._emit(
                s, {"type": "response.output_item.added", "response_id": response.id, "item": item}
            )
            self._emit(
                s,
                {
                    "type": "response.content_part.added",
                    "response_id": response.id,
                    "item_id": item["id"],
                    "part": {"type": "audio", "transcript": ""},
                },
            )
        assert decision.audio is not None
        audio_out, text, end = decision.audio, decision.text, decision.end_of_turn
        if end:
            response.model_ended = True  # the response stays active until its release ends it
        else:
            self._schedule_continuation(s)
        # Stage 1/2 release the speech later and in order (model_channel.py: on_stage_output_item).
        now = time.monotonic()
        s.release_at = max(now + self.audio_delay_s, s.release_at)
        epoch = s.epoch
        self._later(
            s.release_at - now,
            lambda: self._release(s, response, epoch, index, audio_out, text, end),
        )

    def _release(
        self,
        s: _Session,
        response: _Response,
        epoch: int,
        unit_index: int,
        audio: np.ndarray,
        text: str,
        end: bool,
    ) -> None:
        if s.closed or s.closing or epoch != s.epoch or response.done:
            return  # session/emitter.py: is_stale_model_output
        duration_ms = len(audio) * 1000 // OUTPUT_RATE
        response.generated_ms += duration_ms
        item_id = f"item_{response.id}"
        if not response.speak_emitted:
            response.speak_emitted = True
            self._emit(
                s,
                {
                    "type": "response.speak",
                    "response_id": response.id,
                    "item_id": item_id,
                    "output_index": 0,
                    "content_index": 0,
                    "metadata": {"session_id": s.id, "epoch": s.epoch, "model_speak": True},
                },
            )
        delta = {
            "response_id": response.id,
            "item_id": item_id,
            "output_index": 0,
            "content_index": 0,
            "delta": base64.b64encode(_wire.float_to_pcm16(audio)).decode(),
            "format": "pcm16",
            "sample_rate_hz": OUTPUT_RATE,
            "metadata": {
                "session_id": s.id,
                "epoch": s.epoch,
                "model_speak": True,
                "end_of_turn": end,
                "audio_duration_ms": response.generated_ms,
                "unit": unit_index,
            },
        }
        response.audio_emitted = True
        for name in self._names("audio"):
            self._emit(s, {"type": name, **delta})
        if self.fault == "drop_mid_turn":
            self.fault = None
            _kill(s.conn)  # the transcript below is journaled while detached and replayed on resume
            s.conn = None
            s.detached_at = time.monotonic()
        transcript = {
            "response_id": response.id,
            "item_id": item_id,
            "output_index": 0,
            "content_index": 0,
            "delta": text,
        }
        for name in self._names("transcript"):
            self._emit(s, {"type": name, **transcript})
        if end:
            self._finish(s, response, "completed", None)

    def _finish(self, s: _Session, response: _Response, status: str, reason: str | None) -> None:
        """The terminal fan-out of one response (realtime_events.py: _realtime_response_terminal_events)."""
        item_id = f"item_{response.id}"
        response.done = True
        response.status = status
        if s.active is response:
            s.active = None
        if response.audio_emitted:
            self._emit(s, {"type": "response.output_audio.done", "response_id": response.id})
            self._emit(
                s, {"type": "response.output_audio_transcript.done", "response_id": response.id}
            )
        self._emit(s, {"type": "response.content_part.done", "response_id": response.id})
        item = {"id": item_id, "type": "message", "role": "assistant", "status": status}
        self._emit(
            s, {"type": "response.output_item.done", "response_id": response.id, "item": item}
        )
        self._emit(s, {"type": "conversation.item.done", "item": item})
        details = None if status == "completed" else {"type": status, "reason": reason}
        self._emit(
            s,
            {
                "type": "response.done",
                "response_id": response.id,
                "response": {
                    "id": response.id,
                    "object": "realtime.response",
                    "status": status,
                    "status_details": details,
                    "output": [item],
                },
            },
        )
        self._emit(s, {"type": "rate_limits.updated", "rate_limits": []})

    def _schedule_continuation(self, s: _Session) -> None:
        """runner.py: _schedule_silence_continuation: a unit of silence if no real input comes."""
        s.continuation_token += 1
        token, epoch = s.continuation_token, s.epoch

        def fire() -> None:
            response = s.active
            if (
                s.closed
                or s.closing
                or s.continuation_token != token
                or s.epoch != epoch
                or response is None
                or response.continuations >= MAX_CONTINUATIONS
            ):
                return
            response.continuations += 1
            s.continuation_units += 1
            self._unit(s, np.zeros(UNIT_SAMPLES, np.float32))

        self._later(self.continuation_period_s, fire)

    def _cancel(self, s: _Session, *, reason: str, clear_input: bool) -> None:
        """runner.py: _on_cancel / _cancel_active_response."""
        if clear_input:
            s.buffer = s.buffer[:0]
        s.model.force_listen()
        s.continuation_token += 1
        response = s.active
        s.epoch += 1
        if response is None:
            self._emit(s, {"type": "input_audio_buffer.cleared"})
            return
        item_id = f"item_{response.id}"
        if response.committed_ms > 0:
            s.history_ms[item_id] = response.committed_ms  # truncate_history_item(committed_ms)
        else:
            s.history_ms.pop(item_id, None)
        self._finish(s, response, "cancelled", reason)

    def _response_cancel(self, s: _Session, msg: dict[str, Any]) -> None:
        requested = msg.get("response_id")
        event_id = msg.get("event_id")
        last = s.last_response
        target = requested if isinstance(requested, str) and requested else None
        target = target or (s.active.id if s.active else (last.id if last else None))
        known = s.responses.get(target) if target else None
        if known is not None and known.done:
            # realtime_events.py: resolve_cancel_response
            self._emit(
                s,
                _error("response_not_active", f"Response is already complete: {target}", event_id),
            )
            return
        if s.active is None:
            self._emit(
                s,
                _error(
                    "response_not_active", "response.cancel requires an active response", event_id
                ),
            )
            return
        if target != s.active.id:
            self._emit(
                s, _error("response_not_active", f"Response is not active: {target}", event_id)
            )
            return
        self._cancel(s, reason="client_cancelled", clear_input=False)

    def _playback_ack(self, s: _Session, msg: dict[str, Any]) -> None:
        played = msg.get("played_ms")
        if not isinstance(played, int | float) or isinstance(played, bool):
            # realtime_commands.py: translate_realtime_command (transport-level, unjournaled)
            self._send_raw(s.conn, _error("bad_event", "playback.ack requires numeric played_ms"))
            return
        s.acks.append(msg)
        response_id = msg.get("response_id")
        item_id = msg.get("item_id")
        if not isinstance(response_id, str) and isinstance(item_id, str):
            response_id = item_id.removeprefix("item_")
        if not isinstance(response_id, str) and s.active is not None:
            response_id = s.active.id
        response = s.responses.get(response_id) if isinstance(response_id, str) else None
        if response is None:
            self._emit(
                s,
                _error(
                    "playback_item_not_found",
                    f"No assistant response item is registered for {response_id}.",
                ),
            )
            return
        if self.fault == "ack_too_late":
            self.fault = None
            self._emit(
                s,
                _error(
                    "playback_ack_too_late",
                    "playback.ack arrived after a later user input was committed.",
                ),
            )
            return
        committed = msg.get("committed_ms")
        committed = int(committed) if isinstance(committed, int | float) else int(played)
        item = f"item_{response.id}"
        if response.status != "cancelled":
            # ack_only: history holds what was acknowledged (playback_ledger.py: apply_playback_ack)
            response.committed_ms = max(response.committed_ms, committed)
            s.history_ms[item] = response.committed_ms
        self._emit(
            s,
            {
                "type": "playback.acknowledged",
                "event": {
                    "type": "playback.acknowledged",
                    "session_id": s.id,
                    "epoch": s.epoch,
                    "item_id": item,
                    "played_ms": int(played),
                    "committed_ms": committed,
                    "truncate": False,  # the wire flag does not reach the ledger
                    "playback": {
                        "generated_ms": response.generated_ms,
                        "sent_ms": response.generated_ms,
                        "played_ms": int(played),
                        "committed_ms": response.committed_ms,
                    },
                    "history_committed": True,
                },
            },
        )

    def _truncate(self, s: _Session, msg: dict[str, Any]) -> None:
        item_id, end_ms = msg.get("item_id"), msg.get("audio_end_ms")
        if not isinstance(item_id, str) or not item_id:
            self._send_raw(
                s.conn, _error("missing_item_id", "conversation.item.truncate requires item_id")
            )
            return
        if not isinstance(end_ms, int | float) or end_ms < 0:
            self._send_raw(
                s.conn, _error("bad_event", "conversation.item.truncate requires audio_end_ms")
            )
            return
        if item_id.removeprefix("item_") not in s.responses:
            self._emit(s, _error("item_not_found", f"Conversation item not found: {item_id}"))
            return
        s.truncates.append(msg)
        s.history_ms[item_id] = int(end_ms)  # hard truncate (control.py: on_turn_signal)
        self._emit(
            s,
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": int(msg.get("content_index", 0) or 0),
                "audio_end_ms": int(end_ms),
                "event": {"type": "conversation.item.truncated", "item_id": item_id},
            },
        )

    def _close(self, s: _Session) -> None:
        """manager.py: _close_runner: the slot stays taken until the stage cleanup finished."""
        s.closing = True
        s.continuation_token += 1

        def finish() -> None:
            s.closed = True
            self.sessions.pop(s.id, None)
            self.closed_sessions += 1
            self._emit(
                s,
                {
                    "type": "session.closed",
                    "session_id": s.id,
                    "epoch": s.epoch,
                    "reason": "client_close",
                    "event": {"type": "session.closed", "reason": "client_close"},
                },
            )
            conn, s.conn = s.conn, None
            if conn is not None:
                threading.Thread(target=conn.close, daemon=True).start()

        self._later(self.teardown_s, finish)

    # --------------------------------------------------------------------------------- helpers
    def _names(self, which: str) -> list[str]:
        ga = {
            "audio": "response.output_audio.delta",
            "transcript": "response.output_audio_transcript.delta",
        }[which]
        beta = {"audio": "response.audio.delta", "transcript": "response.audio_transcript.delta"}[
            which
        ]
        return {"ga": [ga], "beta": [beta], "both": [ga, beta]}[self.spelling]

    def _emit(self, s: _Session, event: dict[str, Any]) -> None:
        """Journal one session event (session_attachment.py: DuplexEventJournal.record) and send it."""
        s.seq += 1
        event = {"event_id": _event_id(), **event, "server_event_seq": s.seq}
        text = json.dumps(event)
        s.journal.append((s.seq, text))
        if self.fault == "malformed":
            self.fault = None
            text = text[: len(text) // 2]  # a truncated, unparsable frame
        if s.conn is not None:
            self._send_text(s.conn, text)

    def _send_raw(self, conn: Any, event: dict[str, Any]) -> None:
        if conn is not None:
            self._send_text(conn, json.dumps(event))

    def _send_text(self, conn: Any, text: str) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            conn.send(text)
        except (ConnectionClosed, OSError, RuntimeError):
            pass

    def _reap(self) -> None:
        """Expire sessions detached for longer than disconnect_grace_s (their slot is freed)."""
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if s.closed or (
                s.detached_at is not None and now - s.detached_at > self.disconnect_grace_s
            ):
                s.closed = True
                self.sessions.pop(sid, None)


def _event_id() -> str:
    return f"event_{uuid.uuid4().hex}"


def _error(
    code: str, message: str, event_id: object = None, *, param: str | None = None
) -> dict[str, Any]:
    """``ErrorEvent.to_realtime`` (engine/duplex/events.py)."""
    error: dict[str, Any] = {
        "type": _ERROR_TYPES.get(code, "invalid_request_error"),
        "code": code,
        "message": message,
    }
    if isinstance(event_id, str) and event_id:
        error["event_id"] = event_id
    if param:
        error["param"] = param
    return {"type": "error", "event_id": _event_id(), "error": error}


def _turn_detection_rejection(session: dict[str, Any]) -> str | None:
    """engine/duplex/turn_detection.py: validate_realtime_turn_detection."""
    policy = session.get("overlap_policy")
    if "turn_detection" not in session:
        if policy == "barge_in_on_speech":
            return "overlap_policy='barge_in_on_speech' requires turn_detection.type='server_vad'"
        return None
    td = session.get("turn_detection")
    if td is not None and not isinstance(td, dict):
        return "turn_detection must be null or an object with type='server_vad'"
    if isinstance(td, dict):
        if td.get("type") != "server_vad":
            return "turn_detection.type must be 'server_vad'"
        if td.get("interrupt_response", True) is not True:
            return "turn_detection.interrupt_response=false is unsupported"
    expected = "barge_in_on_speech" if td is not None else "listen_only"
    if isinstance(policy, str) and policy != expected:
        return f"overlap_policy={policy!r} conflicts with turn_detection; expected {expected!r}"
    return None


def _kill(conn: Any) -> None:
    """Cut a websockets connection's TCP socket without a close handshake (a crashed server)."""
    if conn is None:
        return
    for action in (lambda: conn.socket.shutdown(socket.SHUT_RDWR), conn.socket.close):
        try:
            action()
        except OSError:
            pass
