"""Test doubles of llama.cpp-omni's two server generations, on 127.0.0.1 in background threads.

``LoopbackLlamaServer(generation=...)`` behaves as the server it names; every behaviour cites the
upstream file and function (github.com/tc-mb/llama.cpp-omni; the newer generation as read at
hNSBQZ/llama.cpp-omni f5771f8, "Feat/omni ws rebase #63"). The listen/speak decisions come from
:class:`DuplexModelDouble` (no weights); ``unit_script`` can force per-unit outcomes the model
double has no word for: ``"idle"`` (the decode produces nothing) and ``"end"`` (the unit only ends
the turn: a turn_eos with no text).

``generation="llama-server"`` (tools/server/server.cpp):

- ``GET /health`` -> ``{"status":"ok"}``; while ``loading`` a 503 ``{"error":{"code":503,
  "message":"Loading model","type":"unavailable_error"}}`` (the loading middleware);
  ``GET /v1/models`` -> 200 (handle_models);
- ``POST /v1/stream/{omni_init,prefill,decode,break,reset,update_session_config}``; errors
  ``{"error":{"code","message","type"}}`` with HTTP status = code (format_error_response/res_error);
- ``omni_init``: ``media_type`` required (400); ``model_dir`` defaults to the relative
  ``./tools/omni/convert/gguf/`` and missing GGUFs are a 500 ``omni_init missing required model
  file (apm): <path>``; ``tts_bin_dir`` defaults to ``model_dir + "token2wav-gguf"``;
  ``voice_audio`` is prefilled as index 0 (handle_stream_omni_init_impl);
- ``update_session_config`` clears the KV cache and the system prompt, takes the sliding-window
  settings and re-prefills ``voice_audio`` if given (handle_stream_update_session_config_impl);
- ``break`` stops generation; token2wav drops its queue and restarts numbering at 0, but the window
  it is rendering is still written afterwards (omni.cpp t2w_thread_func).

``generation="llama-omni-server"`` (tools/server/server-omni.cpp, ws_handler.cpp, protocol.cpp,
session.cpp):

- ``GET /health`` -> ``{"status":"ok","engine":"comni"}``; no ``/v1/models``, ``/break``, ``/reset``
  (404, cpp-httplib's empty body);
- every HTTP error is a bare 500 ``{"error":{"message","type"}}`` (res_error defaults the status);
- ``omni_init`` ignores ``model_dir`` and ``voice_audio`` (paths come from ``-m``:
  ensure_omni_model_paths_from_llm), takes ``assistant_prompt``; ``update_session_config`` only
  sets ``media_type``; ``decode`` takes ``length_penalty``; ``prefill`` takes ``text`` but the duplex
  path ignores it (omni.cpp duplex_prefill);
- ``WS /backend``: ``session.init`` (protocol.cpp parse_session_init; a bad one, or one while a
  session is active or still being torn down, is answered by closing the socket:
  handle_ws_backend + SessionManager::allocate) -> ``session.created``; per ``input.append`` a
  ``listen`` delta, or ``text`` deltas and ``response.done`` -- only if the unit produced text or
  audio; a unit that only ends the turn or idles gets no event; audio deltas are sent by token2wav
  whenever a window is ready, labelled with the response id current at that moment (the
  audio_output_cb), usually after ``response.done``; protocol errors end the session with
  ``session.closed{reason}`` (fail_fast); the client's disconnect tears the session down
  asynchronously (``teardown_s``); ``POST /sessions/{id}/close`` returns only after the teardown.

Both: a first prefill with ``cnt == 0`` and no system prompt makes that audio the voice (an empty
path: the server's default voice); a first prefill with ``cnt > 0`` before it leaves the next decode
hanging (omni.cpp stream_prefill: the LLM thread is started by the index-0 prefill). Speech is
rendered asynchronously (``tts_delay_s``) and the last ``lookahead`` samples of a turn only when the
turn ends -- listen after speak, or turn_eos -- (omni.cpp t2w_thread_func: ``need_flush =
is_final``), as ``wav_<n>.wav`` (PCM16 24 kHz, header first: a reader may see it half-written) +
``generation_done.flag`` holding the last index.

Fault switches (``fault``): ``"drop"`` (decode sends one frame then cuts the TCP connection),
``"hang"`` (decode never answers until ``release()``/``stop()``), ``"malformed"`` (decode sends a
non-JSON frame), ``"error500"`` (prefill fails server-side).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from omni_ros.backends import _wire
from PIL import Image
from unit.backends.loopback_duplex_model import Decision, DuplexModelDouble

LLAMA_SERVER = "llama-server"
LLAMA_OMNI_SERVER = "llama-omni-server"
_NOT_INIT = "omni context not initialized. call /v1/stream/omni_init first"
# omni.cpp omni_set_language (duplex): the system block around the reference voice.
SYSTEM_PREFIX = "<|im_start|>system\nStreaming Duplex Conversation! You are a helpful assistant.\n<|audio_start|>"
DEFAULT_SUFFIX = "<|audio_end|><|im_end|>\n"
_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MODEL_FILES = {
    "apm": "audio/MiniCPM-o-4_5-audio-F16.gguf",
    "tts": "tts/MiniCPM-o-4_5-tts-F16.gguf",
    "vision": "vision/MiniCPM-o-4_5-vision-F16.gguf",
}


class _HttpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def system_block(suffix: str | None, voice: str) -> str:
    """The system prompt the server evaluates (omni.cpp stream_prefill, index 0, duplex).

    A suffix that does not start with ``<|`` gets ``<|im_start|>user\\n`` put in front.
    """
    text = suffix or DEFAULT_SUFFIX
    if not text.startswith("<|"):
        text = "<|im_start|>user\n" + text
    return f"{SYSTEM_PREFIX}[{voice}]{text}"


# --------------------------------------------------------------------------------------- token2wav


@dataclass
class _Window:
    due: float
    samples: np.ndarray
    final: bool
    cancelled: bool = False


class _Token2Wav:
    """Asynchronous speech windows, in order, with the turn's tail held until the turn ends."""

    def __init__(
        self, emit: Callable[[np.ndarray, int, bool], None], delay_s: float, lookahead: int
    ):
        self._emit = emit
        self.delay_s = delay_s
        self.lookahead = lookahead
        self.lock = threading.Lock()
        self._queue: queue.Queue[_Window | None] = queue.Queue()
        self._pending: list[_Window] = []
        self._current: _Window | None = None
        self._held = np.zeros(0, np.float32)
        self.wav_idx = 0
        self._reset_after_current = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def speak(self, samples: np.ndarray, final: bool) -> None:
        """One speaking chunk; release all but the lookahead (all of it when ``final``)."""
        with self.lock:
            self._held = np.concatenate([self._held, samples.astype(np.float32)])
            if final:
                out, self._held = self._held, np.zeros(0, np.float32)
            else:
                cut = max(len(self._held) - self.lookahead, 0)
                out, self._held = self._held[:cut], self._held[cut:]
            if len(out):
                self._push(out, final)

    def end_turn(self) -> None:
        """is_final without new text: flush the held tail as the final window (if any)."""
        with self.lock:
            out, self._held = self._held, np.zeros(0, np.float32)
            if len(out):
                self._push(out, True)

    def break_(self) -> None:
        """``/break``: drop queued windows and the tail; the one being rendered still comes out."""
        with self.lock:
            for window in self._pending:
                if window is not self._current:
                    window.cancelled = True
            self._pending = [w for w in self._pending if not w.cancelled]
            self._held = np.zeros(0, np.float32)
            if self._current is not None:
                self._reset_after_current = True
            else:
                self.wav_idx = 0

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            for window in self._pending:
                window.cancelled = True
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _push(self, samples: np.ndarray, final: bool) -> None:
        window = _Window(time.monotonic() + self.delay_s, samples, final)
        self._pending.append(window)
        self._queue.put(window)

    def _run(self) -> None:
        while not self._stop.is_set():
            window = self._queue.get()
            if window is None:
                return
            with self.lock:
                if window.cancelled:
                    continue
                self._current = window  # "rendering" from now until it is due
            self._stop.wait(max(window.due - time.monotonic(), 0.0))
            with self.lock:
                self._current = None
                if window in self._pending:
                    self._pending.remove(window)
                if self._stop.is_set():
                    return
                index = self.wav_idx
                self.wav_idx += 1
                if self._reset_after_current:
                    self.wav_idx = 0
                    self._reset_after_current = False
            self._emit(window.samples, index, window.final)


