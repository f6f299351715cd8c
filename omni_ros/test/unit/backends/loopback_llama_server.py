"""Test doubles of llama.cpp-omni's servers, on 127.0.0.1 in a background thread.

``LoopbackLlamaServer`` behaves as ``llama-server``'s duplex endpoints do
(``shared/notes/serving-protocols.md``; tc-mb/llama.cpp-omni ``tools/server/server.cpp``):

- ``GET /health`` -> ``{"status":"ok"}`` (503 ``loading`` while ``loading`` is set);
- ``POST /v1/stream/{omni_init,prefill,decode,break,reset,update_session_config}``, JSON bodies;
- errors are ``{"error":{"code","message","type"}}`` with HTTP status = code (400
  ``invalid_request_error``, 500 ``server_error``); every call but ``omni_init`` before ``omni_init``
  -> 400 ``omni context not initialized. call /v1/stream/omni_init first``;
- ``omni_init.voice_audio`` prefills the system prompt with that voice as index 0;
  ``prefill`` with ``cnt == 0`` while no system prompt exists turns *that audio* into the voice
  reference (the cnt-0 rule) and it never reaches the conversation;
- ``prefill`` reads the 16 kHz WAV at ``audio_path_prefix`` (and the JPEG at ``img_path_prefix``)
  from disk; a missing/unreadable file is a 500 ``stream_prefill failed``;
- ``decode`` streams SSE (chunked): text frames ``{"content","stop":false,"is_listen":false,
  "end_of_turn":false}``, a listen frame ``{"content":"","is_listen":true,"end_of_turn":true}`` or an
  end frame ``{"stop":true,"end_of_turn":true}``, then ``data: [DONE]``;
- speech is written asynchronously (like token2wav) to ``<output_dir>/tts_wav/wav_<n>.wav`` (24 kHz
  PCM16, written in two halves so readers can catch it half-written) and ``generation_done.flag``
  (holding the last index) after a turn's last WAV; ``break`` cancels pending writes.

Fault switches (``fault``): ``"drop"`` (decode sends one frame then cuts the TCP connection),
``"hang"`` (decode never answers until ``release()``/``stop()``), ``"malformed"`` (decode sends a
non-JSON frame), ``"error500"`` (prefill fails server-side).

``LoopbackLlamaWsServer`` behaves as ``llama-omni-server``'s ``WS /backend`` (full_duplex mode):
``session.init`` -> ``session.created``; each ``input.append`` -> a ``listen`` delta, or ``text`` and
``audio`` (base64 float32 24 kHz) deltas and ``response.done{reason:"turn_end"}``; ``force_listen``
prefills only and answers ``listen``. Same fault switches.

The listen/speak decisions come from :class:`DuplexModelDouble` (no weights).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from omni_ros.backends import _wire
from PIL import Image
from unit.backends.loopback_duplex_model import Decision, DuplexModelDouble

_NOT_INIT = "omni context not initialized. call /v1/stream/omni_init first"


class _HttpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LoopbackLlamaServer:
    """Test double of ``llama-server`` (llama.cpp-omni HTTP duplex endpoints)."""

    def __init__(self, port: int = 0, tts_delay_s: float = 0.02) -> None:
        self.model = DuplexModelDouble()
        self.tts_delay_s = tts_delay_s
        self.fault: str | None = None
        self.loading = False
        self.lock = threading.RLock()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.prefills: list[dict[str, Any]] = []
        self.initialized = False
        self.init_body: dict[str, Any] = {}
        self.system_prompt_source: str | None = None  # "voice_audio:<path>" | "cnt0_audio:<path>"
        self.units_without_system_prompt = 0
        self.breaks = 0
        self.resets = 0
        self.decodes = 0
        self._wav_index = 0
        self._timers: list[threading.Timer] = []
        self._release = threading.Event()
        self._port = port
        self._httpd: _TrackingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> LoopbackLlamaServer:
        """Listen on 127.0.0.1 (the same port again after a stop()), serving in a daemon thread."""
        server = self

        class Handler(_Handler):
            owner = server

        httpd = _TrackingHTTPServer(("127.0.0.1", self._port), Handler)
        self._httpd = httpd
        self._port = httpd.server_address[1]
        self._release.clear()
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and forget the omni context, as a killed server process would."""
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.cut_connections()  # keep-alive sockets would otherwise outlive the "process"
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self.lock:
            for timer in self._timers:
                timer.cancel()
            self._timers.clear()
            self.initialized = False
            self.system_prompt_source = None

    def release(self) -> None:
        """Let a hanging decode return."""
        self._release.set()

    # ------------------------------------------------------------------------------ endpoints
    def handle(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.requests.append((endpoint, body))
            if endpoint == "omni_init":
                return self._omni_init(body)
            if not self.initialized:
                raise _HttpError(400, _NOT_INIT)
            if endpoint == "prefill":
                return self._prefill(body)
            if endpoint == "break":
                self.breaks += 1
                self.model.force_listen()
                for timer in self._timers:
                    timer.cancel()
                self._timers.clear()
                return {"success": True, "message": "generation interrupted"}
            if endpoint == "reset":
                self.resets += 1
                self.model.force_listen()
                return {"success": True, "message": "KV caches cleared, ready for new session"}
            if endpoint == "update_session_config":
                self.system_prompt_source = None
                self.model.force_listen()
                voice = body.get("voice_audio")
                if isinstance(voice, str) and voice:
                    self._read_wav_or_500(voice, "stream_prefill(voice_audio) failed")
                    self.system_prompt_source = f"voice_audio:{voice}"
                return {
                    "success": True,
                    "message": "Session config updated",
                    "duplex_mode": body.get("duplex_mode"),
                }
            raise _HttpError(404, f"unknown endpoint {endpoint}")

    def _omni_init(self, body: dict[str, Any]) -> dict[str, Any]:
        media_type = body.get("media_type", body.get("msg_type"))
        if not isinstance(media_type, int) or isinstance(media_type, bool):
            raise _HttpError(
                400, '"msg_type" or "media_type" must be provided as integer (1=audio, 2=omni)'
            )
        self.init_body = dict(body)
        self.initialized = True
        self.system_prompt_source = None
        self.model.force_listen()
        self._wav_index = 0  # a fresh context starts numbering WAVs again
        output_dir = Path(str(body.get("output_dir", "./tools/omni/output")))
        (output_dir / "tts_wav").mkdir(parents=True, exist_ok=True)
        voice = body.get("voice_audio")
        if isinstance(voice, str) and voice:
            self._read_wav_or_500(voice, "stream_prefill(voice_audio) failed")
            self.system_prompt_source = f"voice_audio:{voice}"
        return {
            "success": True,
            "media_type": media_type,
            "use_tts": body.get("use_tts", True),
            "voice_audio_used": bool(voice),
        }

    def _prefill(self, body: dict[str, Any]) -> dict[str, Any]:
        path = body.get("audio_path_prefix")
        cnt = body.get("cnt")
        if not isinstance(path, str):
            raise _HttpError(400, '"audio_path_prefix" must be provided as string')
        if not isinstance(cnt, int) or isinstance(cnt, bool):
            raise _HttpError(400, '"cnt" must be provided as integer')
        if self.fault == "error500":
            raise _HttpError(500, "stream_prefill failed")
        audio, rate = self._read_wav_or_500(path, "stream_prefill failed")
        image_size = None
        img = body.get("img_path_prefix", "")
        if img:
            try:
                with Image.open(str(img)) as im:
                    im.load()
                    image_size = im.size
            except OSError:
                raise _HttpError(500, "stream_prefill failed") from None
        record = {
            "cnt": cnt,
            "samples": len(audio),
            "rate": rate,
            "image_size": image_size,
            "rms": float(np.sqrt(np.mean(np.square(audio)))) if len(audio) else 0.0,
        }
        if cnt == 0 and self.system_prompt_source is None:
            # The cnt-0 rule: this audio becomes the voice reference inside the system prompt.
            self.system_prompt_source = f"cnt0_audio:{path}"
            record["became_voice_reference"] = True
        else:
            if self.system_prompt_source is None:
                self.units_without_system_prompt += 1
            record["became_voice_reference"] = False
            self._last_audio = audio
        self.prefills.append(record)
        return {
            "success": True,
            "audio_path_prefix": path,
            "img_path_prefix": img,
            "img_posfix": "",
            "cnt": cnt,
        }

    def decide(self) -> Decision:
        with self.lock:
            self.decodes += 1
            audio = getattr(self, "_last_audio", np.zeros(0, np.float32))
            self._last_audio = np.zeros(0, np.float32)  # one decision per prefilled unit
            return self.model.step(audio)

    def schedule_speech(self, decision: Decision) -> None:
        """Write the decision's WAV (and the done flag at turn end) later, like token2wav does."""
        assert decision.audio is not None
        with self.lock:
            index = self._wav_index
            self._wav_index += 1
            wav_dir = Path(str(self.init_body.get("output_dir", "./tools/omni/output"))) / "tts_wav"
            data = _wire.wav_bytes(decision.audio, 24_000)
            end = decision.end_of_turn

            def write() -> None:
                path = wav_dir / f"wav_{index}.wav"
                with open(path, "wb") as fh:  # two halves: a reader may see it half-written
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    self._release.wait(0.002)
                    fh.write(data[len(data) // 2 :])
                if end:
                    (wav_dir / "generation_done.flag").write_text(f"{index}\n")

            timer = threading.Timer(self.tts_delay_s, write)
            timer.daemon = True
            self._timers = [t for t in self._timers if t.is_alive()] + [timer]
            timer.start()

    def _read_wav_or_500(self, path: str, message: str) -> tuple[np.ndarray, int]:
        read = _wire.read_complete_wav(path)
        if read is None:
            raise _HttpError(500, message)
        return read


class _TrackingHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that can cut its open connections, as a dying process does."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        with self._open_lock:
            self._open.add(sock)
        return sock, addr

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hang up right after `data: [DONE]` (before the last chunk): not worth a traceback.
        pass

    def cut_connections(self) -> None:
        with self._open_lock:
            socks, self._open = list(self._open), set()
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    owner: LoopbackLlamaServer
    protocol_version = "HTTP/1.1"  # cpp-httplib streams SSE with chunked transfer encoding

    def setup(self) -> None:
        super().setup()
        # Small SSE chunks + Nagle + delayed ACK would add ~40 ms per decode to every test.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            if self.owner.loading:
                self._json(503, {"status": "loading model"})
            else:
                self._json(200, {"status": "ok"})
            return
        self._error(_HttpError(404, f"no route {self.path}"))

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        prefix = "/v1/stream/"
        if not self.path.startswith(prefix):
            self._error(_HttpError(404, f"no route {self.path}"))
            return
        endpoint = self.path[len(prefix) :]
        try:
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise _HttpError(400, "body must be a JSON object")
        except json.JSONDecodeError as exc:
            self._error(_HttpError(500, f"[json.exception.parse_error] {exc}"))
            return
        try:
            if endpoint == "decode":
                with self.owner.lock:
                    if not self.owner.initialized:
                        raise _HttpError(400, _NOT_INIT)
                    self.owner.requests.append(("decode", body))
                self._decode()
                return
            self._json(200, self.owner.handle(endpoint, body))
        except _HttpError as err:
            self._error(err)

    # -------------------------------------------------------------------------------- decode
    def _decode(self) -> None:
        owner = self.owner
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if owner.fault == "hang":
            owner._release.wait(30)
            self._abort()
            return
        decision = owner.decide()
        if owner.fault == "malformed":
            self._chunk(b"data: {this is not json\n\n")
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
            return
        if decision.speak:
            words = decision.text.split(".")
            self._event(
                {"content": words[0] + ".", "stop": False, "is_listen": False, "end_of_turn": False}
            )
            if owner.fault == "drop":
                self._abort()
                return
            self._event(
                {
                    "content": ".".join(words[1:]),
                    "stop": False,
                    "is_listen": False,
                    "end_of_turn": False,
                }
            )
            owner.schedule_speech(decision)
            self._event({"content": "", "stop": True, "is_listen": False, "end_of_turn": True})
        else:
            if owner.fault == "drop":
                self._abort()
                return
            self._event({"content": "", "stop": False, "is_listen": True, "end_of_turn": True})
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _event(self, payload: dict[str, Any]) -> None:
        self._chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _abort(self) -> None:
        """Cut the TCP connection mid-response (no terminating chunk)."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --------------------------------------------------------------------------------- helpers
    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: _HttpError) -> None:
        kind = "invalid_request_error" if err.code < 500 else "server_error"
        self._json(err.code, {"error": {"code": err.code, "message": err.message, "type": kind}})


# ---------------------------------------------------------------------------------- WS /backend


class LoopbackLlamaWsServer:
    """Test double of ``llama-omni-server``'s ``WS /backend`` (full_duplex sessions)."""

    def __init__(self, port: int = 0) -> None:
        self.model = DuplexModelDouble()
        self.fault: str | None = None
        self.lock = threading.RLock()
        self.sessions: list[dict[str, Any]] = []
        self.appends: list[dict[str, Any]] = []
        self._port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._conns: list[Any] = []
        self._release = threading.Event()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> LoopbackLlamaWsServer:
        from websockets.sync.server import serve

        self._release.clear()
        self._server = serve(self._handler, "127.0.0.1", self._port, max_size=64 * 1024 * 1024)
        self._port = self._server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        with self.lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            _kill(conn)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def release(self) -> None:
        self._release.set()

    def _handler(self, conn: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        if conn.request.path != "/backend":
            conn.close(code=1008, reason="unknown route")
            return
        with self.lock:
            self._conns.append(conn)
        try:
            first = json.loads(conn.recv(timeout=10))
            payload = first.get("payload") if isinstance(first, dict) else None
            if (
                not isinstance(first, dict)
                or first.get("type") != "session.init"
                or not isinstance(payload, dict)
            ):
                conn.send(
                    json.dumps(
                        {
                            "type": "error",
                            "error": {
                                "code": "invalid_request",
                                "message": "expected type=session.init",
                            },
                        }
                    )
                )
                return
            mode = payload.get("mode", "full_duplex")
            if mode not in ("full_duplex", "turn_based"):
                conn.send(
                    json.dumps(
                        {
                            "type": "error",
                            "error": {
                                "code": "invalid_request",
                                "message": f"invalid mode: {mode}",
                            },
                        }
                    )
                )
                return
            sid = uuid.uuid4().hex[:12]
            with self.lock:
                self.sessions.append({"session_id": sid, **payload})
                self.model.force_listen()
            conn.send(
                json.dumps(
                    {
                        "type": "session.created",
                        "session_id": sid,
                        "mode": mode,
                        "server_send_ts": 0.0,
                    }
                )
            )
            rid_counter = 0
            for raw in conn:
                msg = json.loads(raw)
                if msg.get("type") != "input.append" or not isinstance(msg.get("input"), dict):
                    conn.send(
                        json.dumps(
                            {
                                "type": "error",
                                "error": {
                                    "code": "invalid_request",
                                    "message": "expected type=input.append",
                                },
                            }
                        )
                    )
                    continue
                inp = msg["input"]
                audio = np.frombuffer(base64.b64decode(inp.get("audio_base64", "")), dtype="<f4")
                frames = [
                    Image.open(io.BytesIO(base64.b64decode(f))).size
                    for f in inp.get("video_frames", [])
                ]
                with self.lock:
                    self.appends.append(
                        {
                            "samples": len(audio),
                            "frames": frames,
                            "force_listen": bool(inp.get("force_listen")),
                        }
                    )
                rid_counter += 1
                rid = f"{sid}_resp_{rid_counter}"
                if self.fault == "hang":
                    self._release.wait(30)
                    return
                if self.fault == "malformed":
                    conn.send("{this is not json")
                    continue
                if inp.get("force_listen"):
                    with self.lock:
                        self.model.force_listen()
                    conn.send(
                        json.dumps(
                            {
                                "type": "response.output.delta",
                                "kind": "listen",
                                "session_id": sid,
                                "response_id": rid,
                            }
                        )
                    )
                    continue
                with self.lock:
                    decision = self.model.step(audio.astype(np.float32))
                if not decision.speak:
                    conn.send(
                        json.dumps(
                            {
                                "type": "response.output.delta",
                                "kind": "listen",
                                "session_id": sid,
                                "response_id": rid,
                                "metrics": {"apm_ms": 3.0, "llm_prefill_ms": 5.0},
                            }
                        )
                    )
                    continue
                conn.send(
                    json.dumps(
                        {
                            "type": "response.output.delta",
                            "kind": "text",
                            "session_id": sid,
                            "response_id": rid,
                            "text": decision.text,
                        }
                    )
                )
                if self.fault == "drop":
                    _kill(conn)
                    return
                assert decision.audio is not None
                conn.send(
                    json.dumps(
                        {
                            "type": "response.output.delta",
                            "kind": "audio",
                            "session_id": sid,
                            "response_id": rid,
                            "audio": base64.b64encode(
                                decision.audio.astype("<f4").tobytes()
                            ).decode(),
                        }
                    )
                )
                conn.send(
                    json.dumps(
                        {
                            "type": "response.done",
                            "session_id": sid,
                            "response_id": rid,
                            "text": decision.text,
                            "reason": "turn_end",
                            "audio": None,
                            "metrics": {"generate_ms": 7.0},
                        }
                    )
                )
        except (ConnectionClosed, OSError, TimeoutError, json.JSONDecodeError):
            return
        finally:
            with self.lock:
                if conn in self._conns:
                    self._conns.remove(conn)


def _kill(conn: Any) -> None:
    """Cut a websockets connection's TCP socket without a close handshake (a crashed server)."""
    try:
        conn.socket.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        conn.socket.close()
    except OSError:
        pass
