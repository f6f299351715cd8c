"""``llamacpp_omni``: the edge engine, a client of a llama.cpp-omni server running MiniCPM-o 4.5.

Two transports, chosen by ``transport`` (protocol facts: ``shared/notes/serving-protocols.md``):

``"http"`` — ``llama-server`` duplex endpoints, one global conversation per server process:
    ``GET /health`` -> ``POST /v1/stream/omni_init`` once, then per unit ``/v1/stream/prefill``
    (a server-side *file path* to a 16 kHz WAV, plus an optional JPEG path) and ``/v1/stream/decode``
    (SSE text, ``data: [DONE]`` last). Speech never travels over HTTP: the server writes 24 kHz PCM16
    WAVs to ``<output_dir>/tts_wav/wav_<n>.wav`` (+ ``generation_done.flag`` when a turn's audio is
    complete) and we poll that folder. Client and server must therefore share a disk: ``work_dir``
    must be the same path on both sides (one machine, or a shared mount).

``"websocket"`` — the newer ``llama-omni-server`` ``WS /backend``: ``session.init`` then one
    ``input.append`` per unit (float32 PCM as base64, JPEG frames as base64) answered by
    ``response.output.delta`` events (``text`` | ``audio`` | ``listen``) and ``response.done``. Audio
    rides in the socket, so this works across machines.

Decisions this module makes (and why):

- **The cnt-0 trap.** ``prefill`` with ``cnt == 0`` while the server has no system prompt builds the
  system prompt *from that audio*, using it as the reference voice: the user's first second would
  become the robot's voice. We therefore always initialise the system prompt explicitly through
  ``omni_init.voice_audio`` (the server prefills it as index 0) and number every user unit from
  ``cnt = 1``. Without a reference voice (neither ``prepare(ref_voice=...)`` nor ``voice_audio``) the
  HTTP transport refuses to start (:class:`ConfigError`), because there is no safe way to open the
  conversation. A reference voice passed to ``prepare`` is written as a 16 kHz WAV into ``work_dir``.
- **System prompt text.** ``llama-server`` builds the omni system prompt from built-in text plus the
  reference voice; its HTTP API has no field for our text. Over HTTP the ``system_prompt`` argument is
  therefore not sent (a warning is logged once if it differs from the duplex default); the WebSocket
  transport sends it in ``session.init``. Injected unit texts (``Unit.texts``) are likewise HTTP-less
  and are dropped with a warning.
- **Frames.** One frame per unit is what duplex MiniCPM-o consumes (64 tokens); we send the newest.
- **end_of_turn.** The server's SSE ``end_of_turn`` means "this decode ended", not "the turn ended",
  so it is not mapped. Over HTTP the turn end is ``generation_done.flag`` (written after a turn's last
  WAV); over WebSocket the server does not say, so ``end_of_turn`` stays False and the caller sees the
  turn end at the next listening unit.
- **Audio lag.** token2wav runs asynchronously, so a unit's speech may land after its decode returned.
  A speaking unit waits up to ``audio_wait_s`` for at least one new WAV; WAVs that land later are
  returned with the next speaking unit. A listening result carries no audio (backend contract), so
  WAVs still pending when the model chooses to listen are dropped and counted in
  ``dropped_tail_wavs`` (raise ``audio_wait_s`` if that counter grows).
- **Barge-in.** ``interrupt()`` makes the next unit a forced listen: HTTP calls ``/break`` (stops the
  LLM/TTS threads), deletes pending WAVs and skips that unit's decode (its audio still enters the KV
  cache, as the WebSocket ``force_listen`` does: prefill only).
- **Recovery.** Transport failures raise :class:`BackendUnavailable` / :class:`BackendTimeout`; the
  backend then remembers to re-open its session, and the next ``prepare``/``prefill`` does so with the
  same prompt and voice once the server is back (the conversation history is lost with the server).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
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
DEFAULT_SYSTEM_PROMPT = "Streaming Omni Conversation."
_WAV_NAME = re.compile(r"^wav_(\d+)\.wav$")
_DONE_FLAG = "generation_done.flag"
#: Upper bound on SSE frames / socket events per unit: a runaway server cannot spin us forever.
_MAX_EVENTS_PER_UNIT = 100_000

_START_HINT = (
    "start it with `llama-server --model <model_dir>/MiniCPM-o-4_5-Q4_K_M.gguf --ctx-size 8192 "
    "--n-gpu-layers 99 --port <port>` (HTTP transport) or `llama-omni-server ... --port <port>` "
    '(WebSocket transport), one server per GPU, and wait for GET /health to answer {"status":"ok"}'
)


@dataclass(frozen=True)
class LlamaCppOmniConfig:
    """Parameters of the ``llamacpp_omni`` backend.

    Attributes:
        url: server base URL, ``http://host:port`` (a ``ws://`` URL is accepted for the WS transport).
        transport: ``"http"`` (``llama-server`` duplex endpoints, shared disk) or ``"websocket"``
            (``llama-omni-server`` ``/backend``, audio in the socket).
        ws_path: WebSocket route of ``llama-omni-server``.
        connect_timeout_s: TCP/WebSocket connect deadline.
        read_timeout_s: deadline of one ordinary request (prefill, break, reset).
        init_timeout_s: deadline of ``omni_init`` / ``session.init`` (the server loads models).
        health_timeout_s: how long ``prepare`` waits for ``GET /health`` to say ok.
        decode_timeout_s: deadline of one unit's decode, from request to last event.
        audio_wait_s: how long a speaking unit waits for its first WAV (HTTP transport).
        poll_interval_s: WAV folder / health polling period.
        retries: extra attempts for calls that are safe to repeat; backoff_s / backoff_max_s shape
            the exponential delay between them.
        work_dir: folder shared with the server (HTTP): unit WAVs/JPEGs go to ``work_dir/in``, the
            server writes speech to ``work_dir/out/tts_wav``. Empty: a private temporary folder,
            which only works when the server runs on this machine.
        model_dir: server-side GGUF folder for ``omni_init`` (empty: the server's default).
        tts_bin_dir: server-side TTS folder (empty: ``<model_dir>/tts``).
        token2wav_device: where token2wav runs; the server's default ``gpu:1`` needs two GPUs.
        n_predict: generation limit passed to ``omni_init``.
        voice_audio: server-side path of a reference-voice WAV (used when prepare gets no ref_voice).
        max_slice_nums: image slices per frame (1 = 64 tokens, what duplex uses).
        jpeg_quality: JPEG quality for frames.
        use_tts: ask the server for speech.
        delete_consumed: delete input files and consumed output WAVs (keeps the disk bounded).
    """

    url: str = "http://127.0.0.1:8080"
    transport: str = "http"
    ws_path: str = "/backend"
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 10.0
    init_timeout_s: float = 120.0
    health_timeout_s: float = 30.0
    decode_timeout_s: float = 10.0
    audio_wait_s: float = 1.0
    poll_interval_s: float = 0.01
    retries: int = 2
    backoff_s: float = 0.2
    backoff_max_s: float = 2.0
    work_dir: str = ""
    model_dir: str = ""
    tts_bin_dir: str = ""
    token2wav_device: str = "gpu:0"
    n_predict: int = 2048
    voice_audio: str = ""
    max_slice_nums: int = 1
    jpeg_quality: int = 85
    use_tts: bool = True
    delete_consumed: bool = True

    def __post_init__(self) -> None:
        if self.transport not in ("http", "websocket"):
            raise ConfigError(
                f"LlamaCppOmniConfig.transport = {self.transport!r}; choose 'http' (llama-server, "
                "shared disk) or 'websocket' (llama-omni-server /backend)"
            )
        if not re.match(r"^(https?|wss?)://[^/]+", self.url):
            raise ConfigError(f"LlamaCppOmniConfig.url = {self.url!r}; expected http://host:port")
        for key in (
            "connect_timeout_s",
            "read_timeout_s",
            "init_timeout_s",
            "health_timeout_s",
            "decode_timeout_s",
            "poll_interval_s",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"LlamaCppOmniConfig.{key} must be > 0, got {getattr(self, key)}")
        if self.audio_wait_s < 0:
            raise ConfigError("LlamaCppOmniConfig.audio_wait_s must be >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError("LlamaCppOmniConfig.jpeg_quality must be in 1..100")
        _wire.Backoff(self.retries, self.backoff_s, self.backoff_max_s)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> LlamaCppOmniConfig:
        return from_mapping(cls, mapping)

    @property
    def http_base(self) -> str:
        """The server's HTTP base URL (no trailing slash)."""
        base = self.url.rstrip("/")
        if base.startswith("ws"):
            base = "http" + base[2:]
        return re.sub(r"(://[^/]+).*$", r"\1", base)

    @property
    def ws_url(self) -> str:
        """The server's ``/backend`` WebSocket URL."""
        return "ws" + self.http_base[4:] + self.ws_path

    @property
    def backoff(self) -> _wire.Backoff:
        return _wire.Backoff(self.retries, self.backoff_s, self.backoff_max_s)


# ------------------------------------------------------------------------------------- HTTP transport


class _HttpSession:
    """One ``llama-server`` duplex conversation over HTTP + a shared folder."""

    def __init__(self, config: LlamaCppOmniConfig, work_dir: Path) -> None:
        # Nothing touches the disk before open(): constructing a backend must not create folders.
        self._cfg = config
        self._base = config.http_base
        self._client = httpx.Client(
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            trust_env=False,  # a robot's HTTP(S)_PROXY must never capture a local inference server
        )
        self._in_dir = work_dir / "in"
        self._out_dir = work_dir / "out"
        self._wav_dir = self._out_dir / "tts_wav"
        self._server_has_context = False
        self._cnt = 1
        self._warned_texts = False

    # ----------------------------------------------------------------------------------- lifecycle
    def open(self, voice_path: str) -> None:
        """Wait for health, then initialise (or re-initialise) the omni context with the voice."""
        self._wait_health()
        self._in_dir.mkdir(parents=True, exist_ok=True)
        self._wav_dir.mkdir(parents=True, exist_ok=True)
        self.drop_audio()
        if self._server_has_context:
            try:
                # Clears LLM + TTS KV and re-prefills the system prompt (voice) without reloading models.
                self._post(
                    "update_session_config",
                    {"media_type": 2, "duplex_mode": True, "voice_audio": voice_path},
                    timeout=self._cfg.init_timeout_s,
                    idempotent=True,
                )
            except _ContextLost:
                self._server_has_context = False
        if not self._server_has_context:
            body: dict[str, Any] = {
                "media_type": 2,
                "use_tts": self._cfg.use_tts,
                "duplex_mode": True,
                "token2wav_device": self._cfg.token2wav_device,
                "output_dir": str(self._out_dir),
                "n_predict": self._cfg.n_predict,
                "voice_audio": voice_path,
            }
            if self._cfg.model_dir:
                body["model_dir"] = self._cfg.model_dir
                body["tts_bin_dir"] = self._cfg.tts_bin_dir or str(
                    Path(self._cfg.model_dir) / "tts"
                )
            elif self._cfg.tts_bin_dir:
                body["tts_bin_dir"] = self._cfg.tts_bin_dir
            self._post("omni_init", body, timeout=self._cfg.init_timeout_s, idempotent=True)
            self._server_has_context = True
        # Index 0 is the system prompt the server built from voice_audio; users start at 1.
        self._cnt = 1

    def prefill(self, unit: Unit) -> None:
        if unit.texts and not self._warned_texts:
            log.warning(
                "llama-server's HTTP API cannot inject text; dropping Unit.texts %s", unit.texts
            )
            self._warned_texts = True
        audio_path = self._in_dir / f"unit_{self._cnt:07d}.wav"
        _wire.write_wav(audio_path, unit.audio, INPUT_SAMPLE_RATE)
        body: dict[str, Any] = {
            "audio_path_prefix": str(audio_path),
            "cnt": self._cnt,
            "max_slice_nums": self._cfg.max_slice_nums,
        }
        img_path: Path | None = None
        if unit.frames:
            img_path = self._in_dir / f"unit_{self._cnt:07d}.jpg"
            img_path.write_bytes(_wire.jpeg_bytes(unit.frames[-1].rgb, self._cfg.jpeg_quality))
            body["img_path_prefix"] = str(img_path)
        try:
            self._post("prefill", body, timeout=self._cfg.read_timeout_s, idempotent=False)
        finally:
            if self._cfg.delete_consumed:
                audio_path.unlink(missing_ok=True)
                if img_path is not None:
                    img_path.unlink(missing_ok=True)
        self._cnt += 1

    def decode(self) -> tuple[bool, str, dict[str, float]]:
        """Run one decode; return ``(is_listen, text, timings_ms)``."""
        t0 = time.perf_counter()
        deadline = time.monotonic() + self._cfg.decode_timeout_s
        url = f"{self._base}/v1/stream/decode"
        is_listen = False
        texts: list[str] = []
        done = False
        timeout = httpx.Timeout(self._cfg.decode_timeout_s, connect=self._cfg.connect_timeout_s)
        try:
            with self._client.stream("POST", url, json={"stream": True}, timeout=timeout) as resp:
                if resp.status_code != 200:
                    resp.read()
                    self._raise_for_error("decode", resp)
                for n, payload in enumerate(_sse_payloads(resp.iter_lines())):
                    if n > _MAX_EVENTS_PER_UNIT or time.monotonic() > deadline:
                        raise BackendTimeout(
                            f"llama.cpp-omni decode at {url} exceeded decode_timeout_s="
                            f"{self._cfg.decode_timeout_s}"
                        )
                    if payload == "[DONE]":
                        done = True
                        break
                    event = _json_object(payload, "decode SSE frame")
                    content = event.get("content", "")
                    if not isinstance(content, str):
                        raise BackendProtocolError(
                            f"decode SSE 'content' is not a string: {event!r}"
                        )
                    if event.get("is_listen") is True:
                        is_listen = True
                    elif content:
                        texts.append(content)
        except httpx.HTTPError as exc:
            raise _convert_httpx(exc, url, "decode") from None
        if not done:
            raise BackendUnavailable(
                f"llama.cpp-omni decode stream from {url} ended without 'data: [DONE]' "
                "(server stopped mid-turn?)"
            )
        return is_listen, "".join(texts), {"decode": (time.perf_counter() - t0) * 1e3}

    def collect_audio(self, wait_s: float) -> tuple[FloatArray | None, bool]:
        """Take the complete new WAVs (waiting up to ``wait_s`` for the first); return (audio, turn_done)."""
        deadline = time.monotonic() + wait_s
        flag = self._wav_dir / _DONE_FLAG
        chunks: list[FloatArray] = []
        while True:
            for _, path in self._wav_indices():
                read = _wire.read_complete_wav(path)
                if read is None:
                    break  # still being written: keep the order, take it later
                samples, rate = read
                if rate != OUTPUT_SAMPLE_RATE:
                    raise BackendProtocolError(
                        f"{path} is {rate} Hz; llama.cpp-omni writes {OUTPUT_SAMPLE_RATE} Hz"
                    )
                chunks.append(samples)
                if self._cfg.delete_consumed:
                    path.unlink(missing_ok=True)
                else:
                    path.rename(path.with_suffix(".consumed"))
            if chunks or flag.exists() or time.monotonic() >= deadline:
                break
            time.sleep(self._cfg.poll_interval_s)
        turn_done = False
        if flag.exists() and not self._wav_indices():
            turn_done = True  # the server wrote the turn's last WAV and we have taken it
            flag.unlink(missing_ok=True)
        audio = np.concatenate(chunks).astype(np.float32) if chunks else None
        return audio, turn_done

    def drop_audio(self) -> int:
        """Delete every pending output WAV and the done flag; return how many WAVs were dropped."""
        if not self._wav_dir.is_dir():
            return 0
        pending = self._wav_indices()
        for _, path in pending:
            path.unlink(missing_ok=True)
        (self._wav_dir / _DONE_FLAG).unlink(missing_ok=True)
        return len(pending)

    def break_generation(self) -> None:
        self._post(
            "break", {"reason": "barge_in"}, timeout=self._cfg.read_timeout_s, idempotent=True
        )
        self.drop_audio()

    def reset(self) -> None:
        self._post("reset", {}, timeout=self._cfg.read_timeout_s, idempotent=True)
        self.drop_audio()
        self._cnt = 1

    def forget_server(self) -> None:
        """The server may have restarted: the next open() must run omni_init again."""
        self._server_has_context = False

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------------------------- helpers
    def _wav_indices(self) -> list[tuple[int, Path]]:
        found: list[tuple[int, Path]] = []
        with contextlib.suppress(FileNotFoundError):
            for path in self._wav_dir.iterdir():
                match = _WAV_NAME.match(path.name)
                if match:
                    found.append((int(match.group(1)), path))
        return sorted(found)

    def _wait_health(self) -> None:
        url = f"{self._base}/health"
        deadline = time.monotonic() + self._cfg.health_timeout_s
        last: str = "no answer"
        while True:
            try:
                resp = self._client.get(url, timeout=self._cfg.connect_timeout_s)
                if resp.status_code == 200 and _safe_json(resp).get("status") == "ok":
                    return
                last = f"HTTP {resp.status_code} {resp.text[:200]!r}"  # 503 while loading the model
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, httpx.ConnectError) and time.monotonic() >= deadline:
                    break
            if time.monotonic() >= deadline:
                break
            time.sleep(min(0.05, self._cfg.health_timeout_s))
        raise BackendUnavailable(
            f"llama.cpp-omni server at {self._base} is not healthy after "
            f"{self._cfg.health_timeout_s} s ({last}); {_START_HINT}"
        )

    def _post(
        self, endpoint: str, body: dict[str, Any], *, timeout: float, idempotent: bool
    ) -> dict[str, Any]:
        url = f"{self._base}/v1/stream/{endpoint}"
        delays = iter(self._cfg.backoff.delays())
        while True:
            try:
                resp = self._client.post(
                    url,
                    json=body,
                    timeout=httpx.Timeout(timeout, connect=self._cfg.connect_timeout_s),
                )
            except httpx.HTTPError as exc:
                # Repeat only what cannot double-apply: idempotent calls, or a request never sent.
                retryable = idempotent or isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                delay = next(delays, None) if retryable else None
                if delay is None:
                    raise _convert_httpx(exc, url, endpoint) from None
                time.sleep(delay)
                continue
            if resp.status_code != 200:
                self._raise_for_error(endpoint, resp)
            return _json_object(resp.text, f"{endpoint} response")

    def _raise_for_error(self, endpoint: str, resp: httpx.Response) -> None:
        body = _safe_json(resp)
        raw_err = body.get("error")
        err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {}
        message = str(err.get("message") or resp.text[:300])
        if resp.status_code == 400 and "omni context not initialized" in message:
            self._server_has_context = False
            raise _ContextLost(
                f"llama.cpp-omni server at {self._base} has no omni context ({message}); it was "
                "restarted or never initialised: call prepare() again"
            )
        if resp.status_code >= 500:
            raise BackendError(
                f"llama.cpp-omni {endpoint} failed on the server: HTTP {resp.status_code} {message}"
            )
        raise BackendProtocolError(
            f"llama.cpp-omni rejected {endpoint}: HTTP {resp.status_code} {message}"
        )