# --------------------------------------------------------------------------------------- WebSocket


class _WsConn:
    """Server side of one RFC 6455 connection over a handler's socket (text frames, ping, close)."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self._rfile = handler.rfile
        self._wfile = handler.wfile
        self._sock: socket.socket = handler.connection
        self._lock = threading.Lock()
        self.open = True

    def send(self, payload: dict[str, Any] | str) -> bool:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        return self._frame(0x1, data.encode())

    def recv(self, timeout: float | None = None) -> str | None:
        """The next text message, or None once the peer closed or vanished."""
        parts: list[bytes] = []
        self._sock.settimeout(timeout)
        try:
            while True:
                head = self._read(2)
                fin, opcode = head[0] & 0x80, head[0] & 0x0F
                length = head[1] & 0x7F
                if length == 126:
                    length = int.from_bytes(self._read(2), "big")
                elif length == 127:
                    length = int.from_bytes(self._read(8), "big")
                mask = self._read(4) if head[1] & 0x80 else b"\0\0\0\0"
                raw = np.frombuffer(self._read(length), dtype=np.uint8)
                data = (raw ^ np.resize(np.frombuffer(mask, dtype=np.uint8), raw.size)).tobytes()
                if opcode == 0x8:
                    self._frame(0x8, data[:2])
                    self.open = False
                    return None
                if opcode == 0x9:
                    self._frame(0xA, data)
                    continue
                if opcode == 0xA:
                    continue
                parts.append(data)
                if fin:
                    return b"".join(parts).decode()
        except (OSError, EOFError, ConnectionError):
            self.open = False
            return None
        finally:
            with contextlib.suppress(OSError):
                self._sock.settimeout(None)

    def close(self) -> None:
        """Close the socket without a word (what the server does to a refused session.init)."""
        if self.open:
            self._frame(0x8, (1000).to_bytes(2, "big"))
        self.open = False
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def kill(self) -> None:
        """Cut the TCP connection (a crashed server)."""
        self.open = False
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _read(self, n: int) -> bytes:
        data = self._rfile.read(n)
        if len(data) < n:
            raise EOFError
        return data

    def _frame(self, opcode: int, payload: bytes) -> bool:
        n = len(payload)
        if n < 126:
            header = bytes([0x80 | opcode, n])
        elif n < 65536:
            header = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
        else:
            header = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
        with self._lock:
            try:
                self._wfile.write(header + payload)
                self._wfile.flush()
                return True
            except OSError:
                self.open = False
                return False


# ------------------------------------------------------------------------------------------ server


class LoopbackLlamaServer:
    """Test double of ``llama-server`` or ``llama-omni-server`` (see the module docstring)."""

    def __init__(
        self,
        port: int = 0,
        tts_delay_s: float = 0.02,
        *,
        generation: str = LLAMA_SERVER,
        lookahead: int = 4800,
        teardown_s: float = 0.2,
        model_dir: str | None = None,
    ) -> None:
        if generation not in (LLAMA_SERVER, LLAMA_OMNI_SERVER):
            raise ValueError(f"unknown generation {generation!r}")
        self.generation = generation
        self.model = DuplexModelDouble()
        self.unit_script: list[str] = []
        self.tts_delay_s = tts_delay_s
        self.lookahead = lookahead
        self.teardown_s = teardown_s
        #: llama-omni-server: where its -m lives (None: "the models are there").
        self.model_dir = model_dir
        self.fault: str | None = None
        self.loading = False
        self.lock = threading.RLock()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.prefills: list[dict[str, Any]] = []
        self.initialized = False
        self.init_body: dict[str, Any] = {}
        self.init_count = 0
        self.init_failed = False
        self.crashed = False
        self.system_prompt_source: str | None = None  # "voice_audio:<path>" | "cnt0_audio:<path>"
        self.system_block: str | None = None
        self.assistant_prompt: str | None = None
        self.session_config: dict[str, Any] = {}
        self.units_without_system_prompt = 0
        self.breaks = 0
        self.resets = 0
        self.decodes = 0
        self.texts_received: list[str] = []
        self.decode_bodies: list[dict[str, Any]] = []
        self._wav_dir: Path | None = None
        self._turn_open = False
        self._hung = False
        self._awaiting_decode = False
        self._last_audio = np.zeros(0, np.float32)
        self.tts = _Token2Wav(self._write_wav, tts_delay_s, lookahead)
        # WS /backend (llama-omni-server)
        self.sessions: list[dict[str, Any]] = []
        self.appends: list[dict[str, Any]] = []
        self.refused_inits = 0
        self.session_closes: list[str] = []
        self.closed_reasons: list[str] = []
        self._active: dict[str, Any] | None = None
        self._ws_tts: _Token2Wav | None = None
        self._conns: list[_WsConn] = []
        self._kv = 0
        self._rid = ""
        self._emitted_audio = False
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
        """Stop serving and forget everything, as a killed server process would."""
        self._release.set()
        with self.lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.kill()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd.cut_connections()  # keep-alive sockets would otherwise outlive the "process"
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.tts.stop()
        self.tts = _Token2Wav(self._write_wav, self.tts_delay_s, self.lookahead)
        with self.lock:
            if self._ws_tts is not None:
                self._ws_tts.stop()
                self._ws_tts = None
            self._active = None
            self.initialized = False
            self.system_prompt_source = None

    def release(self) -> None:
        """Let a hanging decode return."""
        self._release.set()

    # -------------------------------------------------------------------------------- decisions
    def decide(self, audio: np.ndarray, tts: _Token2Wav) -> str | Decision:
        """This unit's outcome: a Decision, or "idle" / "end" from ``unit_script``."""
        with self.lock:
            self.decodes += 1
            if self.unit_script:
                step = self.unit_script.pop(0)
                if step in ("idle", "end"):
                    if step == "end" and self._turn_open:
                        self._turn_open = False
                        self.model.force_listen()
                        tts.end_turn()  # turn_eos: is_final, the held tail is the final window
                    return step
                if step != "model":
                    raise ValueError(f"unknown unit_script step {step!r}")
            decision = self.model.step(audio)
            if decision.speak:
                assert decision.audio is not None
                tts.speak(decision.audio, final=decision.end_of_turn)
                self._turn_open = not decision.end_of_turn
            elif self._turn_open:
                self._turn_open = False
                tts.end_turn()  # LISTEN after SPEAK flushes the TTS buffer (omni.cpp duplex_decode)
            return decision

    # ----------------------------------------------------------------------------- HTTP routes
    def handle(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.requests.append((endpoint, body))
            omni = self.generation == LLAMA_OMNI_SERVER
            if endpoint in ("break", "reset") and omni:
                raise _HttpError(404, "")
            if endpoint == "omni_init":
                return self._omni_init(body)
            if not self.initialized:
                raise _HttpError(
                    400,
                    _NOT_INIT
                    if endpoint != "update_session_config" or not omni
                    else "omni context not initialized",
                )
            if endpoint == "prefill":
                return self._prefill(body)
            if endpoint == "break":
                self.breaks += 1
                self.model.force_listen()
                self._turn_open = False
                self.tts.break_()
                return {"success": True, "message": "generation interrupted"}
            if endpoint == "reset":
                self.resets += 1
                self.model.force_listen()
                self._turn_open = False
                return {"success": True, "message": "KV caches cleared, ready for new session"}
            if endpoint == "update_session_config":
                return self._update_session_config(body)
            raise _HttpError(404, "")

    def _omni_init(self, body: dict[str, Any]) -> dict[str, Any]:
        media_type = body.get("msg_type", body.get("media_type"))
        if not isinstance(media_type, int) or isinstance(media_type, bool):
            raise _HttpError(
                400, '"msg_type" or "media_type" must be provided as integer (1=audio, 2=omni)'
            )
        use_tts = body.get("use_tts", True)
        if self.generation == LLAMA_SERVER and self.init_failed:
            # Seen on a real llama-server (0788f99): omni_init after a failed one segfaults it.
            self.crashed = True
            threading.Thread(target=self.stop, daemon=True).start()
            raise _HttpError(500, "omni_init failed")
        if self.generation == LLAMA_SERVER:
            model_dir = str(body.get("model_dir", "./tools/omni/convert/gguf/"))
            body = {**body, "tts_bin_dir": body.get("tts_bin_dir", model_dir + "token2wav-gguf")}
            root: str | None = model_dir.rstrip("/")
            checks = (("apm", "apm"), ("tts", "tts"), ("vision", "vision"))
        else:
            # model_dir and voice_audio are ignored: paths come from the server's own -m, checked
            # in this order with these names (server-omni.cpp omni_init check_file).
            root = self.model_dir
            checks = (("vision", "vision"), ("audio", "apm"), ("tts", "tts"))
        for role, key in checks if root is not None else ():
            if key == "tts" and not use_tts:
                continue
            path = f"{root}/{_MODEL_FILES[key]}"
            if not Path(path).is_file():
                self.init_failed = self.generation == LLAMA_SERVER
                raise _HttpError(500, f"omni_init missing required model file ({role}): {path}")
        self.init_body = dict(body)
        self.init_count += 1
        self.initialized = True
        self.system_prompt_source = None
        self.system_block = None
        self._hung = False
        self.model.force_listen()
        self._turn_open = False
        # A fresh omni context has fresh token2wav threads: numbering starts at 0.
        self.tts.stop()
        self.tts = _Token2Wav(self._write_wav, self.tts_delay_s, self.lookahead)
        output_dir = Path(str(body.get("output_dir", "./tools/omni/output")))
        self._wav_dir = output_dir / "tts_wav"
        self._wav_dir.mkdir(parents=True, exist_ok=True)
        if self.generation == LLAMA_OMNI_SERVER:
            prompt = body.get("assistant_prompt")
            self.assistant_prompt = prompt if isinstance(prompt, str) else None
            return {"success": True}
        voice = body.get("voice_audio")
        if isinstance(voice, str) and voice:
            self._read_wav_or_500(voice, "stream_prefill(voice_audio) failed")
            self._open_system_prompt(f"voice_audio:{voice}", voice)
        return {
            "success": True,
            "media_type": media_type,
            "use_tts": use_tts,
            "voice_audio_used": bool(voice),
        }

    def _update_session_config(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.generation == LLAMA_OMNI_SERVER:
            return {"success": True}  # only media_type (server-omni.cpp)
        for key in ("sliding_window_mode", "sliding_window_high_water", "sliding_window_low_water"):
            if key in body:
                self.session_config[key] = body[key]
        # KV cache and system prompt cleared; re-prefilled only with a voice_audio.
        self.system_prompt_source = None
        self.system_block = None
        self.model.force_listen()
        self._turn_open = False
        voice = body.get("voice_audio")
        if isinstance(voice, str) and voice:
            self._read_wav_or_500(voice, "stream_prefill(voice_audio) failed")
            self._open_system_prompt(f"voice_audio:{voice}", voice)
        return {
            "success": True,
            "message": "Session config updated",
            "duplex_mode": body.get("duplex_mode"),
            "sliding_window": {
                "mode": self.session_config.get("sliding_window_mode", "off"),
                "high_water_tokens": self.session_config.get("sliding_window_high_water", 4000),
                "low_water_tokens": self.session_config.get("sliding_window_low_water", 3500),
            },
        }

    def _open_system_prompt(self, source: str, voice: str) -> None:
        self.system_prompt_source = source
        self.system_block = system_block(self.assistant_prompt, voice or "default_ref_audio")

    def _prefill(self, body: dict[str, Any]) -> dict[str, Any]:
        path = body.get("audio_path_prefix")
        cnt = body.get("cnt")
        if not isinstance(path, str):
            raise _HttpError(400, '"audio_path_prefix" must be provided as string')
        if not isinstance(cnt, int) or isinstance(cnt, bool):
            raise _HttpError(400, '"cnt" must be provided as integer')
        if self.fault == "error500":
            raise _HttpError(500, "stream_prefill failed")
        if isinstance(body.get("text"), str) and body["text"]:
            self.texts_received.append(body["text"])  # accepted, unused by duplex_prefill
        if cnt == 0 and self.system_prompt_source is None:
            # Index 0 builds the system prompt: this audio is the voice ("" = default voice).
            if path:
                self._read_wav_or_500(path, "stream_prefill failed")
            self._open_system_prompt(f"cnt0_audio:{path}" if path else "default_voice", path)
            self.prefills.append({"cnt": cnt, "became_voice_reference": bool(path)})
            return {"success": True, "audio_path_prefix": path, "cnt": cnt}
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
        if self._awaiting_decode:
            # The client skipped the last unit's decode (a forced listen): the model did not speak
            # there, so its turn is over; token2wav still holds the turn's tail.
            self.model.force_listen()
        self._awaiting_decode = True
        if self.system_prompt_source is None:
            # The LLM thread never started: this unit's decode will never return.
            self.units_without_system_prompt += 1
            self._hung = True
        self.prefills.append(
            {
                "cnt": cnt,
                "samples": len(audio),
                "rate": rate,
                "image_size": image_size,
                "became_voice_reference": False,
            }
        )
        self._last_audio = audio
        return {"success": True, "audio_path_prefix": path, "cnt": cnt}

    def _read_wav_or_500(self, path: str, message: str) -> tuple[np.ndarray, int]:
        read = _wire.read_complete_wav(path)
        if read is None:
            raise _HttpError(500, message)
        return read

    def _write_wav(self, samples: np.ndarray, index: int, final: bool) -> None:
        """token2wav output: header first, then PCM16 (non-atomic, as fopen/fwrite is)."""
        wav_dir = self._wav_dir
        if wav_dir is None or not wav_dir.is_dir():
            return
        data = _wire.wav_bytes(samples, 24_000)
        with open(wav_dir / f"wav_{index}.wav", "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            time.sleep(0.002)
            fh.write(data[len(data) // 2 :])
        if final:
            (wav_dir / "generation_done.flag").write_text(f"{index}\n")

    # ----------------------------------------------------------------------------- WS /backend
    def ws_session(self, conn: _WsConn) -> None:
        """handle_ws_backend: one full_duplex session on this socket."""
        with self.lock:
            self._conns.append(conn)
        try:
            self._ws_session(conn)
        finally:
            with self.lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def _ws_session(self, conn: _WsConn) -> None:
        raw = conn.recv(timeout=10)
        if raw is None:
            return
        try:
            first = json.loads(raw)
        except json.JSONDecodeError:
            conn.close()
            return
        payload = first.get("payload") if isinstance(first, dict) else None
        mode = payload.get("mode", "full_duplex") if isinstance(payload, dict) else None
        if (
            not isinstance(first, dict)
            or first.get("type") != "session.init"
            or not isinstance(payload, dict)
            or mode not in ("full_duplex", "turn_based")
        ):
            conn.close()  # parse_session_init failed: "just close"
            return
        with self.lock:
            if self._active is not None:
                self.refused_inits += 1
                conn.close()  # SessionManager::allocate: an active session exists
                return
            sid = uuid.uuid4().hex
            self._active = {"session_id": sid, "conn": conn, "state": "active"}
        if self.model_dir is not None and not all(
            Path(self.model_dir, rel).is_file() for rel in _MODEL_FILES.values()
        ):
            self._fail_fast(conn, sid, "omni_init_failed")  # create_session_octx: omni_init failed
            return
        voice = payload.get("voice", {})
        ref = voice.get("ref_audio", "") if isinstance(voice, dict) else ""
        if ref:
            try:
                pcm = base64.b64decode(ref)
            except ValueError:
                pcm = b""
            if not pcm:
                self._fail_fast(conn, sid, "voice_audio_decode_failed")
                return
        suffix = payload.get("system_prompt")
        config = payload.get("config") if isinstance(payload.get("config"), dict) else {}
        with self.lock:
            self.sessions.append({"session_id": sid, **payload})
            self.session_config = dict(config)
            self.system_block = system_block(
                suffix if isinstance(suffix, str) and suffix else None,
                "ref_audio" if ref else "default_ref_audio",
            )
            self.model.force_listen()
            self._turn_open = False
            self._ws_tts = _Token2Wav(
                lambda s, _i, _f: self._ws_audio(conn, sid, s), self.tts_delay_s, self.lookahead
            )
        self._kv = 120
        conn.send(
            {
                "type": "session.created",
                "session_id": sid,
                "mode": mode,
                "server_send_ts": time.time(),
                "metrics": {"backend": "llama.cpp-omni", "kv_cache_length": self._kv},
            }
        )
        self._rid = ""
        self._emitted_audio = False
        seq = 0
        while True:
            raw = conn.recv()
            if raw is None:
                break
            try:
                msg = json.loads(raw)
            except json.JSONDecodeError:
                self._fail_fast(conn, sid, "invalid_json")
                return
            if not isinstance(msg, dict) or msg.get("type") != "input.append":
                self._fail_fast(conn, sid, "unexpected_message_type")
                return
            inp = msg.get("input")
            if not isinstance(inp, dict) or not inp.get("audio_base64"):
                self._fail_fast(
                    conn, sid, "missing_audio" if isinstance(inp, dict) else "invalid_input"
                )
                return
            seq += 1
            rid = f"{sid}_resp_{seq}"
            with self.lock:
                self._rid = rid  # the audio callback labels windows with the current id
                self._emitted_audio = False
            if not self._ws_unit(conn, sid, rid, inp):
                break
        self._teardown_async(sid)

    def _ws_unit(self, conn: _WsConn, sid: str, rid: str, inp: dict[str, Any]) -> bool:
        audio = np.frombuffer(base64.b64decode(inp["audio_base64"]), dtype="<f4").astype(np.float32)
        frames = [
            Image.open(io.BytesIO(base64.b64decode(f))).size for f in inp.get("video_frames", [])
        ]
        with self.lock:
            self.appends.append(
                {
                    "samples": len(audio),
                    "frames": frames,
                    "force_listen": bool(inp.get("force_listen")),
                }
            )
        self._kv += 50 + 64 * len(frames)
        metrics = {"backend": "llama.cpp-omni", "kv_cache_length": self._kv, "prefill_ms": 5.0}
        if self.fault == "hang":
            self._release.wait(30)
            return False
        if self.fault == "malformed":
            conn.send("{this is not json")
            return True
        if inp.get("force_listen"):
            # Prefill only, then a listen delta; token2wav is not told (no break over WS), so the
            # held tail of the turn still comes out at the next decode that listens.
            with self.lock:
                self.model.force_listen()
            conn.send(self._delta(sid, rid, "listen", metrics=metrics))
            return True
        assert self._ws_tts is not None
        outcome = self.decide(audio, self._ws_tts)
        metrics = {**metrics, "generate_ms": 7.0, "wall_clock_ms": 12.0, "cost_llm_ms": 7.0}
        if isinstance(outcome, Decision) and not outcome.speak:
            conn.send(self._delta(sid, rid, "listen", metrics=metrics))
            return True
        text = outcome.text if isinstance(outcome, Decision) else ""
        if text:
            conn.send(self._delta(sid, rid, "text", text=text, metrics=metrics))
            if self.fault == "drop":
                conn.kill()
                return False
        with self.lock:
            emitted = self._emitted_audio
        if text or emitted:
            conn.send(
                {
                    "type": "response.done",
                    "session_id": sid,
                    "response_id": rid,
                    "text": text,
                    "reason": "turn_end",
                    "server_send_ts": time.time(),
                    "audio": None,
                    "metrics": metrics,
                }
            )
        return True

    def _ws_audio(self, conn: _WsConn, sid: str, samples: np.ndarray) -> None:
        with self.lock:
            rid = self._rid
            self._emitted_audio = True
        pcm = base64.b64encode(samples.astype("<f4").tobytes()).decode()
        conn.send(self._delta(sid, rid, "audio", audio=pcm))

    @staticmethod
    def _delta(sid: str, rid: str, kind: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": "response.output.delta",
            "kind": kind,
            "session_id": sid,
            "response_id": rid,
            "server_send_ts": time.time(),
            **fields,
        }

    def _fail_fast(self, conn: _WsConn, sid: str, reason: str) -> None:
        """handle_ws_backend fail_fast: session.closed, SessionManager::close, then the socket."""
        self.closed_reasons.append(reason)
        conn.send({"type": "session.closed", "session_id": sid, "reason": reason})
        with self.lock:
            if self._active is not None and self._active["session_id"] == sid:
                self._active = None
                if self._ws_tts is not None:
                    tts, self._ws_tts = self._ws_tts, None
                    threading.Thread(target=tts.stop, daemon=True).start()
        conn.close()

    def _teardown(self, sid: str) -> None:
        """omni_prepare_for_reuse + SessionManager::close: takes ``teardown_s``."""
        time.sleep(self.teardown_s)
        with self.lock:
            if self._active is not None and self._active["session_id"] == sid:
                self._active = None
                if self._ws_tts is not None:
                    tts, self._ws_tts = self._ws_tts, None
                    threading.Thread(target=tts.stop, daemon=True).start()

    def _teardown_async(self, sid: str) -> None:
        with self.lock:
            if self._active is None or self._active["session_id"] != sid:
                return
            self._active["state"] = "closing"
        threading.Thread(target=self._teardown, args=(sid,), daemon=True).start()

    def close_session(self, sid: str) -> dict[str, Any]:
        """POST /sessions/{id}/close: a completion primitive (returns after the teardown)."""
        with self.lock:
            active = self._active
            if active is None or active["session_id"] != sid or active["state"] != "active":
                raise _HttpError(404, "session not found")
            active["state"] = "closing"
            conn: _WsConn = active["conn"]
            self.session_closes.append(sid)
        conn.send({"type": "session.closed", "session_id": sid, "reason": "client_closed"})
        conn.close()
        self._teardown(sid)
        return {"ok": True, "session_id": sid, "closed": True}

    @property
    def session_active(self) -> bool:
        with self.lock:
            return self._active is not None


def LoopbackLlamaWsServer(port: int = 0, **kwargs: Any) -> LoopbackLlamaServer:
    """The llama-omni-server double (HTTP and WS /backend on one port)."""
    return LoopbackLlamaServer(port, generation=LLAMA_OMNI_SERVER, **kwargs)


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
        owner = self.owner
        omni = owner.generation == LLAMA_OMNI_SERVER
        if self.path in ("/health", "/v1/health"):
            if omni:
                self._json(200, {"status": "ok", "engine": "comni"}, {"X-Engine": "comni"})
            elif owner.loading:
                self._error(_HttpError(503, "Loading model"))
            else:
                self._json(200, {"status": "ok"})
            return
        if self.path in ("/v1/models", "/models") and not omni:
            self._json(
                200, {"object": "list", "data": [{"id": "MiniCPM-o-4_5", "object": "model"}]}
            )
            return
        if (
            self.path == "/backend"
            and omni
            and "websocket" in self.headers.get("Upgrade", "").lower()
        ):
            key = self.headers.get("Sec-WebSocket-Key", "")
            accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
            self.send_response(101, "Switching Protocols")
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.wfile.flush()
            self.close_connection = True
            owner.ws_session(_WsConn(self))
            return
        self._not_found()

    def do_POST(self) -> None:
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.startswith("/sessions/") and self.path.endswith("/close"):
            if owner.generation != LLAMA_OMNI_SERVER:
                self._not_found()
                return
            sid = self.path[len("/sessions/") : -len("/close")]
            try:
                self._json(200, owner.close_session(sid))
            except _HttpError as err:
                self._json(404, {"error": {"message": err.message, "type": "not_found"}})
            return
        prefix = "/v1/stream/"
        if not self.path.startswith(prefix):
            self._not_found()
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
                with owner.lock:
                    if not owner.initialized:
                        raise _HttpError(400, _NOT_INIT)
                    owner.requests.append(("decode", body))
                    owner.decode_bodies.append(body)
                self._decode()
                return
            self._json(200, owner.handle(endpoint, body))
        except _HttpError as err:
            if err.code == 404:
                self._not_found()
            else:
                self._error(err)

    # -------------------------------------------------------------------------------- decode
    def _decode(self) -> None:
        owner = self.owner
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if owner.fault == "hang" or owner._hung:
            owner._release.wait(30)
            self._abort()
            return
        with owner.lock:
            audio, owner._last_audio = owner._last_audio, np.zeros(0, np.float32)
            owner._awaiting_decode = False
        outcome = owner.decide(audio, owner.tts)
        if owner.fault == "malformed":
            self._chunk(b"data: {this is not json\n\n")
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
            return
        if isinstance(outcome, Decision) and not outcome.speak:
            if owner.fault == "drop":
                self._abort()
                return
            self._event({"content": "", "stop": False, "is_listen": True, "end_of_turn": True})
        else:
            if isinstance(outcome, Decision):
                words = outcome.text.split(".")
                self._event(
                    {
                        "content": words[0] + ".",
                        "stop": False,
                        "is_listen": False,
                        "end_of_turn": False,
                    }
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
            # Every duplex decode that does not listen ends with __END_OF_TURN__ (omni.cpp).
            self._event({"content": "", "stop": True, "is_listen": False, "end_of_turn": True})
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
    def _json(
        self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self) -> None:
        """llama-server: a JSON 404 (its error handler); llama-omni-server: cpp-httplib's empty 404."""
        if self.owner.generation == LLAMA_SERVER:
            self._json(
                404,
                {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}},
            )
        else:
            self._empty(404)

    def _empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _error(self, err: _HttpError) -> None:
        if self.owner.generation == LLAMA_OMNI_SERVER:
            # No "code" in the body, so res_error's json_value(err, "code", 500) makes it a 500.
            self._json(500, {"error": {"message": err.message, "type": "invalid_request_error"}})
            return
        kinds = {503: "unavailable_error"}
        kind = kinds.get(err.code, "invalid_request_error" if err.code < 500 else "server_error")
        self._json(err.code, {"error": {"code": err.code, "message": err.message, "type": kind}})
