"""``reference``: MiniCPM-o 4.5's per-unit duplex computation with seeded random weights.

This backend runs offline, anywhere, and computes what the real model computes at each unit, but
**its words and its voice are meaningless**: every weight is random (seeded), nothing is ever loaded
from a checkpoint. It exists to test and benchmark everything around the model (timeline, session,
ROS nodes, TensorRT runners) with real tensors flowing through real transformer code.

Per unit (1.0 s; the first unit after ``prepare()`` is 1.035 s, as in MiniCPM-o):

1. **Encoders.** The newest frame(s) are resized to the vision size (any input size is accepted,
   448x448 included) and go through SigLIP (``transformers.SiglipVisionModel``) + a resampler of
   ours (Q learned queries, cross-attention) -> Q tokens of LLM width. The audio becomes a Whisper
   log-mel (hop 160 at 16 kHz, 100 frames/s) -> ``transformers`` ``WhisperEncoder`` -> average pool 5
   -> Linear-ReLU-Linear -> 10 tokens per second.
2. **Prefill.** ``[pending] <unit> [<image> Q </image>] audio(10) [<|im_start|>user\\n text
   <|im_end|>]`` is embedded and appended to a ``DynamicCache`` carried across units by a
   ``transformers.Qwen3ForCausalLM``.
3. **Listen or speak** from the logits of two control tokens, ``<|listen|>`` vs ``<|speak|>`` (+
   ``listen_bias``); or forced by ``force_listen_units`` / ``speak_schedule``. Like the real model,
   a turn once started continues until ``<|turn_eos|>`` (or ``max_turn_units``).
4. **Speak.** Decode up to ``max_speak_tokens_per_unit`` text tokens after ``<|speak|>``, ending in
   ``<|chunk_eos|>`` (turn continues) or ``<|turn_eos|>`` (end of turn). The vocabulary is
   byte-level: ids 0-255 are bytes (text = the bytes decoded as UTF-8 with ``errors="replace"``), the
   control tokens follow; decoding is constrained to printable ASCII plus the end tokens so the
   meaningless text is at least safe to publish. The hidden states of the spoken tokens go through a
   speech-token head (25 tokens/s) and a vocoder (960 samples per token) -> >= 1 s of 24 kHz
   float32 audio.

The last token decided in a unit (``<|listen|>`` or the end token) is held back and fed at the start
of the next unit's prefill: same tokens in the cache, one LLM call fewer per unit.

**Sliding window.** The cache holds the system prompt followed by whole units. Before a unit is
prefilled, if the cache plus that unit's worst case (prefill + every decode step) would exceed
``sliding_window_tokens``, the oldest units are dropped (down to ``sliding_window_keep_tokens`` if
set, else just enough) and the system prompt is kept. Dropping the middle of a RoPE cache leaves a
gap in positions; we close it by re-rotating the kept keys by ``-dropped`` positions (RoPE rotations
compose, so a key cached at position ``p`` becomes exactly the key at ``p - dropped``) and rebuild
the ``DynamicCache`` through its public ``update()``. Positions therefore stay within the window
forever. (The kept keys/values were computed while the dropped tokens were visible; that is what
every sliding-window KV scheme, MiniCPM-o's included, accepts.)

**Components for TensorRT.** ``backend.model`` (built lazily) is a :class:`ReferenceModel`:

- ``backend.model.vision``: pixel_values float32 ``[B, 3, S, S]`` -> float32 ``[B, Q, H]``
  (SigLIP + resampler; S = 56 tiny / 448 full, Q = 16 / 64, H = 128 / 4096);
- ``backend.model.audio``: log-mel float32 ``[1, 80, T]`` (T <= 104) -> float32 ``[1, ceil(T/2)//5, H]``
  (Whisper encoder + pool + projector);
- ``backend.model.vocoder``: speech token ids int64 ``[1, N]`` -> float32 ``[1, N * 960]``.

``backend.replace_component(name, fn)`` swaps one of these three for any callable with the same
signature (a TensorRT runner); the backend moves its output to the model's device, checks the shape
and raises :class:`BackendProtocolError` if it is wrong. ``backend.model.vision`` etc. stay the
original modules (for export).

Configs: ``size="tiny"`` (CPU tests and CI, a few ms per unit) or ``size="full"`` (MiniCPM-o 4.5
dimensions: SigLIP-400M at 448, Whisper-medium encoder, Qwen3-8B, ~0.3B speech decoder; for GPU
benchmarks only, built directly on ``device`` in ``dtype``).
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

import numpy as np
import torch
import transformers
from PIL import Image

from omni_ros.backends.base import check_unit
from omni_ros.backends.reference_model import (
    AUDIO_POOL,
    INPUT_SAMPLE_RATE,
    MEL_HOP,
    OUTPUT_SAMPLE_RATE,
    SAMPLES_PER_SPEECH_TOKEN,
    SPEECH_TOKENS_PER_S,
    TOKEN_IDS,
    ModelDims,
    ReferenceModel,
    build_model,
    dims_for,
)
from omni_ros.core import config as config_mod
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import (
    BackendError,
    BackendProtocolError,
    BackendUnavailable,
    ConfigError,
    OmniError,
    StateError,
)
from omni_ros.core.types import FloatArray, Unit, UnitResult

# transformers' cache has an untyped constructor: handle it as Any.
_DynamicCache: Any = transformers.DynamicCache
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_COMPONENTS = ("vision", "audio", "vocoder")
_LISTEN = TOKEN_IDS["<|listen|>"]
_SPEAK = TOKEN_IDS["<|speak|>"]
_CHUNK_EOS = TOKEN_IDS["<|chunk_eos|>"]
_TURN_EOS = TOKEN_IDS["<|turn_eos|>"]
#: Longest reference voice accepted by prepare(), in seconds.
MAX_REF_VOICE_S = 30.0


@dataclass(frozen=True)
class ReferenceConfig:
    """Parameters of the ``reference`` backend (build with :meth:`from_mapping`).

    Attributes:
        size: ``"tiny"`` (CPU, tests) or ``"full"`` (MiniCPM-o 4.5 dimensions, GPU).
        seed: seeds the random weights and the sampler (same seed -> same outputs).
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:N"`` also accepted).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (half types need ``cuda``).
        attn_implementation: ``"sdpa"`` or ``"eager"`` for the LLM.
        num_threads: ``torch.set_num_threads`` value applied when the model is built (None: leave).
        sliding_window_tokens: KV-cache limit; None -> 512 (tiny) / 8000 (full, as MiniCPM-o).
        sliding_window_keep_tokens: when the window overflows, drop units down to this many tokens
            (MiniCPM-o "basic" mode: 8000 -> 6000); None -> drop just enough.
        max_speak_tokens_per_unit: text tokens decoded per speaking unit (MiniCPM-o: 20).
        max_turn_units: without a schedule, a turn is forced to end after this many speaking units
            (random weights rarely pick ``<|turn_eos|>``).
        speak_schedule: optional forced pattern over units since prepare(), cycled: ``L`` listen,
            ``S`` speak (turn continues), ``E`` speak and end the turn. Whitespace is ignored. It
            overrides the control-token logits and decides where turns end (an ``L`` right after
            an ``S`` closes the turn: that listen unit reports ``end_of_turn``); ``interrupt()``
            and ``force_listen_units`` still win over it.
        force_listen_units: the first N units after prepare() always listen (the demo uses 3).
        listen_bias: added to the ``<|listen|>`` logit before deciding (positive = quieter).
        decode_mode: ``"greedy"`` or ``"sampling"`` (temperature / top_k).
        temperature: sampling temperature.
        top_k: sampling top-k.
        max_frames_per_unit: newest frames of a unit that are encoded (MiniCPM-o duplex: 1).
        max_text_tokens_per_unit: injected text bytes kept per unit (the rest is cut).
        sync_cuda_timings: synchronise CUDA around each stage so timings_ms are true compute times.
    """

    size: str = "tiny"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    num_threads: int | None = None
    sliding_window_tokens: int | None = None
    sliding_window_keep_tokens: int | None = None
    max_speak_tokens_per_unit: int = 8
    max_turn_units: int = 8
    speak_schedule: str | None = None
    force_listen_units: int = 0
    listen_bias: float = 0.0
    decode_mode: str = "greedy"
    temperature: float = 0.7
    top_k: int = 20
    max_frames_per_unit: int = 1
    max_text_tokens_per_unit: int = 128
    sync_cuda_timings: bool = True

    def __post_init__(self) -> None:
        if self.size not in ("tiny", "full"):
            raise ConfigError(f"ReferenceConfig.size must be 'tiny' or 'full', not {self.size!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"ReferenceConfig.dtype must be one of {sorted(_DTYPES)}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(
                f"ReferenceConfig.device must be 'cpu' or 'cuda', not {self.device!r}"
            )
        if self.dtype != "float32" and self.device == "cpu":
            raise ConfigError("ReferenceConfig.dtype bfloat16/float16 needs device 'cuda'")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ConfigError("ReferenceConfig.attn_implementation must be 'sdpa' or 'eager'")
        if self.decode_mode not in ("greedy", "sampling"):
            raise ConfigError("ReferenceConfig.decode_mode must be 'greedy' or 'sampling'")
        positive = {
            "max_speak_tokens_per_unit": self.max_speak_tokens_per_unit,
            "max_turn_units": self.max_turn_units,
            "top_k": self.top_k,
            "max_frames_per_unit": self.max_frames_per_unit,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"ReferenceConfig.{key} must be >= 1, got {value}")
        for key, opt in (
            ("num_threads", self.num_threads),
            ("sliding_window_tokens", self.sliding_window_tokens),
            ("sliding_window_keep_tokens", self.sliding_window_keep_tokens),
        ):
            if opt is not None and opt < 1:
                raise ConfigError(f"ReferenceConfig.{key} must be >= 1 or empty, got {opt}")
        if self.force_listen_units < 0 or self.max_text_tokens_per_unit < 0:
            raise ConfigError("ReferenceConfig counts must not be negative")
        if self.temperature <= 0:
            raise ConfigError("ReferenceConfig.temperature must be > 0")
        if (
            self.sliding_window_keep_tokens is not None
            and self.sliding_window_keep_tokens > self.window_tokens
        ):
            raise ConfigError(
                "ReferenceConfig.sliding_window_keep_tokens must not exceed sliding_window_tokens"
            )
        if self.speak_schedule is not None:
            schedule = "".join(self.speak_schedule.split()).upper()
            if not schedule or set(schedule) - set("LSE"):
                raise ConfigError(
                    "ReferenceConfig.speak_schedule must be a non-empty string of L (listen), "
                    f"S (speak) and E (speak, end turn); got {self.speak_schedule!r}"
                )
            object.__setattr__(self, "speak_schedule", schedule)

    @property
    def window_tokens(self) -> int:
        """The effective sliding-window size in tokens."""
        if self.sliding_window_tokens is not None:
            return self.sliding_window_tokens
        return 512 if self.size == "tiny" else 8000

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any] | None) -> ReferenceConfig:
        """Build from a plain mapping (unknown key / wrong type -> ConfigError)."""
        return config_mod.from_mapping(cls, mapping)


@dataclass
class _Session:
    """Streaming state of one conversation; :meth:`reset` returns it to before ``prepare()``."""

    prepared: bool = False
    units: int = 0  # units prefilled since prepare()
    cache: Any = None  # transformers DynamicCache
    prompt_tokens: int = 0
    spans: deque[int] = field(default_factory=deque)  # cache tokens per kept unit, oldest first
    pending_ids: list[int] = field(default_factory=list)  # decided, not yet in the cache
    logits: torch.Tensor | None = None  # decision logits of the prefilled, not yet generated unit
    unit_duration_ns: int = 0
    prefill_ms: dict[str, float] = field(default_factory=dict)
    turn_open: bool = False
    turn_units: int = 0
    text_decoder: Any = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    generator: torch.Generator | None = None

    def reset(self) -> None:
        fresh = _Session()
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))


_CLOSE_WAIT_S = 30.0
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _one_call_at_a_time(
    method: Callable[Concatenate[ReferenceBackend, _P], _R],
) -> Callable[Concatenate[ReferenceBackend, _P], _R]:
    """Run a backend call under its call lock, so that close() never drops what it uses."""

    def wrapper(self: ReferenceBackend, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._call_lock:
            return method(self, *args, **kwargs)

    functools.update_wrapper(wrapper, method)  # name and docstring of the method
    return wrapper


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE'd ``keys`` ``[B, heads, n, D]`` BACK by the angle whose cos/sin are given ``[D]``."""
    rotated = keys.float() * cos - _rotate_half(keys.float()) * sin
    return rotated.to(keys.dtype)


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a ``DynamicCache`` (transformers 4.51 and the newer layout)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def cache_from_tensors(tensors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A fresh ``DynamicCache`` holding ``tensors``, built through the public ``update()``."""
    cache = _DynamicCache()
    for layer_idx, (keys, values) in enumerate(tensors):
        cache.update(keys, values, layer_idx)
    return cache


class ReferenceBackend:
    """The ``reference`` backend (see the module docstring). Not thread-safe except ``interrupt()``."""

    name: ClassVar[str] = "reference"
    config_class: ClassVar[type[ReferenceConfig]] = ReferenceConfig

    input_sample_rate: int = INPUT_SAMPLE_RATE
    output_sample_rate: int = OUTPUT_SAMPLE_RATE
    unit_ns: int = 1_000_000_000
    first_unit_ns: int = 1_035_000_000

    def __init__(self, config: ReferenceConfig | None = None) -> None:
        self.config = config or ReferenceConfig()
        self.dims: ModelDims = dims_for(self.config.size)
        self._model: ReferenceModel | None = None
        self._components: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        self._interrupt = threading.Event()
        self._session = _Session()
        self._closed = False
        #: Held by prepare/prefill/generate/reset; close() waits for it (a call in flight on the
        #: flow's backend-call thread must not find its networks gone: KeyError mid-generate).
        self._call_lock = threading.RLock()
        self._allowed_cache: dict[tuple[int, ...], torch.Tensor] = {}

    # ---------------------------------------------------------------------------------- model
    @property
    def model(self) -> ReferenceModel:
        """The networks, built on first use (seeded random weights on ``config.device``)."""
        if self._closed:
            raise StateError("the reference backend is closed; create a new one")
        if self._model is None:
            self._model = self._build()
            for name in _COMPONENTS:
                self._components.setdefault(name, getattr(self._model, name))
        return self._model

    def _build(self) -> ReferenceModel:
        cfg = self.config
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"reference backend: device {cfg.device!r} requested but CUDA is not available; "
                "use device: cpu (and size: tiny)"
            )
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        return build_model(
            self.dims,
            seed=cfg.seed,
            device=cfg.device,
            dtype=_DTYPES[cfg.dtype],
            attn_implementation=cfg.attn_implementation,
        )

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    def replace_component(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Run component ``name`` (``vision``, ``audio`` or ``vocoder``) through ``fn`` instead.

        ``fn`` takes and returns tensors exactly as the module it replaces (see the module docstring).
        """
        if name not in _COMPONENTS:
            raise ConfigError(f"unknown component {name!r}; choose one of {list(_COMPONENTS)}")
        if not callable(fn):
            raise ConfigError(f"replace_component({name!r}, ...) needs a callable")
        _ = self.model  # build first, so the swap is not overwritten by the lazy build
        self._components[name] = fn

    def _run_component(
        self, name: str, x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        out = self._components[name](x)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BackendProtocolError(f"component {name!r} returned {got}, expected {shape}")
        return out.to(device=self.device, dtype=dtype)

    # ---------------------------------------------------------------------------- properties
    @property
    def kv_cache_tokens(self) -> int:
        """Tokens in the KV cache now (0 before prepare())."""
        cache = self._session.cache
        return 0 if cache is None else int(cache.get_seq_length())

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the system prompt (+ reference voice), kept by the sliding window."""
        return self._session.prompt_tokens

    def audio_tokens_for(self, n_samples: int) -> int:
        """LLM tokens the audio encoder makes of ``n_samples`` input samples."""
        frames = n_samples // MEL_HOP
        return ((frames + 1) // 2) // AUDIO_POOL

    def max_unit_tokens(self) -> int:
        """Worst-case cache growth of one unit (prefill + every decode step)."""
        frames = self.config.max_frames_per_unit * (self.dims.vision_queries + 2)
        audio = self.audio_tokens_for(self.first_unit_ns * INPUT_SAMPLE_RATE // NS_PER_S)
        texts = (
            self.config.max_text_tokens_per_unit + 8
        )  # + chat-format tokens, any number of texts
        decode = self.config.max_speak_tokens_per_unit + 1
        return 2 + 1 + frames + audio + texts + decode

    # --------------------------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _converting_errors(self, stage: str) -> Iterator[None]:
        try:
            with torch.inference_mode():
                yield
        except OmniError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise BackendError(f"reference backend failed in {stage}: {exc}") from exc

    def _sync(self) -> None:
        if self.device.type == "cuda" and self.config.sync_cuda_timings:
            torch.cuda.synchronize(self.device)

    def _embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        table = self.model.llm.get_input_embeddings()
        embeds: torch.Tensor = table(
            torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        )
        return embeds

    def _embed(self, parts: Sequence[Sequence[int] | torch.Tensor]) -> torch.Tensor:
        """Concatenate token ids (embedded) and ready embeddings ``[1, n, H]`` in order."""
        dtype = self.model.llm.get_input_embeddings().weight.dtype
        pieces = [
            part.to(dtype) if isinstance(part, torch.Tensor) else self._embed_ids(part)
            for part in parts
            if (part.shape[1] if isinstance(part, torch.Tensor) else len(part)) > 0
        ]
        return torch.cat(pieces, dim=1)

    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Append ``embeds`` to the KV cache; return their last hidden states ``[1, n, H]``."""
        out = self.model.llm.model(
            inputs_embeds=embeds, past_key_values=self._session.cache, use_cache=True
        )
        self._session.cache = out.past_key_values
        hidden: torch.Tensor = out.last_hidden_state
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model.llm.lm_head(hidden[:, -1]).float()[0]
        return logits

    def _encode_audio(self, samples: FloatArray) -> torch.Tensor:
        audio = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)).to(self.device)
        mel = self.model.mel(audio)
        n = self.audio_tokens_for(len(samples))
        return self._run_component("audio", mel, (1, n, self.dims.hidden), torch.float32)

    def _encode_frames(self, frames: Sequence[np.ndarray[Any, Any]]) -> torch.Tensor:
        size = self.dims.image_size
        pixels = np.stack(
            [
                np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))
                for rgb in frames
            ]
        )
        x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float()
        x = (x / 255.0 - 0.5) / 0.5  # SigLIP normalisation
        shape = (len(frames), self.dims.vision_queries, self.dims.hidden)
        return self._run_component("vision", x, shape, torch.float32)

    def _allowed(self, end_ids: tuple[int, ...]) -> torch.Tensor:
        """Vocabulary mask for text decoding: printable ASCII, newline and ``end_ids``."""
        mask = self._allowed_cache.get(end_ids)
        if mask is None:
            mask = torch.zeros(self.dims.vocab_size, dtype=torch.bool, device=self.device)
            mask[32:127] = True
            mask[10] = True
            mask[list(end_ids)] = True
            self._allowed_cache[end_ids] = mask
        return mask

    def _pick(self, logits: torch.Tensor, allowed: torch.Tensor) -> int:
        masked = logits.masked_fill(~allowed, float("-inf"))
        if self.config.decode_mode == "greedy":
            return int(torch.argmax(masked))
        top = torch.topk(masked / self.config.temperature, self.config.top_k)
        probs = torch.softmax(top.values, dim=-1)
        choice = torch.multinomial(probs, 1, generator=self._session.generator)
        return int(top.indices[choice])

    def _check_live(self, call: str) -> None:
        if self._closed:
            raise StateError(f"{call}() on a closed reference backend; create a new one")
        if not self._session.prepared:
            raise StateError(f"{call}() before prepare(); call prepare(system_prompt) first")

    # --------------------------------------------------------------------------------- protocol
    @_one_call_at_a_time
    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        """Start a session: the system prompt (and reference voice) become the cache's fixed head."""
        if self._closed:
            raise StateError("prepare() on a closed reference backend; create a new one")
        if not isinstance(system_prompt, str):
            raise ConfigError("system_prompt must be a str")
        voice: FloatArray | None = None
        if ref_voice is not None:
            voice = np.asarray(ref_voice, dtype=np.float32)
            if voice.ndim != 1 or voice.size == 0:
                raise ConfigError("ref_voice must be non-empty mono float32 audio at 16 kHz")
            if voice.size > MAX_REF_VOICE_S * INPUT_SAMPLE_RATE:
                raise ConfigError(f"ref_voice is longer than {MAX_REF_VOICE_S:.0f} s; trim it")
            voice = np.nan_to_num(voice).clip(-1.0, 1.0)
        session = self._session
        session.reset()
        self._interrupt.clear()
        with self._converting_errors("prepare"):
            model = self.model
            model.eval()
            head = [TOKEN_IDS["<|im_start|>"], *b"system\n", *system_prompt.encode("utf-8")]
            parts: list[Sequence[int] | torch.Tensor] = [head]
            if voice is not None:
                parts.append([TOKEN_IDS["<|audio_start|>"]])
                chunk = INPUT_SAMPLE_RATE  # one encoder call per second, as for units
                for start in range(0, voice.size, chunk):
                    piece = voice[start : start + chunk]
                    if self.audio_tokens_for(piece.size) > 0:
                        parts.append(self._encode_audio(piece))
                parts.append([TOKEN_IDS["<|audio_end|>"]])
            parts.append([TOKEN_IDS["<|im_end|>"]])
            embeds = self._embed(parts)
            if embeds.shape[1] + self.max_unit_tokens() > self.config.window_tokens:
                raise ConfigError(
                    f"system prompt ({embeds.shape[1]} tokens) + one unit "
                    f"({self.max_unit_tokens()}) exceed sliding_window_tokens "
                    f"({self.config.window_tokens}); shorten the prompt or raise the window"
                )
            session.cache = _DynamicCache()
            self._forward(embeds)
            session.prompt_tokens = self.kv_cache_tokens
            generator = torch.Generator(device=self.device)
            generator.manual_seed(self.config.seed)
            session.generator = generator
        session.prepared = True

    def _validate(self, unit: Unit) -> None:
        check_unit(unit, self, self._session.units == 0)
        for frame in unit.frames:
            rgb = frame.rgb
            if (
                not isinstance(rgb, np.ndarray)
                or rgb.dtype != np.uint8
                or rgb.ndim != 3
                or rgb.shape[2] != 3
                or min(rgb.shape[:2]) < 1
            ):
                raise ConfigError(f"unit {unit.index}: frames must be uint8 RGB arrays (H, W, 3)")

    @_one_call_at_a_time
    def prefill(self, unit: Unit) -> None:
        """Encode one unit and append it to the KV cache (sliding the window first if needed)."""
        self._check_live("prefill")
        session = self._session
        if session.logits is not None:
            raise StateError("prefill() twice without generate(); call generate() for each unit")
        self._validate(unit)
        with self._converting_errors("prefill"):
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            parts: list[Sequence[int] | torch.Tensor] = [session.pending_ids, [TOKEN_IDS["<unit>"]]]
            frames = [f.rgb for f in unit.frames[-self.config.max_frames_per_unit :]]
            if frames:
                vision = self._encode_frames(frames)
                for i in range(len(frames)):
                    parts += [[TOKEN_IDS["<image>"]], vision[i : i + 1], [TOKEN_IDS["</image>"]]]
            self._sync()
            t1 = time.perf_counter()
            audio = np.nan_to_num(unit.audio.astype(np.float32, copy=False)).clip(-1.0, 1.0)
            parts.append(self._encode_audio(audio))
            budget = self.config.max_text_tokens_per_unit
            for text in unit.texts:
                data = text.encode("utf-8")[:budget]
                budget -= len(data)
                if data:
                    parts.append(
                        [TOKEN_IDS["<|im_start|>"], *b"user\n", *data, TOKEN_IDS["<|im_end|>"]]
                    )
            embeds = self._embed(parts)
            self._sync()
            t2 = time.perf_counter()
            self._slide_window(embeds.shape[1] + self.config.max_speak_tokens_per_unit + 1)
            logits = self._logits(self._forward(embeds))
            self._sync()
            t3 = time.perf_counter()
            timings["vision"] = (t1 - t0) * 1e3
            timings["audio"] = (t2 - t1) * 1e3
            timings["prefill"] = (t3 - t2) * 1e3
        session.spans.append(int(embeds.shape[1]))
        session.pending_ids = []
        session.unit_duration_ns = self.first_unit_ns if session.units == 0 else self.unit_ns
        session.units += 1
        session.prefill_ms = timings
        session.logits = logits

    def _slide_window(self, incoming: int) -> None:
        """Drop the oldest units so that ``incoming`` more tokens fit in the window."""
        session = self._session
        length = self.kv_cache_tokens
        if length + incoming <= self.config.window_tokens:
            return
        target = self.config.sliding_window_keep_tokens or self.config.window_tokens
        target = min(target, self.config.window_tokens)
        drop = 0
        units = 0
        for span in session.spans:
            if length - drop + incoming <= target:
                break
            drop += span
            units += 1
        if length - drop + incoming > self.config.window_tokens:
            raise ConfigError(
                f"a unit of {incoming} tokens does not fit the {self.config.window_tokens}-token "
                "window next to the system prompt; raise sliding_window_tokens"
            )
        for _ in range(units):
            session.spans.popleft()
        start = session.prompt_tokens
        layers = cache_tensors(session.cache)
        probe = layers[0][0]
        cos, sin = self.model.llm.model.rotary_emb(
            probe.float(), torch.tensor([[drop]], device=probe.device)
        )
        kept = [
            (
                torch.cat(
                    [k[:, :, :start], rotate_keys(k[:, :, start + drop :], cos[0], sin[0])], 2
                ),
                torch.cat([v[:, :, :start], v[:, :, start + drop :]], dim=2),
            )
            for k, v in layers
        ]
        session.cache = cache_from_tensors(kept)

    @_one_call_at_a_time
    def generate(self) -> UnitResult:
        """Decide listen/speak for the prefilled unit; when speaking, decode text and speech."""
        self._check_live("generate")
        session = self._session
        logits = session.logits
        if logits is None:
            raise StateError("generate() without a new prefill(); call prefill(unit) first")
        session.logits = None
        timings = dict(session.prefill_ms)
        t0 = time.perf_counter()
        if self._interrupt.is_set():
            return self._listen(timings, t0, interrupted=True)
        position = session.units - 1  # this unit's number since prepare()
        schedule = self.config.speak_schedule
        end_forced = False
        if position < self.config.force_listen_units:
            speak = False
        elif schedule is not None:
            mark = schedule[position % len(schedule)]
            speak = mark != "L"
            end_forced = mark == "E"
        elif session.turn_open:
            speak = True  # like MiniCPM-o: no switching to listen in the middle of a turn
        else:
            speak = self._decide(logits)
        if not speak:
            return self._listen(timings, t0, interrupted=False)
        if schedule is None and session.turn_units + 1 >= self.config.max_turn_units:
            end_forced = True
        with self._converting_errors("generate"):
            return self._speak(timings, t0, end_forced=end_forced)

    def _decide(self, logits: torch.Tensor) -> bool:
        margin = float(logits[_SPEAK] - logits[_LISTEN]) - self.config.listen_bias
        if self.config.decode_mode == "greedy":
            return margin > 0.0
        p_speak = torch.sigmoid(torch.tensor(margin / self.config.temperature))
        draw = torch.rand(1, generator=self._session.generator, device=self.device)
        return bool(draw.item() < float(p_speak))

    def _listen(self, timings: dict[str, float], t0: float, *, interrupted: bool) -> UnitResult:
        session = self._session
        if interrupted:
            self._interrupt.clear()
        # Tokens already decided (an end token of an interrupted unit) stay; an open turn is
        # closed with <|turn_eos|> (MiniCPM-o's force-listen does the same), then <|listen|>.
        ids = list(session.pending_ids)
        if session.turn_open and (not ids or ids[-1] != _TURN_EOS):
            ids.append(_TURN_EOS)
        end_of_turn = _TURN_EOS in ids
        session.pending_ids = [*ids, _LISTEN]
        session.turn_open = False
        session.turn_units = 0
        session.text_decoder.reset()
        timings.setdefault("llm", (time.perf_counter() - t0) * 1e3)
        timings["total"] = sum(v for k, v in timings.items() if k != "total")
        return UnitResult(is_listen=True, end_of_turn=end_of_turn, timings_ms=timings)

    def _speak(self, timings: dict[str, float], t0: float, *, end_forced: bool) -> UnitResult:
        session = self._session
        schedule = self.config.speak_schedule
        if schedule is not None:
            # The schedule decides where turns end: only its end token may be decoded.
            ends: tuple[int, ...] = (_TURN_EOS,) if end_forced else (_CHUNK_EOS,)
        else:
            ends = (_TURN_EOS,) if end_forced else (_CHUNK_EOS, _TURN_EOS)
        allowed = self._allowed(ends)
        hiddens: list[torch.Tensor] = []
        text_ids: list[int] = []
        token = _SPEAK
        end = ends[0]
        for step in range(self.config.max_speak_tokens_per_unit + 1):
            hidden = self._forward(self._embed_ids([token]))
            hiddens.append(hidden)
            if self._interrupt.is_set():
                break
            if step == self.config.max_speak_tokens_per_unit:
                break  # budget spent: close the chunk with the end token
            token = self._pick(self._logits(hidden), allowed)
            if token in ends:
                end = token
                break
            text_ids.append(token)
        self._sync()
        t1 = time.perf_counter()
        timings["llm"] = (t1 - t0) * 1e3
        session.spans[-1] += len(hiddens)
        if self._interrupt.is_set():
            session.turn_open = True  # so that _listen closes it with <|turn_eos|>
            return self._listen(timings, t1, interrupted=True)
        session.pending_ids = [end]
        end_of_turn = end == _TURN_EOS

        n_speech = math.ceil(session.unit_duration_ns * SPEECH_TOKENS_PER_S / NS_PER_S)
        speech_logits = self.model.speech_head(torch.cat(hiddens, dim=1), n_speech)
        if self.config.decode_mode == "greedy":
            speech_ids = torch.argmax(speech_logits[0], dim=-1)
        else:
            probs = torch.softmax(speech_logits[0] / self.config.temperature, dim=-1)
            speech_ids = torch.multinomial(probs, 1, generator=session.generator)[:, 0]
        self._sync()
        t2 = time.perf_counter()
        wave = self._run_component(
            "vocoder",
            speech_ids.view(1, -1).to(torch.long),
            (1, n_speech * SAMPLES_PER_SPEECH_TOKEN),
            torch.float32,
        )
        audio = np.nan_to_num(wave[0].cpu().numpy()).clip(-1.0, 1.0).astype(np.float32)
        t3 = time.perf_counter()
        timings["speech_head"] = (t2 - t1) * 1e3
        timings["vocoder"] = (t3 - t2) * 1e3
        timings["total"] = sum(v for k, v in timings.items() if k != "total")
        text = session.text_decoder.decode(bytes(text_ids), final=end_of_turn)
        if end_of_turn:
            session.turn_open = False
            session.turn_units = 0
            session.text_decoder.reset()
        else:
            session.turn_open = True
            session.turn_units += 1
        if self._interrupt.is_set():
            # Interrupted while the speech was being made: drop it, this unit becomes a listen.
            session.turn_open = not end_of_turn
            return self._listen(timings, t3, interrupted=True)
        return UnitResult(
            is_listen=False, text=text, audio=audio, end_of_turn=end_of_turn, timings_ms=timings
        )

    def interrupt(self) -> None:
        """Barge-in: the next (or the running) generate() returns listen and the turn is closed."""
        self._interrupt.set()

    @_one_call_at_a_time
    def reset(self) -> None:
        """Forget the conversation (KV cache, turn state); prepare() must be called again."""
        self._session.reset()
        self._interrupt.clear()

    def close(self) -> None:
        """Drop the networks and caches (frees GPU memory). Idempotent; safe from any thread: a
        call in flight is asked to stop (``interrupt``) and waited for (at most
        ``_CLOSE_WAIT_S``) before its networks are dropped; later calls raise StateError."""
        self._closed = True
        self._interrupt.set()
        held = self._call_lock.acquire(timeout=_CLOSE_WAIT_S)
        try:
            self._drop()
        finally:
            if held:
                self._call_lock.release()

    def _drop(self) -> None:
        self._session.reset()
        self._components.clear()
        self._allowed_cache.clear()
        self._model = None
        self._closed = True
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()
