"""``LoopbackVllmServer``: a test double of vllm-omni's realtime duplex endpoint, on 127.0.0.1.

It speaks the event catalogue of ``/v1/realtime?duplex=1`` (``shared/notes/serving-protocols.md``;
vllm-omni ``docs/serving/realtime_duplex_api.md``) for a MiniCPM-o deployment:

- the first client event opens the session: ``session.update`` (-> ``session.created`` with
  ``resume_token`` and ``session.capabilities`` — or, with ``duplex=False``, the turn-based fallback
  without capabilities — then ``session.updated``) or ``session.resume``;
- a session without ``ref_audio`` is refused with ``ref_audio_required``; beyond ``max_sessions`` live
  sessions the open is refused with ``duplex_session_busy`` (``rate_limit_error``);
- every server event carries a per-session, increasing ``server_event_seq`` and is journaled; a dropped
  socket detaches the session, which stays resumable for ``disconnect_grace_s``: ``session.resume``
  with the right ``resume_token`` answers ``session.resumed`` (rotated token) and replays the
  journaled events after ``last_received_server_event_seq``; otherwise a flat
  ``{"type":"error","error":"Unknown or expired duplex session: ...","code":"session_resume_expired"}``;
- ``input_audio_buffer.append`` (base64 PCM16 16 kHz, optional ``video_frames``) is cut into 1000 ms
  units; each unit gets ``response.listen`` or, when the model speaks, ``response.created`` +
  ``response.speak`` (first unit of a response), one ``response.output_audio.delta`` (base64 PCM16
  24 kHz, ``metadata.end_of_turn``) and its ``response.output_audio_transcript.delta``; a turn's last
  unit adds ``response.output_audio.done``, ``response.done{status:"completed"}`` and
  ``rate_limits.updated``. ``spelling`` picks the delta names: ``"ga"`` (above), ``"beta"``
  (``response.audio.delta`` / ``response.audio_transcript.delta``) or ``"both"``;
- ``barge_in`` / ``response.cancel`` -> ``response.done{status:"cancelled"}``; ``playback.ack`` ->
  ``playback.acknowledged``; ``session.event_ack`` trims the journal; ``session.heartbeat`` ->
  ``session.heartbeat_ack``; ``session.close`` -> ``session.closed`` and the slot is freed.

Fault switches (``fault``): ``"drop_mid_turn"`` (the next speaking unit's socket is cut after its
audio delta, before the transcript: the session survives for resume), ``"hang"`` (appends are
swallowed), ``"malformed"`` (the next event is sent as broken JSON). ``stop()`` kills the "process":
every session is lost, as on a real replica crash.

The listen/speak decisions come from :class:`DuplexModelDouble` (no weights).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omni_ros.backends import _wire
from PIL import Image
from unit.backends.loopback_duplex_model import DuplexModelDouble

UNIT_SAMPLES = 16_000  # chunk_period_ms 1000 at 16 kHz


@dataclass
class _Session:
    id: str
    resume_token: str
    config: dict[str, Any]
    model: DuplexModelDouble
    seq: int = 0
    journal: list[tuple[int, str]] = field(default_factory=list)
    conn: Any = None
    attachment_generation: int = 1
    detached_at: float | None = None
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    frames: list[tuple[int, int]] = field(default_factory=list)
    response_id: str | None = None
    response_count: int = 0
    generated_ms: int = 0
    epoch: int = 0
    units: int = 0
    acks: list[dict[str, Any]] = field(default_factory=list)
    barge_ins: int = 0
    cancels: int = 0
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
    ) -> None:
        self.max_sessions = max_sessions
        self.duplex = duplex
        self.disconnect_grace_s = disconnect_grace_s
        self.spelling = spelling
        self.fault: str | None = None
        self.model_factory = DuplexModelDouble
        self.lock = threading.RLock()
        self.sessions: dict[str, _Session] = {}
        self.received: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.resumes = 0
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._conns: set[Any] = set()

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
        return self

    def stop(self) -> None:
        """Kill the replica: close every socket and lose every session."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        with self.lock:
            conns, self._conns = list(self._conns), set()
            self.sessions.clear()
        for conn in conns:
            _kill(conn)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def live_sessions(self) -> list[_Session]:
        with self.lock:
            self._reap()
            return [s for s in self.sessions.values() if not s.closed]

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
            for raw in conn:
                try:
                    msg = json.loads(raw)
                except json.JSONDecodeError:
                    self._send_raw(
                        conn,
                        {
                            "type": "error",
                            "error": {
                                "type": "invalid_request_error",
                                "code": "invalid_json",
                                "message": "not JSON",
                            },
                        },
                    )
                    continue
                with self.lock:
                    self.received.append(msg)
                    if session is None:
                        session = self._open(conn, msg)
                        if session is None:
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

    def _open(self, conn: Any, msg: dict[str, Any]) -> _Session | None:
        kind = msg.get("type")
        if kind == "session.resume":
            return self._resume(conn, msg)
        if kind != "session.update" or not isinstance(msg.get("session"), dict):
            self._send_raw(
                conn,
                {
                    "type": "error",
                    "error": "first event must be session.update or session.resume",
                    "code": "invalid_handshake",
                },
            )
            conn.close()
            return None
        config = msg["session"]
        self._reap()
        if len([s for s in self.sessions.values() if not s.closed]) >= self.max_sessions:
            self.refused.append("duplex_session_busy")
            self._send_raw(
                conn,
                {
                    "type": "error",
                    "error": {
                        "type": "rate_limit_error",
                        "code": "duplex_session_busy",
                        "message": f"duplex_session_capacity_exhausted: limit={self.max_sessions}",
                        "event_id": msg.get("event_id"),
                    },
                },
            )
            conn.close()
            return None
        ref = config.get("ref_audio")
        if not isinstance(ref, str) or not ref.startswith("data:audio/wav;base64,"):
            self.refused.append("ref_audio_required")
            self._send_raw(
                conn,
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "code": "ref_audio_required",
                        "message": "MiniCPM-o duplex sessions require session.ref_audio (a WAV data URL)",
                        "event_id": msg.get("event_id"),
                        "param": "ref_audio",
                    },
                },
            )
            conn.close()
            return None
        _wire.parse_wav(base64.b64decode(ref.split(",", 1)[1]), "ref_audio")
        session = _Session(
            id=f"duplex-{uuid.uuid4().hex}",
            resume_token=f"rt_{uuid.uuid4().hex}",
            config=config,
            model=self.model_factory(),
            conn=conn,
        )
        self.sessions[session.id] = session
        info: dict[str, Any] = {
            "object": "realtime.session",
            "type": "realtime",
            "id": session.id,
            "model": config.get("model"),
            "state": "open",
            "epoch": 0,
            "turn_id": 0,
            "instructions": config.get("instructions"),
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "playback": {"generated_ms": 0, "sent_ms": 0, "played_ms": 0, "committed_ms": 0},
        }
        if self.duplex:
            info["capabilities"] = {
                "implementation_level": "model_native_duplex",
                "supports_input_append": True,
                "supports_barge_in": True,
                "supports_session_resume": True,
                "chunk_period_ms": 1000,
                "input_modes": ["append_audio_chunk"],
            }
        self._emit(
            session,
            {
                "type": "session.created",
                "attachment_generation": 1,
                "resume_token": session.resume_token,
                "session": info,
            },
        )
        self._emit(session, {"type": "session.updated", "session": info})
        return session

    def _resume(self, conn: Any, msg: dict[str, Any]) -> _Session | None:
        self._reap()
        session = self.sessions.get(str(msg.get("session_id")))
        if session is None or session.closed or msg.get("resume_token") != session.resume_token:
            self._send_raw(
                conn,
                {
                    "type": "error",
                    "error": f"Unknown or expired duplex session: {msg.get('session_id')}",
                    "code": "session_resume_expired",
                },
            )
            conn.close()
            return None
        old = session.conn
        if old is not None and old is not conn:
            self._send_raw(
                old,
                {
                    "type": "session.replaced",
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
        last = msg.get("last_received_server_event_seq", -1)
        self._emit(
            session,
            {
                "type": "session.resumed",
                "session_id": session.id,
                "attachment_generation": session.attachment_generation,
                "resume_token": session.resume_token,
                "session": {"id": session.id, "state": "open", "epoch": session.epoch},
            },
            journal=False,
        )
        for seq, text in list(session.journal):
            if isinstance(last, int) and seq > last:
                self._send_text(conn, text)
        return session

    def _dispatch(self, s: _Session, msg: dict[str, Any]) -> bool:
        kind = msg.get("type")
        if kind == "input_audio_buffer.append":
            self._append(s, msg)
        elif kind in ("barge_in", "response.cancel"):
            if kind == "barge_in":
                s.barge_ins += 1
            else:
                s.cancels += 1
            s.model.force_listen()
            s.epoch += 1
            if s.response_id is not None:
                reason = "barge_in" if kind == "barge_in" else "client_cancelled"
                self._emit(
                    s,
                    {
                        "type": "response.done",
                        "response_id": s.response_id,
                        "response": {
                            "id": s.response_id,
                            "status": "cancelled",
                            "status_details": {"type": "cancelled", "reason": reason},
                        },
                    },
                )
                s.response_id = None
        elif kind == "playback.ack":
            s.acks.append(msg)
            self._emit(
                s,
                {
                    "type": "playback.acknowledged",
                    "event": {
                        "type": "playback.acknowledged",
                        "session_id": s.id,
                        "played_ms": msg.get("played_ms"),
                        "committed_ms": msg.get("committed_ms"),
                        "playback": {
                            "generated_ms": s.generated_ms,
                            "played_ms": msg.get("played_ms"),
                        },
                    },
                },
            )
        elif kind == "session.event_ack":
            upto = msg.get("server_event_seq", -1)
            s.journal = [(seq, text) for seq, text in s.journal if seq > upto]
        elif kind == "session.heartbeat":
            self._emit(s, {"type": "session.heartbeat_ack", "session_id": s.id})
        elif kind == "session.close":
            self._emit(s, {"type": "session.closed", "session_id": s.id, "reason": "client_close"})
            s.closed = True
            self.sessions.pop(s.id, None)
            s.conn.close()
            return False
        elif kind == "session.update":
            self._emit(s, {"type": "session.updated", "session": {"id": s.id}})
        else:
            self._emit(
                s,
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "code": "unknown_event",
                        "message": f"unknown event type {kind!r}",
                        "event_id": msg.get("event_id"),
                    },
                },
            )
        return True

    def _append(self, s: _Session, msg: dict[str, Any]) -> None:
        if msg.get("sample_rate_hz", 16000) != 16000:
            self._emit(
                s,
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "code": "unsupported_sample_rate",
                        "message": "pcm16 input must be 16000 Hz",
                    },
                },
            )
            return
        pcm = _wire.pcm16_to_float(base64.b64decode(msg.get("audio", "")))
        for frame in msg.get("video_frames", []) or []:
            with Image.open(io.BytesIO(base64.b64decode(frame))) as im:
                im.load()
                s.frames.append(im.size)
        s.buffer = np.concatenate([s.buffer, pcm])
        while len(s.buffer) >= UNIT_SAMPLES:
            unit, s.buffer = s.buffer[:UNIT_SAMPLES], s.buffer[UNIT_SAMPLES:]
            s.units += 1
            if self.fault == "hang":
                continue
            self._unit(s, unit)

    def _unit(self, s: _Session, audio: np.ndarray) -> None:
        decision = s.model.step(audio)
        if not decision.speak:
            self._emit(
                s,
                {
                    "type": "response.listen",
                    "session_id": s.id,
                    "epoch": s.epoch,
                    "response": {
                        "object": "realtime.response",
                        "status": "listening",
                        "metadata": {"reason": "model_listen"},
                    },
                },
            )
            return
        if s.response_id is None:
            s.response_count += 1
            s.response_id = f"resp_{s.response_count:02d}"
            s.generated_ms = 0
            self._emit(
                s,
                {
                    "type": "response.created",
                    "response_id": s.response_id,
                    "response": {
                        "id": s.response_id,
                        "object": "realtime.response",
                        "status": "in_progress",
                    },
                },
            )
            self._emit(
                s,
                {
                    "type": "response.speak",
                    "response_id": s.response_id,
                    "item_id": f"item_{s.response_id}",
                    "metadata": {"session_id": s.id, "epoch": s.epoch, "model_speak": True},
                },
            )
        assert decision.audio is not None
        duration_ms = len(decision.audio) * 1000 // 24000
        s.generated_ms += duration_ms
        delta = {
            "response_id": s.response_id,
            "item_id": f"item_{s.response_id}",
            "output_index": 0,
            "content_index": 0,
            "delta": base64.b64encode(_wire.float_to_pcm16(decision.audio)).decode(),
            "format": "pcm16",
            "sample_rate_hz": 24000,
            "metadata": {
                "session_id": s.id,
                "epoch": s.epoch,
                "model_speak": True,
                "end_of_turn": decision.end_of_turn,
                "audio_duration_ms": s.generated_ms,
            },
        }
        for name in self._names("audio"):
            self._emit(s, {"type": name, **delta})
        if self.fault == "drop_mid_turn":
            self.fault = None
            _kill(s.conn)  # the transcript below is journaled while detached and replayed on resume
            s.conn = None
            s.detached_at = time.monotonic()
        transcript = {
            "response_id": s.response_id,
            "item_id": f"item_{s.response_id}",
            "output_index": 0,
            "content_index": 0,
            "delta": decision.text,
        }
        for name in self._names("transcript"):
            self._emit(s, {"type": name, **transcript})
        if decision.end_of_turn:
            self._emit(s, {"type": "response.output_audio.done", "response_id": s.response_id})
            self._emit(
                s,
                {
                    "type": "response.done",
                    "response_id": s.response_id,
                    "response": {
                        "id": s.response_id,
                        "status": "completed",
                        "status_details": None,
                    },
                },
            )
            self._emit(s, {"type": "rate_limits.updated", "rate_limits": []})
            s.response_id = None

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

    def _emit(self, s: _Session, event: dict[str, Any], journal: bool = True) -> None:
        s.seq += 1
        event = {**event, "server_event_seq": s.seq}
        text = json.dumps(event)
        if journal:
            s.journal.append((s.seq, text))
        if self.fault == "malformed":
            self.fault = None
            text = text[: len(text) // 2]  # a truncated, unparsable frame
        if s.conn is not None:
            self._send_text(s.conn, text)

    def _send_raw(self, conn: Any, event: dict[str, Any]) -> None:
        self._send_text(conn, json.dumps(event))

    def _send_text(self, conn: Any, text: str) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            conn.send(text)
        except (ConnectionClosed, OSError):
            pass

    def _reap(self) -> None:
        """Expire sessions detached for longer than disconnect_grace_s (their slot is freed)."""
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if s.closed or (
                s.detached_at is not None and now - s.detached_at > self.disconnect_grace_s
            ):
                self.sessions.pop(sid, None)


def _kill(conn: Any) -> None:
    """Cut a websockets connection's TCP socket without a close handshake (a crashed server)."""
    if conn is None:
        return
    for action in (lambda: conn.socket.shutdown(socket.SHUT_RDWR), conn.socket.close):
        try:
            action()
        except OSError:
            pass