class _ContextLost(BackendUnavailable):
    """The server answered 400 'omni context not initialized' (it restarted)."""


def _sse_payloads(lines: Iterator[str]) -> Iterator[str]:
    """Yield the payload of each ``data:`` line of a server-sent-event stream."""
    for line in lines:
        if not line or line.startswith(":"):
            continue
        if not line.startswith("data:"):
            raise BackendProtocolError(f"unexpected SSE line from llama.cpp-omni: {line[:200]!r}")
        yield line[5:].strip()


def _json_object(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BackendProtocolError(
            f"malformed JSON in {what}: {exc}: {str(text)[:200]!r}"
        ) from None
    if not isinstance(value, dict):
        raise BackendProtocolError(f"{what} is not a JSON object: {str(text)[:200]!r}")
    return value


def _safe_json(resp: httpx.Response) -> dict[str, Any]:
    try:
        value = resp.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _convert_httpx(exc: httpx.HTTPError, url: str, what: str) -> BackendError:
    """Map an httpx failure to the omni_ros family, naming the URL."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return BackendUnavailable(
            f"llama.cpp-omni server at {url} is not reachable ({exc}); {_START_HINT}"
        )
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout(f"llama.cpp-omni {what} at {url} timed out ({type(exc).__name__})")
    if isinstance(
        exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError | httpx.CloseError
    ):
        return BackendUnavailable(
            f"llama.cpp-omni server at {url} dropped the connection during {what} ({exc})"
        )
    return BackendError(f"llama.cpp-omni {what} at {url} failed: {type(exc).__name__}: {exc}")


# -------------------------------------------------------------------------------- WebSocket transport


class _WsSession:
    """One ``llama-omni-server`` ``/backend`` session (full_duplex mode)."""

    def __init__(self, config: LlamaCppOmniConfig) -> None:
        self._cfg = config
        self._conn: Any = None
        self.session_id = ""
        self._force_listen_next = False

    def open(self, system_prompt: str, ref_voice: FloatArray | None) -> None:
        from websockets.exceptions import InvalidHandshake, WebSocketException

        self.close()
        payload: dict[str, Any] = {
            "mode": "full_duplex",
            "use_tts": self._cfg.use_tts,
            "system_prompt": system_prompt,
            "config": {"max_slice_nums": self._cfg.max_slice_nums},
        }
        if ref_voice is not None:
            # Same encoding as input audio (float32 PCM 16 kHz, base64), as the server's parser expects.
            payload["voice"] = {"ref_audio": _wire.b64encode(_wire.float_to_f32le(ref_voice))}
        url = self._cfg.ws_url
        delays = iter(self._cfg.backoff.delays())
        while True:
            try:
                self._conn = _wire.open_websocket(url, self._cfg.connect_timeout_s)
                break
            except (OSError, TimeoutError, InvalidHandshake, WebSocketException) as exc:
                delay = next(delays, None)
                if delay is None:
                    raise BackendUnavailable(
                        f"llama.cpp-omni WebSocket {url} is not reachable ({type(exc).__name__}: {exc}); "
                        f"{_START_HINT}"
                    ) from None
                time.sleep(delay)
        self._send({"type": "session.init", "payload": payload})
        deadline = time.monotonic() + self._cfg.init_timeout_s
        for _ in range(_MAX_EVENTS_PER_UNIT):
            event = self._recv(deadline, "session.init")
            kind = event.get("type")
            if kind == "session.created":
                self.session_id = str(event.get("session_id", ""))
                self._force_listen_next = False
                return
            self._raise_if_error(event)
        raise BackendProtocolError("llama.cpp-omni sent no session.created after session.init")

    def prefill(self, unit: Unit, force_listen: bool) -> None:
        frames = (
            [_wire.b64encode(_wire.jpeg_bytes(unit.frames[-1].rgb, self._cfg.jpeg_quality))]
            if unit.frames
            else []
        )
        self._send(
            {
                "type": "input.append",
                "input": {
                    "audio_base64": _wire.b64encode(_wire.float_to_f32le(unit.audio)),
                    "video_frames": frames,
                    "max_slice_nums": self._cfg.max_slice_nums,
                    "force_listen": bool(force_listen),
                },
            }
        )

    def collect(self) -> tuple[bool, str, FloatArray | None, dict[str, float]]:
        """Read this unit's events up to its listen delta or response.done."""
        deadline = time.monotonic() + self._cfg.decode_timeout_s
        texts: list[str] = []
        audio: list[FloatArray] = []
        timings: dict[str, float] = {}
        for _ in range(_MAX_EVENTS_PER_UNIT):
            event = self._recv(deadline, "decode")
            kind = event.get("type")
            if kind == "response.output.delta":
                delta_kind = event.get("kind")
                if delta_kind == "listen":
                    timings.update(_metrics(event))
                    return True, "".join(texts), _cat(audio), timings
                if delta_kind == "text":
                    text = event.get("text", event.get("delta", ""))
                    if not isinstance(text, str):
                        raise BackendProtocolError(f"text delta is not a string: {event!r}")
                    texts.append(text)
                elif delta_kind == "audio":
                    audio.append(
                        _wire.f32le_to_float(
                            _wire.b64decode(event.get("audio", event.get("delta")), "audio delta")
                        )
                    )
                else:
                    raise BackendProtocolError(f"unknown response.output.delta kind {delta_kind!r}")
            elif kind == "response.done":
                timings.update(_metrics(event))
                if not audio and event.get("audio"):
                    audio.append(
                        _wire.f32le_to_float(_wire.b64decode(event["audio"], "response.done audio"))
                    )
                if not texts and isinstance(event.get("text"), str):
                    texts.append(event["text"])
                return False, "".join(texts), _cat(audio), timings
            else:
                self._raise_if_error(event)
        raise BackendProtocolError("llama.cpp-omni sent too many events for one unit")

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------------------------- helpers
    def _send(self, message: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed

        if self._conn is None:
            raise BackendUnavailable(f"no connection to {self._cfg.ws_url}; call prepare()")
        try:
            self._conn.send(json.dumps(message))
        except (ConnectionClosed, OSError) as exc:
            self.close()
            raise BackendUnavailable(
                f"llama.cpp-omni WebSocket {self._cfg.ws_url} closed ({exc})"
            ) from None

    def _recv(self, deadline: float, what: str) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        if self._conn is None:
            raise BackendUnavailable(f"no connection to {self._cfg.ws_url}; call prepare()")
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            raw = self._conn.recv(timeout=remaining)
        except TimeoutError:
            # The socket is now mid-unit: a late answer would be taken for the next unit's. Start over.
            self.close()
            raise BackendTimeout(f"llama.cpp-omni {what} at {self._cfg.ws_url} timed out") from None
        except (ConnectionClosed, OSError) as exc:
            self.close()
            raise BackendUnavailable(
                f"llama.cpp-omni WebSocket {self._cfg.ws_url} closed during {what} ({exc})"
            ) from None
        return _json_object(raw, f"{what} event")

    def _raise_if_error(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "error":
            err = event.get("error")
            message = err.get("message") if isinstance(err, dict) else err
            raise BackendError(f"llama.cpp-omni error: {message or event!r}")
        if kind == "session.closed":
            self.close()
            raise BackendUnavailable(
                f"llama.cpp-omni closed the session: {event.get('reason')!r} {event.get('diagnostic')!r}"
            )


def _cat(chunks: list[FloatArray]) -> FloatArray | None:
    return np.concatenate(chunks).astype(np.float32) if chunks else None


def _metrics(event: Mapping[str, Any]) -> dict[str, float]:
    metrics = event.get("metrics")
    if not isinstance(metrics, dict):
        return {}
    return {
        key.removesuffix("_ms"): float(value)
        for key, value in metrics.items()
        if key.endswith("_ms") and isinstance(value, int | float) and not isinstance(value, bool)
    }


# ---------------------------------------------------------------------------------------- backend


class LlamaCppOmniBackend:
    """MiniCPM-o 4.5 served by llama.cpp-omni (edge: one server per GPU). See the module docstring."""

    name: ClassVar[str] = "llamacpp_omni"
    config_class: ClassVar[type[LlamaCppOmniConfig]] = LlamaCppOmniConfig

    input_sample_rate: int = INPUT_SAMPLE_RATE
    output_sample_rate: int = OUTPUT_SAMPLE_RATE
    unit_ns: int = 1_000_000_000
    first_unit_ns: int = 1_035_000_000

    def __init__(self, config: LlamaCppOmniConfig) -> None:
        self.config = config
        self._interrupt = threading.Event()
        self._own_work_dir = not config.work_dir
        # A private folder is only named here; prepare() creates it and close() removes it, so a
        # backend that is built but never used leaves nothing on disk.
        self._work_dir = Path(
            config.work_dir
            or Path(tempfile.gettempdir()) / f"omni_ros_llamacpp_{uuid.uuid4().hex[:12]}"
        )
        self._http: _HttpSession | None = None
        self._ws: _WsSession | None = None
        if config.transport == "http":
            self._http = _HttpSession(config, self._work_dir)
        else:
            self._ws = _WsSession(config)
        self._prepared = False
        self._needs_reopen = False
        self._prefilled = False
        self._force_listen = False
        self._units_since_prepare = 0
        #: Output WAVs that arrived after the model had chosen to listen (dropped, see module doc).
        self.dropped_tail_wavs = 0
        self._prompt = DEFAULT_SYSTEM_PROMPT
        self._ref_voice: FloatArray | None = None
        self._warned_prompt = False
        self._closed = False

    # ---------------------------------------------------------------------------------- protocol
    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        """Open the server session with the system prompt and reference voice (see module doc)."""
        self._check_open()
        if ref_voice is not None:
            ref_voice = np.asarray(ref_voice, dtype=np.float32).reshape(-1)
            if ref_voice.size == 0:
                raise ConfigError(
                    "ref_voice is empty; pass None to use voice_audio from the config"
                )
        self._prompt = system_prompt
        self._ref_voice = ref_voice
        self._open_session()

    def prefill(self, unit: Unit) -> None:
        """Send one unit (16 kHz audio + newest frame)."""
        self._check_open()
        if not self._prepared and not self._needs_reopen:
            raise StateError(
                "prefill() before prepare(): call backend.prepare(system_prompt) first"
            )
        self._check_unit(unit)
        if self._needs_reopen:
            self._open_session()
        # An interrupt() that arrived before this unit: stop generation, drop speech, force listen.
        force_listen = self._interrupt.is_set()
        if force_listen:
            self._interrupt.clear()
        try:
            if self._http is not None:
                if force_listen:
                    self._http.break_generation()
                self._http.prefill(unit)
            else:
                assert self._ws is not None
                self._ws.prefill(unit, force_listen)
        except (BackendUnavailable, BackendTimeout):
            self._lost_session()
            raise
        self._units_since_prepare += 1
        self._force_listen = force_listen
        self._prefilled = True

    def generate(self) -> UnitResult:
        """Decode the last prefilled unit: listen, or text + 24 kHz speech."""
        self._check_open()
        if not self._prefilled:
            raise StateError("generate() without a prefilled unit: call prefill(unit) first")
        self._prefilled = False
        t0 = time.perf_counter()
        late_interrupt = self._interrupt.is_set()
        if late_interrupt:
            self._interrupt.clear()
        forced = self._force_listen or late_interrupt
        self._force_listen = False
        try:
            if self._http is not None:
                if forced:
                    # Force listen: no decode for this unit (its audio is already in the KV cache),
                    # generation stopped and queued speech deleted.
                    if late_interrupt:
                        self._http.break_generation()
                    return UnitResult(
                        is_listen=True, timings_ms={"total": (time.perf_counter() - t0) * 1e3}
                    )
                is_listen, text, timings = self._http.decode()
                t1 = time.perf_counter()
                if is_listen:
                    # A listen result carries no audio; late speech of the finished turn is dropped.
                    self.dropped_tail_wavs += self._http.drop_audio()
                    audio, turn_done = None, False
                else:
                    audio, turn_done = self._http.collect_audio(self.config.audio_wait_s)
                timings["audio_wait"] = (time.perf_counter() - t1) * 1e3
            else:
                assert self._ws is not None
                # Read this unit's answer even when forced, or the next unit would get it.
                is_listen, text, audio, timings = self._ws.collect()
                turn_done = False
        except (BackendUnavailable, BackendTimeout):
            self._lost_session()
            raise
        timings["total"] = (time.perf_counter() - t0) * 1e3
        if forced or is_listen:
            return UnitResult(is_listen=True, timings_ms=timings)
        return UnitResult(
            is_listen=False,
            text=text,
            audio=audio if audio is not None and audio.size else None,
            end_of_turn=turn_done,
            timings_ms=timings,
        )

    def interrupt(self) -> None:
        """Barge-in (thread-safe): the next prefill/generate breaks generation and drops speech."""
        self._interrupt.set()

    def reset(self) -> None:
        """Clear the server's KV caches; prepare() must be called again."""
        self._check_open()
        self._prefilled = False
        self._prepared = False
        self._needs_reopen = False
        self._interrupt.clear()
        if self._http is not None:
            try:
                self._http.reset()
            except (BackendUnavailable, BackendTimeout):
                self._http.forget_server()  # nothing to clear on a server that is gone
        elif self._ws is not None:
            self._ws.close()  # the server frees a /backend session when its socket closes

    def close(self) -> None:
        """Close sockets and remove a private work folder. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._http is not None:
            self._http.close()
        if self._ws is not None:
            self._ws.close()
        if self._own_work_dir:
            shutil.rmtree(self._work_dir, ignore_errors=True)

    # ---------------------------------------------------------------------------------- internals
    @property
    def work_dir(self) -> Path:
        """The folder shared with the server (HTTP transport)."""
        return self._work_dir

    def _check_unit(self, unit: Unit) -> None:
        """Reject a unit of the wrong rate or length before any state changes."""
        if unit.sample_rate != INPUT_SAMPLE_RATE:
            raise ConfigError(
                f"unit audio is {unit.sample_rate} Hz; llamacpp_omni wants {INPUT_SAMPLE_RATE} Hz"
            )
        first_n = self.first_unit_ns * INPUT_SAMPLE_RATE // 1_000_000_000
        unit_n = self.unit_ns * INPUT_SAMPLE_RATE // 1_000_000_000
        if self._needs_reopen:
            # Recovering after a failure: the caller's timeline may restart or carry on; either is fine.
            allowed = {first_n, unit_n}
        else:
            allowed = {first_n} if self._units_since_prepare == 0 else {unit_n}
        if len(unit.audio) not in allowed:
            which = "the first unit after prepare()" if self._units_since_prepare == 0 else "a unit"
            raise ConfigError(
                f"{which} must hold exactly {sorted(allowed)} samples at {INPUT_SAMPLE_RATE} Hz, got {len(unit.audio)}"
            )

    def _open_session(self) -> None:
        self._prepared = False
        self._prefilled = False
        self._force_listen = False
        self._units_since_prepare = 0
        self._interrupt.clear()
        try:
            if self._http is not None:
                if (
                    self._prompt.strip()
                    and self._prompt.strip() != DEFAULT_SYSTEM_PROMPT
                    and not self._warned_prompt
                ):
                    log.warning(
                        "llama-server's HTTP API builds the system prompt itself; the prompt text %r "
                        "is not sent (use transport: websocket to send it)",
                        self._prompt[:80],
                    )
                    self._warned_prompt = True
                self._http.open(self._voice_path())
            else:
                assert self._ws is not None
                self._ws.open(self._prompt, self._ref_voice)
        except (BackendUnavailable, BackendTimeout):
            self._lost_session()
            raise
        self._prepared = True
        self._needs_reopen = False

    def _voice_path(self) -> str:
        if self._ref_voice is not None:
            path = self._work_dir / "voice_ref_16k.wav"
            self._work_dir.mkdir(parents=True, exist_ok=True)
            _wire.write_wav(path, self._ref_voice, INPUT_SAMPLE_RATE)
            return str(path)
        if self.config.voice_audio:
            return self.config.voice_audio
        raise ConfigError(
            "llamacpp_omni (HTTP) needs a reference voice to open a duplex conversation safely: pass "
            "prepare(system_prompt, ref_voice=<16 kHz float32>) or set voice_audio to a WAV path the "
            "server can read (without one, the user's first unit would become the voice reference)"
        )

    def _lost_session(self) -> None:
        self._prepared = False
        self._prefilled = False
        self._needs_reopen = True
        if self._http is not None:
            self._http.forget_server()
        if self._ws is not None:
            self._ws.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StateError("backend is closed; create a new one")
