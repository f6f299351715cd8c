"""``llamacpp_omni``: the edge engine, a client of a llama.cpp-omni server running MiniCPM-o 4.5.

llama.cpp-omni (github.com/tc-mb/llama.cpp-omni) ships two server generations; facts and citations
are in ``docs/BACKEND_LLAMACPP.md``:

``llama-server`` (``tools/server/server.cpp``)
    HTTP only: ``POST /v1/stream/{omni_init,prefill,decode,break,reset,update_session_config}``,
    one global conversation per process. ``omni_init`` takes ``model_dir`` (default: a path relative
    to the server's working directory), ``tts_bin_dir`` (default ``model_dir + "token2wav-gguf"``),
    ``token2wav_device`` (default ``gpu:1``). Errors are ``{"error":{"code","message","type"}}`` with
    the HTTP status = code. ``update_session_config`` takes the sliding-window settings.

``llama-omni-server`` (``tools/server/server-omni.cpp``, ``ws_handler.cpp``, ``protocol.cpp``)
    the same HTTP endpoints minus ``/break`` and ``/reset`` (``omni_init`` ignores ``model_dir`` and
    ``voice_audio``: it derives every model path from its own ``-m``; every error is a bare 500), plus
    ``WS /backend``: ``session.init`` then one ``input.append`` per unit, answered by
    ``response.output.delta`` (``text`` | ``audio`` | ``listen``) and ``response.done``, each with a
    ``metrics`` object; ``POST /sessions/{id}/close`` ends a session and returns once it is torn down.

The generation is detected (``server: auto``) by ``GET /v1/models``: llama-server serves it,
llama-omni-server answers 404. ``transport: websocket`` (the default) needs llama-omni-server;
``transport: http`` works with both (speech then comes as WAV files on a disk both sides share).

What this module does about the servers' behaviour (and why):

- **Opening the conversation.** A prefill with ``cnt == 0`` while the server has no system prompt
  builds the system prompt with that audio as the reference voice, and a first prefill with
  ``cnt > 0`` before that never completes (``omni.cpp stream_prefill``: the LLM thread is started by
  the index-0 prefill). Over HTTP we therefore always send ``cnt 0`` ourselves, with the reference
  voice (``prepare(ref_voice=...)`` written to ``work_dir``, or ``voice_audio``) or with an empty path,
  which makes the server use its built-in default voice; user units count from 1. ``voice_audio`` is
  never put in ``omni_init`` (llama-omni-server ignores it there).
- **System prompt.** The server's prompt is ``<|im_start|>system\\n...<|audio_start|>`` + voice +
  a suffix that must close the block (default ``<|audio_end|><|im_end|>\\n``); the text we are given
  *replaces that suffix* (``ws_handler.cpp reset_octx_for_session`` /
  ``server-omni.cpp`` ``assistant_prompt``). We send ``<|audio_end|>{text}<|im_end|>\\n`` so the block
  is closed, and nothing for the default prompt. llama-server's HTTP API has no field for it: there
  the text is not sent (a warning).
- **Speech is asynchronous.** token2wav renders windows behind the LLM and the turn's final window
  only when the turn ends (``omni.cpp t2w_thread_func``: ``need_flush = is_final`` in duplex), i.e.
  while the model already listens. Speech is therefore one stream per turn: a unit the model listens
  in (or a WebSocket unit the server answers with nothing) still returns the turn's late speech as a
  speaking result with no text (a *tail* unit), and the turn closes at the first listening unit with
  no speech left. Over HTTP, WAVs are read strictly in index order and ``generation_done.flag`` marks
  the turn's last one (then ``end_of_turn``); over WebSocket, audio deltas are labelled with the
  response id current when they were sent, so they are taken whatever unit is running.
- **Units the server does not answer.** Over WebSocket, a full-duplex unit whose decode produced no
  text and no audio gets no event at all (``ws_handler.cpp``: ``response.done`` only ``if
  (!full_text.empty() || emitted_audio)``). After ``unit_quiet_s`` without an event the unit counts
  as *idle* (no error, session kept); events that still come for it later are recognised by their
  ``response_id`` and folded into the next result. Only ``decode_timeout_s`` without any event at
  all is a :class:`BackendTimeout`.
- **One session per server, torn down asynchronously.** A ``session.init`` while the old session is
  still being torn down is refused by closing the socket without a word (``SessionManager::allocate``).
  ``reset()``/``close()`` end the session with ``POST /sessions/{id}/close`` (which returns only when
  the teardown is done), and ``prepare`` retries a refused ``session.init`` with backoff for up to
  ``init_busy_wait_s``.
- **Barge-in.** ``interrupt()`` makes the next unit a forced listen. llama-server: ``/break`` and skip
  that unit's decode; token2wav restarts its WAV numbering at 0, and a window it was rendering during
  the break is still written afterwards: every WAV that appears before the next speaking decode is
  stale and deleted (counted). llama-omni-server has no ``/break``: WebSocket sends
  ``force_listen``; speech the server still sends for the interrupted turn is dropped (counted) until
  the next response that speaks.
- **Sliding window, sampling.** ``sliding_window_*`` go to llama-server's ``update_session_config``;
  sampling settings go to ``session.init.config`` (WebSocket; ``ws_handler.cpp
  apply_session_config``) and ``length_penalty`` to llama-omni-server's HTTP decode. A setting the
  detected server cannot take is a :class:`ConfigError` (at configure where the server is named, at
  ``prepare`` after detection), never silently ignored.
- **Injected text.** No duplex path of either server takes text for a unit (``omni.cpp
  duplex_prefill`` has no text argument), so ``Unit.texts`` are dropped, counted and warned about once.
- **Metrics.** :meth:`LlamaCppOmniBackend.metrics` returns the server's latest ``metrics`` object
  (WebSocket: ``kv_cache_length``, ``prefill_ms``, ``generate_ms``, ...) and this client's counters,
  as a flat dict for ``/diagnostics``.
- **Recovery.** Transport failures raise :class:`BackendUnavailable` / :class:`BackendTimeout` with the
  reason; the next ``prepare``/``prefill`` re-opens the session (history is lost with the server).
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
DEFAULT_SYSTEM_PROMPT = "Streaming Omni Conversation."
LLAMA_SERVER = "llama-server"
LLAMA_OMNI_SERVER = "llama-omni-server"
_SERVERS = ("auto", LLAMA_SERVER, LLAMA_OMNI_SERVER)
_WINDOW_MODES = ("off", "basic", "context")
_WAV_NAME = re.compile(r"^wav_(\d+)\.wav$")
_DONE_FLAG = "generation_done.flag"
_RESPONSE_ID = re.compile(r"_resp_(\d+)$")
#: Tokens that open or close prompt blocks: a system prompt holding one would corrupt the template.
_TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|audio_start|>", "<|audio_end|>")
#: Upper bound on SSE frames / socket events per unit: a runaway server cannot spin us forever.
_MAX_EVENTS_PER_UNIT = 100_000
#: Numeric fields of the server's ProtocolMetrics (protocol.cpp ProtocolMetrics::to_json).
_SERVER_METRICS = (
    "kv_cache_length",
    "prefill_ms",
    "generate_ms",
    "wall_clock_ms",
    "cost_llm_ms",
    "cost_tts_prep_ms",
    "cost_tts_ms",
    "cost_token2wav_ms",
    "n_tokens",
    "n_tts_tokens",
    "vision_slices",
    "vision_tokens",
)
#: Sampling settings and where each server takes them (negative value = the server's default).
_WS_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "length_penalty",
    "listen_prob_scale",
    "force_listen_count",
    "max_new_speak_tokens_per_chunk",
    "tts_temperature",
)
_HTTP_OMNI_SAMPLING = ("length_penalty",)

_START_HINT = (
    "start it with `llama-omni-server -m <model_dir>/MiniCPM-o-4_5-Q4_K_M.gguf --port <port>` "
    "(WebSocket or HTTP) or `llama-server --model <model_dir>/MiniCPM-o-4_5-Q4_K_M.gguf --port <port>` "
    "(HTTP only), one server per GPU (see docs/BACKEND_LLAMACPP.md)"
)


@dataclass(frozen=True)
class LlamaCppOmniConfig:
    """Parameters of the ``llamacpp_omni`` backend.

    Attributes:
        url: server base URL, ``http://host:port`` (a ``ws://`` URL is accepted too).
        server: ``auto`` (detect), ``llama-omni-server`` or ``llama-server``.
        transport: ``websocket`` (llama-omni-server ``WS /backend``, audio in the socket) or ``http``
            (``/v1/stream/*``, speech as WAV files on a disk shared with the server).
        ws_path: WebSocket route of llama-omni-server.
        connect_timeout_s: TCP/WebSocket connect deadline.
        read_timeout_s: deadline of one ordinary request (prefill, break, session close).
        init_timeout_s: deadline of ``omni_init`` / ``session.init`` (the server loads models).
        init_busy_wait_s: how long ``prepare`` keeps retrying a ``session.init`` the server refuses
            because its previous session is still being torn down (WebSocket).
        health_timeout_s: how long ``prepare`` waits for ``GET /health`` to say ok.
        decode_timeout_s: longest wait for any server event or decode frame before BackendTimeout.
            In the node and replay, ``read_timeout_s`` and ``decode_timeout_s`` are derived from
            ``flow.backend_deadline_ms`` (40 % each), ``health_timeout_s`` and ``init_timeout_s``
            from ``flow.prepare_deadline_ms`` (20 %, 60 %), unless set (:attr:`FLOW_DEADLINE_SHARES`).
        unit_quiet_s: WebSocket: silence after which a unit the server does not answer counts as idle.
        audio_wait_s: how long a turn's first speaking unit waits for its first speech (HTTP), and
            the first listening unit after speech for the turn's final window (HTTP: up to
            ``generation_done.flag``; WebSocket: up to the first late audio delta).
        poll_interval_s: WAV folder / health polling period.
        retries: extra attempts for calls that are safe to repeat; backoff_s / backoff_max_s shape
            the exponential delay between them.
        work_dir: folder shared with the server (HTTP): unit WAVs/JPEGs go to ``work_dir/in``, the
            server writes speech to ``work_dir/out/tts_wav``. Empty: a private temporary folder,
            which only works when the server runs on this machine.
        model_dir: llama-server's GGUF folder for ``omni_init`` (required with llama-server over
            HTTP; llama-omni-server ignores it and uses the folder of its own ``-m``).
        tts_bin_dir: llama-server's token2wav folder (empty: the server's ``model_dir/token2wav-gguf``).
        token2wav_device: where token2wav runs (llama-server's own default ``gpu:1`` needs two GPUs).
        n_predict: generation limit passed to ``omni_init``.
        voice_audio: HTTP: server-side path of a 16 kHz reference-voice WAV, used when prepare gets
            no ref_voice (empty: the server's default voice).
        max_slice_nums: image slices per frame (1 = 64 tokens, what duplex uses).
        jpeg_quality: JPEG quality for frames.
        use_tts: ask the server for speech.
        delete_consumed: delete input files and consumed output WAVs (keeps the disk bounded).
        sliding_window_mode: llama-server context sliding window: ``off``, ``basic`` or ``context``.
        sliding_window_high_water: KV length (tokens) at which the window slides.
        sliding_window_low_water: KV length the window slides back to.
        temperature: LLM sampling temperature (WebSocket; negative: server default).
        top_p: LLM nucleus sampling (WebSocket; negative: server default).
        top_k: LLM top-k (WebSocket; negative: server default).
        length_penalty: speak-length penalty (WebSocket; llama-omni-server HTTP decode; negative: default).
        listen_prob_scale: scales the listen probability (WebSocket; negative: server default).
        force_listen_count: units forced to listen at session start (WebSocket; negative: server default).
        max_new_speak_tokens_per_chunk: speak tokens per unit (WebSocket; negative: server default).
        tts_temperature: TTS sampling temperature (WebSocket; negative: server default).
    """

    url: str = "http://127.0.0.1:8080"
    server: str = "auto"
    transport: str = "websocket"
    ws_path: str = "/backend"
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 10.0
    init_timeout_s: float = 120.0
    init_busy_wait_s: float = 10.0
    health_timeout_s: float = 30.0
    decode_timeout_s: float = 10.0
    unit_quiet_s: float = 0.8
    audio_wait_s: float = 0.5
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
    sliding_window_mode: str = "off"
    sliding_window_high_water: int = 4000
    sliding_window_low_water: int = 3500
    temperature: float = -1.0
    top_p: float = -1.0
    top_k: int = -1
    length_penalty: float = -1.0
    listen_prob_scale: float = -1.0
    force_listen_count: int = -1
    max_new_speak_tokens_per_chunk: int = -1
    tts_temperature: float = -1.0

    #: Timeouts that one flow deadline bounds (one owner: ``omni_ros.ros._setup.node_setup``
    #: derives them from ``flow.backend_deadline_ms`` / ``flow.prepare_deadline_ms`` unless set):
    #: field -> (FlowConfig deadline, share). Those of one deadline run one after the other within
    #: one call (prefill then decode; health then init), so their shares add up to below 1.
    FLOW_DEADLINE_SHARES: ClassVar[dict[str, tuple[str, float]]] = {
        "read_timeout_s": ("backend_deadline_ms", 0.4),
        "decode_timeout_s": ("backend_deadline_ms", 0.4),
        "health_timeout_s": ("prepare_deadline_ms", 0.2),
        "init_timeout_s": ("prepare_deadline_ms", 0.6),
    }

    def __post_init__(self) -> None:
        name = "LlamaCppOmniConfig"
        if self.transport not in ("http", "websocket"):
            raise ConfigError(
                f"{name}.transport = {self.transport!r}; choose 'websocket' (llama-omni-server "
                "/backend) or 'http' (/v1/stream/*, shared disk)"
            )
        if self.server not in _SERVERS:
            raise ConfigError(f"{name}.server = {self.server!r}; choose one of {list(_SERVERS)}")
        if not re.match(r"^(https?|wss?)://[^/]+", self.url):
            raise ConfigError(f"{name}.url = {self.url!r}; expected http://host:port")
        for key in (
            "connect_timeout_s",
            "read_timeout_s",
            "init_timeout_s",
            "health_timeout_s",
            "decode_timeout_s",
            "unit_quiet_s",
            "poll_interval_s",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{name}.{key} must be > 0, got {getattr(self, key)}")
        if self.unit_quiet_s >= self.decode_timeout_s:
            raise ConfigError(
                f"{name}.unit_quiet_s ({self.unit_quiet_s}) must be below decode_timeout_s "
                f"({self.decode_timeout_s}): a quiet unit is idle, a silent server is a timeout"
            )
        if self.audio_wait_s < 0 or self.init_busy_wait_s < 0:
            raise ConfigError(f"{name}.audio_wait_s and init_busy_wait_s must be >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"{name}.jpeg_quality must be in 1..100")
        if self.max_slice_nums < 1:
            raise ConfigError(f"{name}.max_slice_nums must be >= 1, got {self.max_slice_nums}")
        if self.n_predict < 1:
            raise ConfigError(f"{name}.n_predict must be >= 1, got {self.n_predict}")
        _wire.Backoff(self.retries, self.backoff_s, self.backoff_max_s)
        self._check_window()
        self._check_sampling()
        self._check_server_fit()

    def _check_window(self) -> None:
        name = "LlamaCppOmniConfig"
        if self.sliding_window_mode not in _WINDOW_MODES:
            raise ConfigError(
                f"{name}.sliding_window_mode = {self.sliding_window_mode!r}; choose one of "
                f"{list(_WINDOW_MODES)}"
            )
        if not 0 < self.sliding_window_low_water < self.sliding_window_high_water:
            raise ConfigError(
                f"{name}: need 0 < sliding_window_low_water ({self.sliding_window_low_water}) < "
                f"sliding_window_high_water ({self.sliding_window_high_water})"
            )

    def _check_sampling(self) -> None:
        name = "LlamaCppOmniConfig"
        for key in ("temperature", "length_penalty", "listen_prob_scale", "tts_temperature"):
            value = getattr(self, key)
            if value >= 0 and not (value > 0 or key == "temperature"):
                raise ConfigError(f"{name}.{key} must be > 0 (or negative for the server default)")
        if self.top_p >= 0 and not 0 < self.top_p <= 1:
            raise ConfigError(f"{name}.top_p must be in (0, 1] (or negative for the default)")
        if self.max_new_speak_tokens_per_chunk == 0:
            raise ConfigError(f"{name}.max_new_speak_tokens_per_chunk must be >= 1 (or negative)")

    def _check_server_fit(self) -> None:
        """Reject at configure what the named server cannot do (``auto`` is checked at prepare)."""
        name = "LlamaCppOmniConfig"
        if self.transport == "websocket":
            if self.server == LLAMA_SERVER:
                raise ConfigError(
                    f"{name}: llama-server has no WebSocket /backend (only llama-omni-server has); "
                    "use transport: http with llama-server, or run llama-omni-server"
                )
            if self.voice_audio:
                raise ConfigError(
                    f"{name}.voice_audio is a server-side WAV path used by transport: http; over "
                    "websocket the voice travels in session.init (set the node's ref_voice_path)"
                )
        if self.transport == "http" and not self.model_dir:
            if self.server == LLAMA_SERVER:
                raise ConfigError(
                    f"{name}.model_dir is empty: llama-server's omni_init then looks for the GGUFs "
                    "under ./tools/omni/convert/gguf/ relative to its own working directory; set "
                    "model_dir to the server-side folder holding audio/, vision/, tts/"
                )
            if self.server == "auto":
                raise ConfigError(
                    f"{name}: transport http with server auto needs model_dir (used if the server "
                    "is llama-server); or name the server: server: llama-omni-server"
                )
        # Over websocket the server can only be llama-omni-server; over http "auto" waits for prepare.
        server = LLAMA_OMNI_SERVER if self.transport == "websocket" else self.server
        unsupported = self.unsupported_settings(server) if server != "auto" else []
        if unsupported:
            raise ConfigError(
                f"{name}: {server} over {self.transport} cannot take {unsupported}; leave them "
                "at their defaults (see docs/BACKEND_LLAMACPP.md for which server takes what)"
            )

    def sampling(self) -> dict[str, float | int]:
        """The sampling settings that are set (non-negative), by server key."""
        return {key: getattr(self, key) for key in _WS_SAMPLING if getattr(self, key) >= 0}

    def unsupported_settings(self, server: str) -> list[str]:
        """Settings that are set but that ``server`` over this transport cannot honour."""
        wanted = list(self.sampling())
        window = self.sliding_window_mode != "off"
        if self.transport == "websocket" or server == LLAMA_OMNI_SERVER:
            allowed = _WS_SAMPLING if self.transport == "websocket" else _HTTP_OMNI_SAMPLING
            bad = [key for key in wanted if key not in allowed]
            return bad + (["sliding_window_mode"] if window else [])
        return wanted  # llama-server's HTTP API takes no sampling settings

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


def system_suffix(prompt: str) -> str | None:
    """The prompt text as the server's system-prompt suffix, or None for the server's default.

    The server evaluates ``<|im_start|>system\\n...<|audio_start|>`` + voice + this suffix; the
    suffix must close the audio and the system block (omni.cpp ``stream_prefill`` index 0).

    Raises:
        ConfigError: the text holds a template token that would open or close a block.
    """
    text = prompt.strip()
    if not text or text == DEFAULT_SYSTEM_PROMPT:
        return None
    bad = [token for token in _TEMPLATE_TOKENS if token in text]
    if bad:
        raise ConfigError(
            f"system_prompt contains template token(s) {bad}; give plain text (the backend closes "
            "the server's system block itself)"
        )
    return f"<|audio_end|>{text}<|im_end|>\n"


# ------------------------------------------------------------------------------- shared HTTP pieces


class _Http:
    """Small httpx wrapper: errors of both server generations mapped to the omni_ros family."""

    def __init__(self, config: LlamaCppOmniConfig) -> None:
        self._cfg = config
        self.base = config.http_base
        self.client = httpx.Client(
            timeout=httpx.Timeout(config.read_timeout_s, connect=config.connect_timeout_s),
            trust_env=False,  # a robot's HTTP(S)_PROXY must never capture a local inference server
        )
        self._streams_lock = threading.Lock()
        self._stream_sockets: set[Any] = set()

    @contextlib.contextmanager
    def stream(self, method: str, url: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """``client.stream`` whose socket :meth:`close` can shut down from another thread."""
        with self.client.stream(method, url, **kwargs) as resp:
            # httpcore 1.0 puts its network stream in the response extensions
            # (_sync/http11.py: handle_request) and SyncStream.get_extra_info("socket") returns
            # the socket (_backends/sync.py).
            stream = resp.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with self._streams_lock:
                    self._stream_sockets.add(sock)
            try:
                yield resp
            finally:
                if sock is not None:
                    with self._streams_lock:
                        self._stream_sockets.discard(sock)

    def close(self) -> None:
        """Close the client; a streamed decode still reading on another thread ends at once.

        ``httpx.Client.close()`` does not wake a read blocked in another thread: that read went
        on until ``decode_timeout_s`` (then ``EBADF``). Shutting its socket down does (POSIX:
        a blocked ``recv`` returns), and the decode raises BackendUnavailable.
        """
        import socket

        with self._streams_lock:
            sockets = list(self._stream_sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.client.close()

    def wait_health(self) -> None:
        """Poll ``GET /health`` until ok (llama-server answers 503 while loading its model)."""
        url = f"{self.base}/health"
        deadline = time.monotonic() + self._cfg.health_timeout_s
        last = "no answer"
        while True:
            try:
                resp = self.client.get(url, timeout=self._cfg.connect_timeout_s)
                if resp.status_code == 200 and _safe_json(resp).get("status") == "ok":
                    return
                last = f"HTTP {resp.status_code} {resp.text[:200]!r}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                break
            time.sleep(min(0.05, self._cfg.health_timeout_s))
        raise BackendUnavailable(
            f"llama.cpp-omni server at {self.base} is not healthy after "
            f"{self._cfg.health_timeout_s} s ({last}); {_START_HINT}"
        )

    def detect(self) -> str:
        """Which generation answers: llama-server serves ``/v1/models``, llama-omni-server has no route."""
        url = f"{self.base}/v1/models"
        try:
            resp = self.client.get(url, timeout=self._cfg.read_timeout_s)
        except httpx.HTTPError as exc:
            raise _convert_httpx(exc, url, "server detection") from None
        if resp.status_code == 200:
            return LLAMA_SERVER
        if resp.status_code == 404:
            return LLAMA_OMNI_SERVER
        raise BackendProtocolError(
            f"cannot tell the llama.cpp-omni server generation at {self.base}: GET /v1/models "
            f"answered HTTP {resp.status_code}; set server: llama-server or llama-omni-server"
        )

    def post(
        self, endpoint: str, body: dict[str, Any], *, timeout: float, idempotent: bool
    ) -> dict[str, Any]:
        url = f"{self.base}/v1/stream/{endpoint}"
        delays = iter(self._cfg.backoff.delays())
        while True:
            try:
                resp = self.client.post(
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
                raise_for_error(self.base, endpoint, resp)
            return _json_object(resp.text, f"{endpoint} response")


class _ContextLost(BackendUnavailable):
    """The server has no omni context (it restarted, or was never initialised)."""


def raise_for_error(base: str, endpoint: str, resp: httpx.Response) -> None:
    """Raise the omni_ros error for a non-200 answer of either server generation.

    llama-server: ``{"error":{"code","message","type"}}`` with status = code (server.cpp
    ``format_error_response``/``res_error``); llama-omni-server: ``{"error":{"message","type"}}``
    without a code, so every error is a 500 (server-omni.cpp ``res_error``).
    """
    body = _safe_json(resp)
    raw_err = body.get("error")
    err: dict[str, Any] = raw_err if isinstance(raw_err, dict) else {}
    message = str(err.get("message") or resp.text[:300] or f"HTTP {resp.status_code}")
    if message.startswith("omni context not initialized"):
        raise _ContextLost(
            f"llama.cpp-omni server at {base} has no omni context ({message}); it was restarted "
            "or never initialised: prepare() opens it again"
        )
    if resp.status_code == 404:
        raise BackendProtocolError(
            f"llama.cpp-omni server at {base} has no /v1/stream/{endpoint} (HTTP 404): wrong "
            "server generation? (llama-omni-server has no break/reset)"
        )
    if resp.status_code >= 500:
        raise BackendError(
            f"llama.cpp-omni {endpoint} failed on the server: HTTP {resp.status_code} {message}"
        )
    raise BackendProtocolError(
        f"llama.cpp-omni rejected {endpoint}: HTTP {resp.status_code} {message}"
    )


# ------------------------------------------------------------------------------------- HTTP transport


class _WavReader:
    """Reads the server's speech WAVs from ``tts_wav/`` strictly in index order.

    token2wav writes ``wav_<n>.wav`` (n from 0, PCM16 24 kHz, header first, so a file can be seen
    half-written) and ``generation_done.flag`` holding the turn's last index after its final window
    (omni.cpp ``t2w_thread_func``).
    """

    def __init__(self, wav_dir: Path, delete_consumed: bool) -> None:
        self.dir = wav_dir
        self.delete_consumed = delete_consumed
        self.next_index = 0
        self.skipped = 0
        #: Take the lowest index present next (after a reset the server's numbering carries on).
        self.resync = True

    def clear(self, *, resync: bool = False) -> int:
        """Delete every WAV and the flag; expect ``wav_0`` next (or, ``resync``, any index)."""
        count = 0
        with contextlib.suppress(FileNotFoundError):
            for path in self.dir.iterdir():
                if _WAV_NAME.match(path.name):
                    path.unlink(missing_ok=True)
                    count += 1
        (self.dir / _DONE_FLAG).unlink(missing_ok=True)
        self.next_index = 0
        self.resync = resync
        return count

    def take(self) -> tuple[list[FloatArray], bool]:
        """Take the complete WAVs due next; return ``(chunks, turn_done)``."""
        chunks: list[FloatArray] = []
        if self.resync:
            present = self._indices()
            if not present:
                return chunks, False
            # token2wav numbers WAVs per thread and only /break restarts it at 0 (omni.cpp
            # t2w_thread_func), so after omni_init/reset/update_session_config it may carry on.
            self.next_index = present[0]
            self.resync = False
        while True:
            path = self.dir / f"wav_{self.next_index}.wav"
            read = _wire.read_complete_wav(path)
            if read is None:
                last = self._flag_index()
                if last is not None and last >= self.next_index and not path.exists():
                    # The flag says this index was the turn's; a file that never came is skipped.
                    self.skipped += 1
                    self.next_index += 1
                    continue
                break
            samples, rate = read
            if rate != OUTPUT_SAMPLE_RATE:
                raise BackendProtocolError(
                    f"{path} is {rate} Hz; llama.cpp-omni writes {OUTPUT_SAMPLE_RATE} Hz"
                )
            chunks.append(samples)
            if self.delete_consumed:
                path.unlink(missing_ok=True)
            else:
                path.rename(path.with_suffix(f".{uuid.uuid4().hex[:6]}.consumed"))
            self.next_index += 1
        last = self._flag_index()
        done = last is not None and last < self.next_index
        if done:
            (self.dir / _DONE_FLAG).unlink(missing_ok=True)
        return chunks, done

    def _indices(self) -> list[int]:
        found: list[int] = []
        with contextlib.suppress(FileNotFoundError):
            for path in self.dir.iterdir():
                match = _WAV_NAME.match(path.name)
                if match:
                    found.append(int(match.group(1)))
        return sorted(found)

    def _flag_index(self) -> int | None:
        try:
            text = (self.dir / _DONE_FLAG).read_text().strip()
        except (FileNotFoundError, OSError):
            return None
        try:
            return int(text)
        except ValueError:
            return None  # still being written


class _HttpSession:
    """One duplex conversation over ``/v1/stream/*`` + a shared folder (either server generation)."""

    def __init__(self, config: LlamaCppOmniConfig, work_dir: Path, counters: dict[str, int]):
        # Nothing touches the disk before open(): constructing a backend must not create folders.
        self._cfg = config
        self._http = _Http(config)
        self._in_dir = work_dir / "in"
        self._out_dir = work_dir / "out"
        self.wavs = _WavReader(self._out_dir / "tts_wav", config.delete_consumed)
        self._counters = counters
        self.server = config.server
        self._server_has_context = False
        #: llama-server's answer to a failed omni_init: a second omni_init would crash it.
        self._failed_init: str | None = None
        self._cnt = 1
        #: After /break: every WAV seen before the next speaking decode is stale.
        self.stale_guard = False
        #: llama-omni-server (no /break): speech of an interrupted turn is dropped until its end.
        self.dropping = False

    # ----------------------------------------------------------------------------------- lifecycle
    def open(self, voice_path: str, suffix: str | None) -> None:
        """Health, detection, (re)initialisation, then the index-0 system prompt prefill."""
        self._http.wait_health()
        detected = self._http.detect() if self._cfg.server == "auto" else self._cfg.server
        if self.server not in ("auto", detected):
            self._server_has_context = False  # another generation now answers on that port
        self.server = detected
        _check_fit(self._cfg, detected)
        self._in_dir.mkdir(parents=True, exist_ok=True)
        self.wavs.dir.mkdir(parents=True, exist_ok=True)
        self.wavs.clear(resync=True)
        self.stale_guard = self.dropping = False
        if detected == LLAMA_SERVER and self._server_has_context:
            try:
                # Clears LLM + TTS KV and the system prompt without reloading models (server.cpp
                # handle_stream_update_session_config_impl); the window settings ride along.
                self._http.post(
                    "update_session_config",
                    {"media_type": 2, "duplex_mode": True, **self._window()},
                    timeout=self._cfg.init_timeout_s,
                    idempotent=True,
                )
            except _ContextLost:
                self._server_has_context = False
        if not (detected == LLAMA_SERVER and self._server_has_context):
            self._omni_init(detected, suffix)
            self._server_has_context = True
        if suffix is not None and detected == LLAMA_SERVER:
            log.warning(
                "llama-server's HTTP API has no field for the system prompt; it is not sent "
                "(llama-omni-server takes it, over websocket or http)"
            )
        # Index 0 opens the system prompt with this voice ("" = the server's default voice); a
        # first user unit would otherwise become the voice (cnt 0) or never finish (cnt > 0).
        self._http.post(
            "prefill",
            {"audio_path_prefix": voice_path, "cnt": 0, "max_slice_nums": self._cfg.max_slice_nums},
            timeout=self._cfg.init_timeout_s,
            idempotent=False,
        )
        self._cnt = 1

    def _omni_init(self, server: str, suffix: str | None) -> None:
        if server == LLAMA_SERVER and self._failed_init is not None:
            # Seen on llama-server 0788f99: an omni_init after a failed one segfaults the process.
            raise BackendError(
                f"{self._failed_init} (not retried: a second omni_init after a failed one crashes "
                "llama-server; fix the model files and restart it, then reconfigure)"
            )
        body: dict[str, Any] = {
            "media_type": 2,
            "use_tts": self._cfg.use_tts,
            "duplex_mode": True,
            "token2wav_device": self._cfg.token2wav_device,
            "output_dir": str(self._out_dir),
            "n_predict": self._cfg.n_predict,
        }
        if server == LLAMA_SERVER:
            if not self._cfg.model_dir:
                raise ConfigError(
                    "llamacpp_omni: the server is llama-server, whose omni_init needs model_dir "
                    "(else it looks under ./tools/omni/convert/gguf/ of its working directory)"
                )
            body["model_dir"] = self._cfg.model_dir
            if self._cfg.tts_bin_dir:
                body["tts_bin_dir"] = self._cfg.tts_bin_dir
        else:
            if self._cfg.model_dir:
                log.warning(
                    "llama-omni-server ignores model_dir %r: it uses the folder of its own -m",
                    self._cfg.model_dir,
                )
            if suffix is not None:
                body["assistant_prompt"] = (
                    suffix  # server-omni.cpp omni_init: omni_assistant_prompt
                )
        try:
            self._http.post("omni_init", body, timeout=self._cfg.init_timeout_s, idempotent=True)
        except (BackendUnavailable, BackendTimeout):
            raise
        except BackendError as exc:
            if server == LLAMA_SERVER:
                self._failed_init = str(exc)
            raise
        if server == LLAMA_SERVER and self._cfg.sliding_window_mode != "off":
            self._http.post(
                "update_session_config",
                {"media_type": 2, "duplex_mode": True, **self._window()},
                timeout=self._cfg.init_timeout_s,
                idempotent=True,
            )

    def _window(self) -> dict[str, Any]:
        return {
            "sliding_window_mode": self._cfg.sliding_window_mode,
            "sliding_window_high_water": self._cfg.sliding_window_high_water,
            "sliding_window_low_water": self._cfg.sliding_window_low_water,
        }

    # ------------------------------------------------------------------------------------- units
    def prefill(self, unit: Unit) -> None:
        if self.stale_guard:
            # Anything written since /break belongs to the interrupted turn (see module doc).
            self._counters["stale_wavs_dropped"] += self.wavs.clear()
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
            self._http.post("prefill", body, timeout=self._cfg.read_timeout_s, idempotent=False)
        finally:
            if self._cfg.delete_consumed:
                audio_path.unlink(missing_ok=True)
                if img_path is not None:
                    img_path.unlink(missing_ok=True)
        self._cnt += 1

    def decode(self) -> tuple[bool, str, dict[str, float]]:
        """Run one decode; return ``(is_listen, text, timings_ms)``."""
        t0 = time.perf_counter()
        url = f"{self._http.base}/v1/stream/decode"
        body: dict[str, Any] = {"stream": True}
        if self.server == LLAMA_OMNI_SERVER and self._cfg.length_penalty >= 0:
            body["length_penalty"] = self._cfg.length_penalty  # server-omni.cpp decode handler
        if self.stale_guard:
            # The window token2wav was rendering during /break has been written by now.
            self._counters["stale_wavs_dropped"] += self.wavs.clear()
        is_listen = False
        texts: list[str] = []
        done = False
        # A per-read deadline: each frame must come within decode_timeout_s.
        timeout = httpx.Timeout(self._cfg.decode_timeout_s, connect=self._cfg.connect_timeout_s)
        deadline = time.monotonic() + self._cfg.decode_timeout_s
        try:
            with self._http.stream("POST", url, json=body, timeout=timeout) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise_for_error(self._http.base, "decode", resp)
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
        if not is_listen and texts:
            # A decode that speaks starts new speech (cleared above): stop dropping.
            self.stale_guard = False
            self.dropping = False
        return is_listen, "".join(texts), {"decode": (time.perf_counter() - t0) * 1e3}

    def collect(self, wait_s: float, until_done: bool) -> tuple[FloatArray | None, bool]:
        """Take the WAVs due; wait up to ``wait_s`` for the first one (or, ``until_done``, the flag)."""
        deadline = time.monotonic() + wait_s
        chunks: list[FloatArray] = []
        done = False
        while True:
            got, done = self.wavs.take()
            chunks += got
            if done or (chunks and not until_done) or time.monotonic() >= deadline:
                break
            time.sleep(self._cfg.poll_interval_s)
        if self.stale_guard or self.dropping:
            self._counters["interrupted_wavs_dropped"] += len(chunks)
            if done:
                self.dropping = False  # the interrupted turn's audio has all come
            return None, False
        return (np.concatenate(chunks).astype(np.float32) if chunks else None), done

    def break_generation(self) -> None:
        """Barge-in: /break on llama-server; llama-omni-server has none (drop until turn end)."""
        if self.server == LLAMA_SERVER:
            self._http.post(
                "break", {"reason": "barge_in"}, timeout=self._cfg.read_timeout_s, idempotent=True
            )
            # token2wav restarts numbering at 0 and may still write the window it was rendering.
            self._counters["interrupted_wavs_dropped"] += self.wavs.clear()
            self.stale_guard = True
        else:
            self.dropping = True

    def reset(self) -> None:
        if self.server == LLAMA_SERVER:
            self._http.post("reset", {}, timeout=self._cfg.read_timeout_s, idempotent=True)
        else:
            self._server_has_context = False  # no /reset: prepare() runs omni_init again
        self.wavs.clear(resync=True)
        self._cnt = 1

    def forget_server(self) -> None:
        """The server may have restarted: the next open() must run omni_init again."""
        self._server_has_context = False

    def close(self) -> None:
        self._http.close()


def _check_fit(config: LlamaCppOmniConfig, server: str) -> None:
    unsupported = config.unsupported_settings(server)
    if unsupported:
        raise ConfigError(
            f"llamacpp_omni: the server at {config.http_base} is {server}, which over "
            f"{config.transport} cannot take {unsupported}; leave them at their defaults or set "
            "server to a generation that takes them (docs/BACKEND_LLAMACPP.md)"
        )
    if config.transport == "websocket" and server == LLAMA_SERVER:
        raise ConfigError(
            f"llamacpp_omni: the server at {config.http_base} is llama-server, which has no "
            "WebSocket /backend; use transport: http, or run llama-omni-server"
        )


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


class _SessionRefused(Exception):
    """The server closed the socket after session.init without a session.created."""


@dataclass
class _WsUnit:
    """What one unit's events said."""

    kind: str  # "speak" | "listen" | "idle"
    text: str
    audio: list[FloatArray]


class _WsSession:
    """One llama-omni-server ``/backend`` session (full_duplex mode)."""

    def __init__(self, config: LlamaCppOmniConfig, counters: dict[str, int]) -> None:
        self._cfg = config
        self._http = _Http(config)
        self._counters = counters
        self._conn: Any = None
        self.session_id = ""
        self.server_metrics: dict[str, float] = {}
        self._seq = 0
        #: When the oldest unit the server has not said anything about since was sent.
        self._waiting_since: float | None = None
        #: Drop speech (an interrupted turn's) until a response newer than this one speaks.
        self._drop_until_seq: int | None = None

    def open(self, suffix: str | None, ref_voice: FloatArray | None) -> None:
        """Connect and start a session; retry while the server still tears the last one down."""
        self.close()
        self._http.wait_health()
        if self._cfg.server == "auto":
            _check_fit(self._cfg, self._http.detect())
        payload: dict[str, Any] = {"mode": "full_duplex", "use_tts": self._cfg.use_tts}
        if suffix is not None:
            payload["system_prompt"] = suffix
        if ref_voice is not None:
            # protocol.cpp parse_session_init: voice.ref_audio, base64 float32 PCM 16 kHz mono.
            payload["voice"] = {"ref_audio": _wire.b64encode(_wire.float_to_f32le(ref_voice))}
        if self._cfg.sampling():
            payload["config"] = self._cfg.sampling()  # ws_handler.cpp apply_session_config
        busy_deadline = time.monotonic() + self._cfg.init_busy_wait_s
        delay = max(self._cfg.backoff_s, 0.01)
        while True:
            try:
                self._start(payload)
                return
            except _SessionRefused as exc:
                self.close()
                if time.monotonic() + delay > busy_deadline:
                    raise BackendUnavailable(
                        f"llama.cpp-omni at {self._cfg.ws_url} refused session.init for "
                        f"{self._cfg.init_busy_wait_s} s ({exc}); another client holds its one "
                        "session, or the last one is still being torn down"
                    ) from None
                self._counters["init_retries"] += 1
                time.sleep(delay)
                delay = min(delay * 2.0, max(self._cfg.backoff_max_s, 0.01))

    def _start(self, payload: dict[str, Any]) -> None:
        from websockets.exceptions import InvalidHandshake, WebSocketException

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
                        f"llama.cpp-omni WebSocket {url} is not reachable ({type(exc).__name__}: "
                        f"{exc}); {_START_HINT}"
                    ) from None
                time.sleep(delay)
        self._send({"type": "session.init", "payload": payload})
        deadline = time.monotonic() + self._cfg.init_timeout_s
        for _ in range(_MAX_EVENTS_PER_UNIT):
            event = self._recv(deadline, "session.init", refused_ok=True)
            kind = event.get("type")
            if kind == "session.created":
                self.session_id = str(event.get("session_id", ""))
                self._seq = 0
                self._drop_until_seq = None
                self._waiting_since = None
                self._take_metrics(event)
                return
            self._raise_if_error(event)
        raise BackendProtocolError("llama.cpp-omni sent no session.created after session.init")

    def prefill(self, unit: Unit, force_listen: bool) -> None:
        frames = (
            [_wire.b64encode(_wire.jpeg_bytes(unit.frames[-1].rgb, self._cfg.jpeg_quality))]
            if unit.frames
            else []
        )
        if force_listen:
            self._drop_until_seq = self._seq + 1
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
        self._seq += 1
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()

    def drop_current(self) -> None:
        """A late barge-in: drop what the running unit and the interrupted turn still send."""
        self._drop_until_seq = self._seq

    def collect(self) -> _WsUnit:
        """Read events until this unit's listen / response.done, or until it has been quiet."""
        texts: list[str] = []
        audio: list[FloatArray] = []
        quiet_from = time.monotonic()
        for _ in range(_MAX_EVENTS_PER_UNIT):
            quiet_at = quiet_from + self._cfg.unit_quiet_s
            waiting = self._waiting_since if self._waiting_since is not None else quiet_from
            dead_at = waiting + self._cfg.decode_timeout_s
            event = self._recv(min(quiet_at, dead_at), "decode", quiet_ok=True)
            if event is None:
                if time.monotonic() >= dead_at - 1e-3:
                    self.close()
                    raise BackendTimeout(
                        f"llama.cpp-omni at {self._cfg.ws_url} sent nothing for "
                        f"{self._cfg.decode_timeout_s} s (decode_timeout_s)"
                    )
                self._counters["idle_units"] += 1
                return _WsUnit("idle", "".join(texts), audio)
            quiet_from = time.monotonic()
            self._waiting_since = None  # the server is alive
            terminal = self._handle(event, texts, audio)
            if terminal is not None:
                return _WsUnit(terminal, "".join(texts), audio)
        raise BackendProtocolError("llama.cpp-omni sent too many events for one unit")

    def wait_audio(self, wait_s: float) -> tuple[str, list[FloatArray]]:
        """After a unit's answer: wait up to ``wait_s`` for late speech (the turn's final window).

        Returns as soon as audio came (plus what follows within a few ms), with any late text.
        """
        texts: list[str] = []
        audio: list[FloatArray] = []
        deadline = time.monotonic() + wait_s
        for _ in range(_MAX_EVENTS_PER_UNIT):
            event = self._recv(deadline, "late speech", quiet_ok=True)
            if event is None:
                break
            self._take_metrics(event)
            self._handle(event, texts, audio)
            if audio:
                deadline = min(deadline, time.monotonic() + 0.02)
        return "".join(texts), audio

    def _handle(
        self, event: dict[str, Any], texts: list[str], audio: list[FloatArray]
    ) -> str | None:
        """Fold one event into ``texts``/``audio``; return "listen"/"speak" if it ends this unit."""
        self._take_metrics(event)
        kind = event.get("type")
        seq = self._event_seq(event)
        current = seq is None or seq >= self._seq
        if kind == "response.output.delta":
            delta = event.get("kind")
            if delta == "audio":
                # Labelled with whatever response was current when token2wav finished the window:
                # it belongs to the speech stream, not to that unit.
                samples = _wire.f32le_to_float(_wire.b64decode(event.get("audio"), "audio delta"))
                if self._drop_until_seq is not None:
                    self._counters["interrupted_audio_dropped"] += 1
                elif samples.size:
                    audio.append(samples)
            elif delta == "text":
                text = event.get("text", "")
                if not isinstance(text, str):
                    raise BackendProtocolError(f"text delta is not a string: {event!r}")
                if self._drop_until_seq is not None:
                    if seq is not None and seq <= self._drop_until_seq:
                        return None  # the interrupted turn's text
                    self._drop_until_seq = None  # a newer response speaks
                if not current:
                    self._counters["late_events"] += 1
                texts.append(text)
            elif delta == "listen":
                if current:
                    return "listen"
                self._counters["late_events"] += 1
            else:
                raise BackendProtocolError(f"unknown response.output.delta kind {delta!r}")
        elif kind == "response.done":
            if current:
                if not texts and isinstance(event.get("text"), str):
                    texts.append(event["text"])
                return "speak"
            self._counters["late_events"] += 1
        else:
            self._raise_if_error(event)
        return None

    def end_session(self) -> None:
        """Close the session and wait for its teardown (POST /sessions/{id}/close), then the socket."""
        sid, self.session_id = self.session_id, ""
        if sid and self._conn is not None:
            url = f"{self._http.base}/sessions/{sid}/close"
            with contextlib.suppress(httpx.HTTPError):
                self._http.client.post(url, timeout=self._cfg.read_timeout_s)
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def shutdown(self) -> None:
        self.end_session()
        self._http.close()

    # ------------------------------------------------------------------------------------- helpers
    def _event_seq(self, event: Mapping[str, Any]) -> int | None:
        """The unit number of an event: response ids are ``<session>_resp_<n>`` (ws_handler.cpp)."""
        rid = event.get("response_id")
        if not isinstance(rid, str):
            return None
        match = _RESPONSE_ID.search(rid)
        return int(match.group(1)) if match else None

    def _take_metrics(self, event: Mapping[str, Any]) -> None:
        metrics = event.get("metrics")
        if not isinstance(metrics, dict):
            return
        for key in _SERVER_METRICS:
            value = metrics.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.server_metrics[key] = float(value)

    def _send(self, message: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed

        conn = self._conn  # close() on another thread may set it to None meanwhile
        if conn is None:
            raise BackendUnavailable(f"no connection to {self._cfg.ws_url}; call prepare()")
        try:
            conn.send(json.dumps(message))
        except (ConnectionClosed, OSError) as exc:
            self.close()
            raise BackendUnavailable(
                f"llama.cpp-omni WebSocket {self._cfg.ws_url} closed ({exc})"
            ) from None

    def _recv(
        self, deadline: float, what: str, *, quiet_ok: bool = False, refused_ok: bool = False
    ) -> Any:
        from websockets.exceptions import ConnectionClosed

        conn = self._conn  # close() on another thread may set it to None meanwhile
        if conn is None:
            raise BackendUnavailable(f"no connection to {self._cfg.ws_url}; call prepare()")
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            # One reader per connection (websockets: a second recv() is ConcurrencyError); close()
            # never reads here (its session close is an HTTP POST), and websockets' close() is safe
            # while this recv() waits (it raises ConnectionClosed: sync/messages.py: Assembler.close).
            raw = conn.recv(timeout=remaining)
        except TimeoutError:
            if quiet_ok:
                return None
            # The socket is now mid-unit: a late answer would be taken for the next unit's. Start over.
            self.close()
            raise BackendTimeout(f"llama.cpp-omni {what} at {self._cfg.ws_url} timed out") from None
        except (ConnectionClosed, OSError) as exc:
            self.close()
            if refused_ok:
                raise _SessionRefused(f"socket closed without session.created: {exc}") from None
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
            diag = event.get("diagnostic")
            detail = diag.get("message") if isinstance(diag, dict) else ""
            raise BackendUnavailable(
                f"llama.cpp-omni closed the session: reason {event.get('reason')!r} {detail or ''}".strip()
            )


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
        self._counters: dict[str, int] = {
            key: 0
            for key in (
                "units",
                "speaking_units",
                "tail_units",
                "idle_units",
                "late_events",
                "interrupted_audio_dropped",
                "interrupted_wavs_dropped",
                "stale_wavs_dropped",
                "dropped_texts",
                "init_retries",
                "sessions_opened",
            )
        }
        self._http: _HttpSession | None = None
        self._ws: _WsSession | None = None
        if config.transport == "http":
            self._http = _HttpSession(config, self._work_dir, self._counters)
        else:
            self._ws = _WsSession(config, self._counters)
        self._prepared = False
        self._needs_reopen = False
        self._prefilled = False
        self._force_listen = False
        self._units_since_prepare = 0
        self._turn_open = False
        self._turn_audio = False
        #: The last result had text (a speaking unit, not a tail).
        self._spoke_last = False
        self._prompt = DEFAULT_SYSTEM_PROMPT
        self._ref_voice: FloatArray | None = None
        self._warned_texts = False
        self._last_timings: dict[str, float] = {}
        self._closed = False

    # ---------------------------------------------------------------------------------- protocol
    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        """Open the server session with the system prompt and reference voice (see module doc)."""
        self._check_open()
        system_suffix(system_prompt)  # a bad prompt fails here, before anything is sent
        if ref_voice is not None:
            ref_voice = np.asarray(ref_voice, dtype=np.float32).reshape(-1)
            if ref_voice.size == 0:
                raise ConfigError("ref_voice is empty; pass None to use the server's default voice")
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
        if unit.texts:
            # No duplex path takes text for a unit (omni.cpp duplex_prefill has no text argument).
            self._counters["dropped_texts"] += len(unit.texts)
            if not self._warned_texts:
                log.warning(
                    "llama.cpp-omni's duplex prefill takes no text: dropping Unit.texts %s (counted "
                    "in metrics()['dropped_texts'])",
                    unit.texts,
                )
                self._warned_texts = True
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
        if force_listen:
            self._turn_open = self._turn_audio = False
        self._units_since_prepare += 1
        self._force_listen = force_listen
        self._prefilled = True

    def generate(self) -> UnitResult:
        """Decode the last prefilled unit: listen, or text + 24 kHz speech (see module doc)."""
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
        self._counters["units"] += 1
        try:
            if self._http is not None:
                result = self._generate_http(forced, late_interrupt)
            else:
                result = self._generate_ws(forced, late_interrupt)
        except (BackendUnavailable, BackendTimeout):
            self._lost_session()
            raise
        result.timings_ms["total"] = (time.perf_counter() - t0) * 1e3
        self._last_timings = dict(result.timings_ms)
        return result

    def _generate_http(self, forced: bool, late_interrupt: bool) -> UnitResult:
        assert self._http is not None
        if forced:
            # Force listen: no decode for this unit (its audio is already in the KV cache).
            if late_interrupt:
                self._http.break_generation()
            self._turn_open = self._turn_audio = False
            return UnitResult(is_listen=True)
        is_listen, text, timings = self._http.decode()
        t1 = time.perf_counter()
        if is_listen:
            if not self._turn_open:
                audio, done = self._http.collect(0.0, until_done=False)
                if audio is not None:  # speech of a turn we had already closed: still play it
                    return self._tail(audio, done, timings)
                return UnitResult(is_listen=True, timings_ms=timings)
            # The turn's final window comes only now (see module doc): wait for the flag.
            audio, done = self._http.collect(self.config.audio_wait_s, until_done=True)
            timings["audio_wait"] = (time.perf_counter() - t1) * 1e3
            if audio is None and not done:
                self._turn_open = self._turn_audio = False
                return UnitResult(is_listen=True, timings_ms=timings)
            return self._tail(audio, done, timings)
        wait = 0.0 if self._turn_audio else self.config.audio_wait_s
        audio, done = self._http.collect(wait, until_done=False)
        timings["audio_wait"] = (time.perf_counter() - t1) * 1e3
        return self._speak(text, audio, done, timings)

    def _generate_ws(self, forced: bool, late_interrupt: bool) -> UnitResult:
        assert self._ws is not None
        if late_interrupt:
            # The server was not told: drop this unit's speech and force the next one to listen.
            self._ws.drop_current()
            self._interrupt.set()
        # Read this unit's answer even when forced, or the next unit would get it.
        t1 = time.perf_counter()
        unit = self._ws.collect()
        timings = {"decode": (time.perf_counter() - t1) * 1e3}
        if forced:
            self._turn_open = self._turn_audio = False
            return UnitResult(is_listen=True, timings_ms=timings)
        text, chunks = unit.text, unit.audio
        if (
            unit.kind != "speak"
            and not text
            and not chunks
            and self._turn_open
            and self._spoke_last
        ):
            # The model stopped speaking right after speech: the turn's final window is rendered
            # only now. (Only then: after a tail unit the final window has most likely come.)
            t2 = time.perf_counter()
            late_text, chunks = self._ws.wait_audio(self.config.audio_wait_s)
            text += late_text
            timings["audio_wait"] = (time.perf_counter() - t2) * 1e3
        audio = np.concatenate(chunks).astype(np.float32) if chunks else None
        if unit.kind == "speak" or text:
            return self._speak(text, audio, False, timings)
        if audio is not None:
            return self._tail(audio, False, timings)
        self._turn_open = self._turn_audio = False
        return UnitResult(is_listen=True, timings_ms=timings)

    def _speak(
        self, text: str, audio: FloatArray | None, done: bool, timings: dict[str, float]
    ) -> UnitResult:
        self._counters["speaking_units"] += 1
        self._spoke_last = True
        self._turn_open = not done
        self._turn_audio = self._turn_open and (self._turn_audio or audio is not None)
        return UnitResult(
            is_listen=False, text=text, audio=audio, end_of_turn=done, timings_ms=timings
        )

    def _tail(self, audio: FloatArray | None, done: bool, timings: dict[str, float]) -> UnitResult:
        """The model listens, but the turn's speech is still arriving: a speaking unit, no text."""
        self._counters["tail_units"] += 1
        self._spoke_last = False
        self._turn_open = not done
        self._turn_audio = self._turn_open
        return UnitResult(is_listen=False, audio=audio, end_of_turn=done, timings_ms=timings)

    def interrupt(self) -> None:
        """Barge-in (thread-safe): the next prefill/generate breaks generation and drops speech."""
        self._interrupt.set()

    def reset(self) -> None:
        """Clear the server's conversation; prepare() must be called again."""
        self._check_open()
        self._prefilled = False
        self._prepared = False
        self._needs_reopen = False
        self._interrupt.clear()
        self._turn_open = self._turn_audio = False
        if self._http is not None:
            try:
                self._http.reset()
            except (BackendUnavailable, BackendTimeout):
                self._http.forget_server()  # nothing to clear on a server that is gone
        elif self._ws is not None:
            self._ws.end_session()

    def close(self) -> None:
        """End the session, close sockets and remove a private work folder. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._http is not None:
            self._http.close()
        if self._ws is not None:
            self._ws.shutdown()
        if self._own_work_dir:
            shutil.rmtree(self._work_dir, ignore_errors=True)

    def metrics(self) -> dict[str, float | int | str]:
        """Server and client figures for ``/diagnostics`` (a fresh flat dict; any thread may call it).

        Keys: ``server`` (detected generation), ``transport``, the client counters (``units``,
        ``speaking_units``, ``tail_units``, ``idle_units``, ``late_events``,
        ``interrupted_audio_dropped``, ``interrupted_wavs_dropped``, ``stale_wavs_dropped``,
        ``dropped_texts``, ``init_retries``, ``sessions_opened``), the last unit's timings as
        ``unit_<stage>_ms``, and over WebSocket the server's latest ``metrics`` values as
        ``server_<name>`` (e.g. ``server_kv_cache_length``, ``server_prefill_ms``).
        """
        out: dict[str, float | int | str] = {"transport": self.config.transport}
        out["server"] = self._http.server if self._http is not None else LLAMA_OMNI_SERVER
        # dict() copies are atomic under the GIL: the node may call this from its diagnostics timer
        # while the worker thread updates the counters.
        out.update(dict(self._counters))
        for stage, value in dict(self._last_timings).items():
            out[f"unit_{stage}_ms"] = value
        if self._ws is not None:
            for key, value in dict(self._ws.server_metrics).items():
                out[f"server_{key}"] = value
        return out

    # ---------------------------------------------------------------------------------- internals
    @property
    def work_dir(self) -> Path:
        """The folder shared with the server (HTTP transport)."""
        return self._work_dir

    @property
    def dropped_tail_wavs(self) -> int:
        """Speech WAVs thrown away (interrupted or stale); kept for older callers."""
        return self._counters["interrupted_wavs_dropped"] + self._counters["stale_wavs_dropped"]

    def _check_unit(self, unit: Unit) -> None:
        """Reject a unit of the wrong rate or length before any state changes."""
        first = self._units_since_prepare == 0
        # Recovering after a failure: the caller's timeline may restart or carry on; either is fine.
        check_unit(unit, self, None if self._needs_reopen else first)

    def _open_session(self) -> None:
        self._prepared = False
        self._prefilled = False
        self._force_listen = False
        self._units_since_prepare = 0
        self._turn_open = self._turn_audio = False
        self._interrupt.clear()
        suffix = system_suffix(self._prompt)
        try:
            if self._http is not None:
                self._http.open(self._voice_path(), suffix)
            else:
                assert self._ws is not None
                self._ws.open(suffix, self._ref_voice)
        except (BackendUnavailable, BackendTimeout):
            self._lost_session()
            raise
        self._counters["sessions_opened"] += 1
        self._prepared = True
        self._needs_reopen = False

    def _voice_path(self) -> str:
        """The voice for the index-0 prefill: ours, the configured one, or "" (server default)."""
        if self._ref_voice is not None:
            path = self._work_dir / "voice_ref_16k.wav"
            self._work_dir.mkdir(parents=True, exist_ok=True)
            _wire.write_wav(path, self._ref_voice, INPUT_SAMPLE_RATE)
            return str(path)
        return self.config.voice_audio

    def _lost_session(self) -> None:
        self._prepared = False
        self._prefilled = False
        self._needs_reopen = True
        self._turn_open = self._turn_audio = False
        if self._http is not None:
            self._http.forget_server()
        if self._ws is not None:
            self._ws.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StateError("backend is closed; create a new one")
