"""``minicpmo``: MiniCPM-o 4.5 itself, through transformers and the model's own duplex API.

The model's remote code exposes ``model.as_duplex()`` -> a ``MiniCPMODuplex`` object with
``prepare()``, ``streaming_prefill()`` and ``streaming_generate()``. This module adapts that object to
the :class:`~omni_ros.backends.base.Backend` Protocol. Every behaviour it relies on was read in, and
run from, the model's own code (``modeling_minicpmo.py`` of the HF remote code, with ``utils.py`` and
``processing_minicpmo.py`` beside it); ``docs/BACKEND_MINICPMO.md`` lists each one with the upstream
file and line, and ``omni-ros check-model`` re-checks them against a downloaded snapshot.

- **Units.** ``streaming_prefill`` left-pads the first unit after ``prepare()`` to 16,560 samples,
  consumes 16,480 of them (the mel processor aligns 1,035 ms down to whole 160-sample hops) and keeps
  the last 80 buffered for good; every later call consumes 16,000 and fails (after feeding
  ``<unit>``) with "audio not enough" when it has fewer. Any extra audio is carried over, so a caller
  that sends more builds a backlog that grows forever. The adapter only ever hands it one unit: the
  caller's first unit after ``prepare()`` must be 16,560 samples (1.035 s) and every later one 16,000
  (anything else is a ConfigError before the model sees it), so the API's buffer stays at 80 samples.
  When the API still waits for its first unit although the caller is past its own (the first unit
  was lost to a break, or ``interrupt_mode: reset`` re-prepared), a 16,000-sample unit is left-padded
  with 560 zeros, as the API itself would. Nothing queues inside this backend: the Omni-Flow runner
  (``core/flow.py``) owns the policy of dropping/merging units when compute falls behind.
- **Frames** must be ``PIL.Image`` (numpy arrays fail inside the API); at most
  ``max_frames_per_unit`` newest frames are sent, each downscaled to about ``frame_max_area`` pixels.
- **The prompt** is passed as-is: the API wraps it in ``<|im_start|>system ... <|im_end|>`` itself.
- **Injected text** (``Unit.texts``, omni/ask) is fed after the unit's audio, and the unit's
  listen/speak decision comes from the logits of the audio feed, so text changes the decision of the
  NEXT unit, never of the unit it rides in. Text of a unit lost to a break is carried to the next one.
- **Results.** ``streaming_generate`` always returns 12 keys; they are validated (missing or mistyped
  -> :class:`BackendProtocolError`). Listen units carry 24,000 zeros: the adapter returns
  ``audio=None`` for them. The first speech unit of a turn already returns audio (left-padded to
  24,000 samples), the last one of a turn is longer (the vocoder flushes its lookahead), and audio is
  ``None`` without a TTS voice. A turn that ends with ``<|turn_eos|>`` and ``<|listen|>`` in one unit
  comes back as a bare listen: the adapter recovers that unit's words and its end of turn.
- **Barge-in.** :meth:`MiniCPMOBackend.interrupt` sets the API's break event (thread-safe). While it
  is set every prefill/generate is a no-op, so the model stops at once. The break persists until
  cleared, so the next unit clears it and closes the turn. The model cannot switch to listen
  mid-turn, so the rest of the interrupted turn is muted (``interrupt_mode: mute``, the default:
  units are reported as listen, their text and audio dropped, until the model itself listens or ends
  the turn) or the session is re-prepared (``interrupt_mode: reset``: a clean stop that forgets the
  conversation). Either way the unit after an interrupt is a listen, with ``end_of_turn`` set when a
  turn was cut.
- **Reset** clears the Whisper encoder's streaming cache, which the API's ``prepare()`` keeps.
- **Timeouts.** Each API call runs in a short-lived worker thread with a deadline
  (``prepare_timeout_s`` / ``prefill_timeout_s`` / ``generate_timeout_s``). A call that misses it
  raises :class:`BackendTimeout`, and because the real object is not re-entrant the backend then
  refuses every call with :class:`BackendUnavailable` until :meth:`~MiniCPMOBackend.reset` finds the
  stuck call finished.
- **Errors.** Third-party exceptions become :class:`BackendError` subtypes here. After a prefill
  that failed for any reason but a break, the API's unit accounting is unknown (it feeds
  ``<unit>`` before validating), so the backend refuses units until ``reset()``/``prepare()``.

Only the HF remote code's ``MiniCPMODuplex`` is supported: the official demo's ``DuplexCapability``
(``modeling_minicpmo_unified.py``) has no ``as_duplex()``, takes no ``text_list`` and needs
``finalize_unit()`` after every generate, so a model without ``as_duplex`` is refused at load.

Loading happens in ``__init__`` (the ROS node constructs the backend in its configure transition),
never at import time; a preflight names every missing runtime package in one error. Remote code
runs only when the config sets ``trust_remote_code: true`` and a ``revision``; see
:class:`MiniCPMOConfig`. Tests inject a model object (``model=``) or a ``model_loader``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, TypeVar

import numpy as np

from omni_ros.backends.base import check_unit
from omni_ros.core.config import from_mapping
from omni_ros.core.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    OmniError,
    StateError,
)
from omni_ros.core.types import FloatArray, Unit, UnitResult, VideoFrame

_LOG = logging.getLogger(__name__)

_T = TypeVar("_T")

INPUT_SAMPLE_RATE: Final = 16_000
OUTPUT_SAMPLE_RATE: Final = 24_000
UNIT_NS: Final = 1_000_000_000
FIRST_UNIT_NS: Final = 1_035_000_000
#: Samples the caller hands over per unit: 16,560 the first time after prepare(), then 16,000.
#: (The API consumes 16,480 of the first and keeps 80 buffered for good; see the module docstring.)
FIRST_UNIT_SAMPLES: Final = 16_560
UNIT_SAMPLES: Final = 16_000
#: The API's listen units return this many zeros at 24 kHz.
LISTEN_ZEROS_SAMPLES: Final = 24_000

_INSTALL_HINT: Final = (
    "install the model's runtime packages: pip install -r requirements/minicpmo.txt, then "
    "pip install --no-deps minicpmo-utils==1.0.7 (see docs/BACKEND_MINICPMO.md)"
)
#: What the remote code and its vocoder import, and why (checked before from_pretrained runs it).
RUNTIME_PACKAGES: Final[dict[str, str]] = {
    "torch": "torch",
    "transformers": "transformers (4.51.0, the remote code's pin)",
    "accelerate": "accelerate (transformers 4.51 from_pretrained calls init_empty_weights)",
    "librosa": "librosa (imported by the remote code for audio)",
    "soundfile": "soundfile (imported by the remote code for audio)",
    "stepaudio2": "minicpmo-utils (its stepaudio2 Token2wav is the speech vocoder; init_tts)",
    "onnxruntime": "onnxruntime (stepaudio2's speaker embedding)",
    "torchaudio": "torchaudio (stepaudio2, the same release as torch)",
    "hyperpyyaml": "hyperpyyaml (stepaudio2's flow config)",
    "einops": "einops (stepaudio2)",
}
_HEX40 = re.compile(r"^[0-9a-fA-F]{40}$")

_VARIANTS: Final = ("bf16", "awq", "int4")
_ATTN: Final = ("sdpa", "flash_attention_2")
_WINDOW_MODES: Final = ("basic", "context", "off")
_DECODE_MODES: Final = ("sampling", "greedy")
_INTERRUPT_MODES: Final = ("mute", "reset")

#: The 12 keys ``streaming_generate`` always returns, with the types accepted for each.
_INT_TYPES: Final = (int, np.integer)
_NUM_TYPES: Final = (int, float, np.integer, np.floating)
_GENERATE_KEYS: Final[dict[str, tuple[type, ...]]] = {
    "is_listen": (bool, np.bool_),
    "text": (str,),
    "audio_waveform": (np.ndarray, type(None)),
    "end_of_turn": (bool, np.bool_),
    "current_time": _INT_TYPES,
    "cost_llm": _NUM_TYPES,
    "cost_tts_prep": _NUM_TYPES,
    "cost_tts": _NUM_TYPES,
    "cost_token2wav": _NUM_TYPES,
    "cost_all": _NUM_TYPES,
    "n_tokens": _INT_TYPES,
    "n_tts_tokens": _INT_TYPES,
}
_GENERATE_TIMINGS: Final = {
    "cost_llm": "llm",
    "cost_tts_prep": "tts_prep",
    "cost_tts": "tts",
    "cost_token2wav": "token2wav",
    "cost_all": "generate_total",
}
_PREFILL_TIMINGS: Final = {
    "cost_vision_process": "prefill_vision_process",
    "cost_vision_embed": "prefill_vision_embed",
    "cost_vision_feed": "prefill_vision_feed",
    "cost_audio_process": "prefill_audio_process",
    "cost_audio_embed": "prefill_audio_embed",
    "cost_audio_feed": "prefill_audio_feed",
    "cost_all": "prefill_total",
}


def _snapshot_commit(model: str) -> str | None:
    """The commit of a Hugging Face cache folder ``.../snapshots/<40-hex>/``, else None."""
    path = os.path.normpath(os.path.expanduser(model))
    parent, name = os.path.split(path)
    if os.path.basename(parent) == "snapshots" and _HEX40.match(name):
        return name.lower()
    return None


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or os.path.isdir(os.path.expanduser(model))


@dataclass(frozen=True)
class MiniCPMOConfig:
    """Parameters of the ``minicpmo`` backend (YAML: ``config/minicpmo.yaml``).

    Attributes:
        model: local folder with the weights and remote code, or a hub id such as
            ``openbmb/MiniCPM-o-4_5`` (read from the local HF cache when ``local_files_only``).
        revision: the commit (40 hex digits, best) or tag whose remote code you reviewed; always
            required with ``trust_remote_code``. For a hub id transformers loads exactly it; for a
            local Hugging Face cache snapshot (``.../snapshots/<commit>``) it must equal that
            commit; for any other folder it is recorded and logged (it cannot be checked).
        trust_remote_code: must be true: the model's Python code is executed. It comes from the hub
            at ``revision`` or from the local folder, so only set it for a source you trust.
        local_files_only: never touch the network (robots run offline).
        variant: ``bf16`` (~19-21.5 GB GPU) or ``awq`` / ``int4`` (~11 GB; ``model`` must point at
            that quantized checkpoint: its own quantization config picks the dtype).
        attn_implementation: ``sdpa`` or ``flash_attention_2``.
        device: torch device, e.g. ``cuda`` or ``cuda:1``.
        sliding_window_mode: ``basic`` (high/low 8,000/6,000 tokens), ``context`` (keep
            ``context_max_units`` units) or ``off`` (the KV cache fills its 8,192 tokens in a few
            minutes of always-on use: a warning is logged).
        context_max_units: units kept in ``context`` mode.
        max_new_speak_tokens_per_chunk: text tokens per speaking unit.
        force_listen_count: warm-up units forced to listen after prepare() (the demo uses 3).
        decode_mode: ``sampling`` or ``greedy``.
        temperature: sampling temperature.
        top_k: top-k (the API's default is 100, the demo uses 20).
        top_p: nucleus sampling.
        listen_prob_scale: scales the listen logit. The decoder's listen id is the tokenizer's
            eos ``<|im_end|>`` (``utils.py`` StreamDecoder.__init__), not ``<|listen|>``, which the
            duplex loop tests for: a value other than 1.0 then scales a token that the loop takes for
            speech, so the backend refuses it (ConfigError at load) while the two ids differ.
        listen_top_k: the API's listen_top_k (None = off). With the same id mismatch the decoder
            returns ``<|im_end|>`` whenever it is in the top k, the loop speaks it, and the robot never
            listens again; refused (ConfigError at load) while the ids differ.
        text_repetition_penalty: text repetition penalty.
        text_repetition_window_size: its window in tokens.
        tts_temperature: speech-token sampling temperature (given to ``as_duplex``).
        ref_audio_path: WAV file of the reference voice, embedded in the prompt when prepare() gets
            no ``ref_voice`` array (resampled to 16 kHz mono).
        prompt_wav_path: WAV file that sets the TTS voice. Defaults to ``ref_audio_path``; when both
            are unset and prepare() gets a ``ref_voice`` array, that array is written to a temporary
            WAV file and used. Without any voice the API returns no speech audio (text only). A path
            that is not a readable file is a ConfigError at prepare() naming it.
        max_frames_per_unit: newest frames of a unit sent to the model (64 KV tokens each).
        frame_max_area: frames larger than this many pixels are downscaled (aspect kept) before they
            are handed over; 0 disables.
        interrupt_mode: ``mute`` or ``reset`` (see the module docstring).
        prepare_timeout_s: deadline of one ``prepare`` call (a reference voice makes it slower).
        prefill_timeout_s: deadline of one ``streaming_prefill`` call.
        generate_timeout_s: deadline of one ``streaming_generate`` call. In the node and replay
            the three are derived from ``flow.backend_deadline_ms`` (prefill and generate 40 %
            each) and ``flow.prepare_deadline_ms`` (prepare 80 %) unless set.
    """

    model: str = ""
    revision: str | None = None
    trust_remote_code: bool = False
    local_files_only: bool = True
    variant: str = "bf16"
    attn_implementation: str = "sdpa"
    device: str = "cuda"
    sliding_window_mode: str = "basic"
    context_max_units: int = 24
    max_new_speak_tokens_per_chunk: int = 20
    force_listen_count: int = 3
    decode_mode: str = "sampling"
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.8
    listen_prob_scale: float = 1.0
    listen_top_k: int | None = None
    text_repetition_penalty: float = 1.05
    text_repetition_window_size: int = 512
    tts_temperature: float = 0.8
    ref_audio_path: str | None = None
    prompt_wav_path: str | None = None
    max_frames_per_unit: int = 1
    frame_max_area: int = 448 * 448
    interrupt_mode: str = "mute"
    prepare_timeout_s: float = 120.0
    prefill_timeout_s: float = 10.0
    generate_timeout_s: float = 10.0

    #: Timeouts that one flow deadline bounds (one owner: ``omni_ros.ros._setup.node_setup``
    #: derives them from ``flow.backend_deadline_ms`` / ``flow.prepare_deadline_ms`` unless set):
    #: field -> (FlowConfig deadline, share). Prefill and generate run in one flow call.
    FLOW_DEADLINE_SHARES: ClassVar[dict[str, tuple[str, float]]] = {
        "prefill_timeout_s": ("backend_deadline_ms", 0.4),
        "generate_timeout_s": ("backend_deadline_ms", 0.4),
        "prepare_timeout_s": ("prepare_deadline_ms", 0.8),
    }

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ConfigError(
                "MiniCPMOConfig.model is empty: set `model` to a local folder with the MiniCPM-o 4.5 "
                "weights or to a hub id such as openbmb/MiniCPM-o-4_5"
            )
        local = _looks_like_path(self.model)
        if not self.trust_remote_code:
            source = f"the folder {self.model!r}" if local else f"the hub repo {self.model!r}"
            raise ConfigError(
                f"MiniCPM-o 4.5 runs Python code shipped with the weights (from {source}); "
                "set `trust_remote_code: true` in the minicpmo parameters to allow it"
                + ("" if local else ", together with a pinned `revision` (a 40-hex commit id)")
            )
        revision = (self.revision or "").strip()
        if not revision:
            what = f"the local folder {self.model!r}" if local else f"the hub id {self.model!r}"
            raise ConfigError(
                f"MiniCPMOConfig.revision is required with trust_remote_code for {what}: set "
                "`revision` to the commit id (40 hex digits) or tag whose remote code you "
                "reviewed, so a later upstream push (or a swapped folder) cannot change what runs"
            )
        snapshot = _snapshot_commit(self.model) if local else None
        if snapshot is not None and _HEX40.match(revision) and snapshot != revision.lower():
            raise ConfigError(
                f"{self.model!r} is the Hugging Face cache snapshot {snapshot}, but `revision` "
                f"pins {revision}: point `model` at the snapshot you reviewed or fix `revision`"
            )
        choices = {
            "variant": (self.variant, _VARIANTS),
            "attn_implementation": (self.attn_implementation, _ATTN),
            "sliding_window_mode": (self.sliding_window_mode, _WINDOW_MODES),
            "decode_mode": (self.decode_mode, _DECODE_MODES),
            "interrupt_mode": (self.interrupt_mode, _INTERRUPT_MODES),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(
                    f"MiniCPMOConfig.{key} = {value!r}; choose one of {list(allowed)}"
                )
        positive = {
            "prepare_timeout_s": self.prepare_timeout_s,
            "prefill_timeout_s": self.prefill_timeout_s,
            "generate_timeout_s": self.generate_timeout_s,
            "max_new_speak_tokens_per_chunk": self.max_new_speak_tokens_per_chunk,
            "max_frames_per_unit": self.max_frames_per_unit,
            "top_k": self.top_k,
            "context_max_units": self.context_max_units,
            "text_repetition_window_size": self.text_repetition_window_size,
        }
        for key, number in positive.items():
            if not (math.isfinite(number) and number > 0):
                raise ConfigError(f"MiniCPMOConfig.{key} = {number!r} must be > 0")
        non_negative = {
            "force_listen_count": self.force_listen_count,
            "frame_max_area": self.frame_max_area,
            "temperature": self.temperature,
            "tts_temperature": self.tts_temperature,
            "listen_prob_scale": self.listen_prob_scale,
        }
        for key, number in non_negative.items():
            if not (math.isfinite(number) and number >= 0):
                raise ConfigError(f"MiniCPMOConfig.{key} = {number!r} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"MiniCPMOConfig.top_p = {self.top_p!r} must be in (0, 1]")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> MiniCPMOConfig:
        """Build from YAML / ROS parameters (unknown key, wrong type -> ConfigError)."""
        return from_mapping(cls, mapping)

    @property
    def is_local(self) -> bool:
        """Whether :attr:`model` names a local folder rather than a hub id."""
        return _looks_like_path(self.model)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for every ``streaming_generate`` call (sampling lives here, not in
        ``as_duplex``: the values given there are stored but ignored)."""
        kwargs: dict[str, Any] = {
            "max_new_speak_tokens_per_chunk": self.max_new_speak_tokens_per_chunk,
            "decode_mode": self.decode_mode,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "listen_prob_scale": self.listen_prob_scale,
            "listen_top_k": self.listen_top_k,
            "text_repetition_penalty": self.text_repetition_penalty,
            "text_repetition_window_size": self.text_repetition_window_size,
        }
        return kwargs

    def as_duplex_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.as_duplex``."""
        kwargs: dict[str, Any] = {
            "device": self.device,
            "generate_audio": True,
            "max_new_speak_tokens_per_chunk": self.max_new_speak_tokens_per_chunk,
            "force_listen_count": self.force_listen_count,
            "tts_temperature": self.tts_temperature,
            "chunk_ms": UNIT_NS // 1_000_000,
            "first_chunk_ms": FIRST_UNIT_NS // 1_000_000,
            "sample_rate": INPUT_SAMPLE_RATE,
            "sliding_window_mode": self.sliding_window_mode,
        }
        if self.sliding_window_mode == "context":
            kwargs["context_max_units"] = self.context_max_units
        return kwargs


# ----------------------------------------------------------------------------------- loading
def load_pretrained(config: MiniCPMOConfig, *, build_vocoder: bool = False) -> Any:
    """Load MiniCPM-o 4.5 with transformers (the default ``model_loader``).

    The vocoder (stepaudio2 Token2wav) is not built here by default: ``as_duplex()`` builds it
    (``MiniCPMODuplex.from_existing_model`` calls ``model.init_tts``), so building it here too would
    load it twice. ``build_vocoder=True`` builds it for callers that never call ``as_duplex()``
    (the TensorRT exporter reads ``model.tts.audio_tokenizer``).

    Raises:
        ConfigError: the local folder does not exist.
        BackendUnavailable: a runtime package is missing (all of them named in one message), no CUDA
            for a ``cuda`` device, the weights are not in the local cache, or the GPU ran out of
            memory.
    """
    model_path = os.path.expanduser(config.model) if config.is_local else config.model
    if config.is_local and not os.path.isdir(model_path):
        raise ConfigError(f"MiniCPMOConfig.model = {config.model!r}: no such folder")
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BackendUnavailable(
            f"minicpmo needs torch and transformers ({exc}); {_INSTALL_HINT}"
        ) from exc
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable(
            f"MiniCPMOConfig.device = {config.device!r} but CUDA is not available here; "
            "MiniCPM-o 4.5 needs a GPU with > 28 GB for bf16 (~11 GB for awq/int4)"
        )
    preflight_runtime_packages()
    if config.revision and not _HEX40.match(config.revision):
        _LOG.warning(
            "revision %r is not a 40-hex commit id: a branch or tag can move upstream",
            config.revision,
        )
    if config.is_local and config.revision:
        _LOG.info(
            "loading from a local folder: revision %r is recorded, not checked", config.revision
        )
    dtype: Any = torch.bfloat16 if config.variant == "bf16" else "auto"
    _LOG.info(
        "loading MiniCPM-o 4.5 (%s, %s) from %s@%s onto %s; this takes a few minutes",
        config.variant,
        config.attn_implementation,
        config.model,
        config.revision or "local",
        config.device,
    )
    started = time.monotonic()
    try:
        model = transformers.AutoModel.from_pretrained(
            model_path,
            trust_remote_code=True,
            revision=config.revision if not config.is_local else None,
            local_files_only=config.local_files_only,
            attn_implementation=config.attn_implementation,
            torch_dtype=dtype,
            init_vision=True,
            init_audio=True,
            init_tts=True,
        )
        model = model.eval().to(config.device)
        if build_vocoder:
            model.init_tts()
    except OmniError:
        raise
    except Exception as exc:
        raise _convert_error("loading the model", exc) from exc
    _LOG.info("MiniCPM-o 4.5 loaded in %.1f s", time.monotonic() - started)
    return model


def missing_runtime_packages(names: Mapping[str, str] = RUNTIME_PACKAGES) -> list[str]:
    """The :data:`RUNTIME_PACKAGES` entries (their descriptions) that cannot be imported here.

    Only looks the modules up (``importlib.util.find_spec``); nothing is imported or executed.
    """
    import importlib.util

    missing: list[str] = []
    for module, why in names.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(why)
    return missing


def preflight_runtime_packages(names: Mapping[str, str] = RUNTIME_PACKAGES) -> None:
    """Raise one :class:`BackendUnavailable` naming every missing runtime package.

    Without it the first missing one surfaces deep inside ``from_pretrained`` (transformers 4.51.0
    without accelerate: ``NameError: name 'init_empty_weights' is not defined``) and the rest one
    retry at a time.
    """
    missing = missing_runtime_packages(names)
    if missing:
        raise BackendUnavailable(
            "minicpmo cannot load MiniCPM-o 4.5: missing Python packages: "
            + "; ".join(missing)
            + f". {_INSTALL_HINT}"
        )


def _convert_error(what: str, exc: BaseException) -> BackendError:
    """Turn a third-party exception from the model into a :class:`BackendError` subtype."""
    name = type(exc).__name__
    if isinstance(exc, ImportError):
        return BackendUnavailable(f"{what} failed: {name}: {exc}; {_INSTALL_HINT}")
    if "OutOfMemory" in name or "out of memory" in str(exc).lower():
        return BackendUnavailable(
            f"{what} failed: GPU out of memory ({exc}); bf16 needs > 28 GB, try variant awq/int4"
        )
    if isinstance(exc, OSError) and what == "loading the model":
        return BackendUnavailable(
            f"{what} failed: {name}: {exc}; with local_files_only the weights must already be in "
            "the local folder or HF cache"
        )
    if isinstance(exc, OSError):
        return BackendUnavailable(f"{what} failed: {name}: {exc}")
    if isinstance(exc, (TypeError, ValueError, KeyError, AttributeError, IndexError)):
        # The loaded remote code does not match the API this adapter was written for.
        return BackendProtocolError(f"{what} failed: {name}: {exc}")
    return BackendUnavailable(f"{what} failed: {name}: {exc}")


# ----------------------------------------------------------------------------------- helpers
def _read_wav_16k(path: str) -> FloatArray:
    """Read a WAV file as mono float32 at 16 kHz (for the reference voice)."""
    from scipy.io import wavfile

    try:
        rate, data = wavfile.read(os.path.expanduser(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the voice WAV {path!r}: {exc}") from exc
    audio = np.asarray(data)
    if audio.dtype == np.int16:
        samples = audio.astype(np.float32) / 32768.0
    elif audio.dtype == np.int32:
        samples = audio.astype(np.float32) / 2_147_483_648.0
    elif audio.dtype == np.uint8:
        samples = (audio.astype(np.float32) - 128.0) / 128.0
    else:
        samples = audio.astype(np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if rate != INPUT_SAMPLE_RATE:
        import soxr

        samples = soxr.resample(samples, rate, INPUT_SAMPLE_RATE)
    out: FloatArray = np.clip(np.nan_to_num(samples), -1.0, 1.0).astype(np.float32)
    return out


def _frame_to_pil(frame: VideoFrame, max_area: int) -> Any:
    """``VideoFrame`` (uint8 RGB array) -> ``PIL.Image`` RGB, downscaled to about ``max_area``."""
    from PIL import Image

    rgb = np.ascontiguousarray(frame.rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ConfigError(
            f"frame at {frame.stamp_ns} ns has shape {rgb.shape} dtype {rgb.dtype}; "
            "expected uint8 (H, W, 3) RGB"
        )
    image = Image.fromarray(rgb)
    height, width = rgb.shape[:2]
    if max_area and height * width > max_area:
        scale = math.sqrt(max_area / (height * width))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image.convert("RGB")


def _ms(owner: str, key: str, seconds: Any) -> float:
    value = float(seconds) * 1000.0
    if not math.isfinite(value):
        raise BackendProtocolError(f"{owner} returned {key} = {seconds!r} (not finite)")
    return max(0.0, value)


# ----------------------------------------------------------------------------------- backend
class _Pending(enum.Enum):
    """Between ``prefill()`` and ``generate()``: what the unit prefilled last became."""

    NONE = "none"  #: nothing prefilled since the last generate()
    PREFILLED = "prefilled"  #: the API took the unit: generate() asks the model to decide
    LOST = "lost"  #: an interrupt made the API skip it: generate() answers listen


class MiniCPMOBackend:
    """MiniCPM-o 4.5 duplex through its own API (see the module docstring).

    Args:
        config: the validated parameters.
        model: an already loaded model object (anything with ``as_duplex``); tests pass a double.
        model_loader: builds the model from ``config`` (default: :func:`load_pretrained`).

    Raises:
        ConfigError: bad parameters (e.g. ``listen_top_k`` with a model whose decoder listen id is
            not ``<|listen|>``).
        BackendUnavailable: the model or its runtime packages cannot be loaded.
    """

    name: ClassVar[str] = "minicpmo"
    config_class: ClassVar[type[MiniCPMOConfig]] = MiniCPMOConfig

    input_sample_rate: int = INPUT_SAMPLE_RATE
    output_sample_rate: int = OUTPUT_SAMPLE_RATE
    unit_ns: int = UNIT_NS
    first_unit_ns: int = FIRST_UNIT_NS

    def __init__(
        self,
        config: MiniCPMOConfig,
        *,
        model: Any = None,
        model_loader: Callable[[MiniCPMOConfig], Any] | None = None,
    ) -> None:
        self.config = config
        if config.sliding_window_mode == "off":
            _LOG.warning(
                "sliding_window_mode is off: the KV cache (8,192 tokens, ~75-100 tokens per unit) "
                "fills within minutes of always-on use; use basic or context on a robot"
            )
        if model is None:
            model = (model_loader or load_pretrained)(config)
        self._model = model
        if not callable(getattr(model, "as_duplex", None)):
            # The official demo's unified model wraps a DuplexCapability instead
            # (modeling_minicpmo_unified.py): no as_duplex(), no text_list, finalize_unit() after each
            # generate. This adapter speaks only to the HF remote code's MiniCPMODuplex.
            raise BackendProtocolError(
                f"the loaded model ({type(model).__name__}) has no as_duplex(): minicpmo needs the "
                "Hugging Face remote code (modeling_minicpmo.py with MiniCPMO.as_duplex); the "
                "official demo's unified model (DuplexCapability) is not supported"
            )
        try:
            self._duplex = model.as_duplex(**config.as_duplex_kwargs())
        except OmniError:
            raise
        except Exception as exc:
            raise _convert_error("model.as_duplex()", exc) from exc
        self._check_listen_settings()
        self._generate_kwargs = config.generate_kwargs()

        # Cross-thread interrupt: set by interrupt() (any thread), consumed by the worker thread.
        self._interrupt_lock = threading.Lock()
        self._interrupt_requested = False

        # Session state, touched only by the caller's worker thread.
        self._prepared = False
        self._system_prompt = ""
        self._ref_voice: FloatArray | None = None
        self._voice_path: str | None = None
        self._temp_voice_path: str | None = None
        self._units_fed = 0  # units the API accepted since its last prepare()
        self._caller_units = 0  # units the caller prefilled since its last prepare()
        self._pending = _Pending.NONE  # what the next generate() answers for
        self._prefill_timings: dict[str, float] = {}
        self._in_turn = False
        self._mute_turn = False
        self._close_turn = False
        self._carried_texts: list[str] = []  # text of a unit lost to a break, fed with the next
        self._stuck: threading.Thread | None = None
        self._stuck_reason = ""
        # Set when a prefill failed in a way that leaves the API's unit count unknown.
        self._needs_reset = ""
        self._closed = False

        #: Counters for diagnostics (read them between units).
        self.units_lost_to_interrupt = 0
        self.speech_units_muted = 0
        self.first_units_padded = 0
        self.listen_texts_dropped = 0
        self.texts_carried = 0
        self.turn_ends_recovered = 0

    # ------------------------------------------------------------------------------- protocol
    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        """Start a session: ``duplex.prepare`` with the prompt as given (the API wraps it)."""
        self._check_usable(preparing=True)
        voice: FloatArray | None = None
        if ref_voice is not None:
            voice = np.asarray(ref_voice, dtype=np.float32)
            if voice.ndim != 1 or voice.size == 0:
                raise ConfigError(
                    f"ref_voice has shape {voice.shape}; pass mono float32 audio at "
                    f"{INPUT_SAMPLE_RATE} Hz as a non-empty 1-D array"
                )
            voice = np.clip(np.nan_to_num(voice), -1.0, 1.0).astype(np.float32)
        elif self.config.ref_audio_path:
            voice = _read_wav_16k(self.config.ref_audio_path)
        self._system_prompt = system_prompt
        self._ref_voice = voice
        self._voice_path = self._tts_voice_path(ref_voice)
        self._prepared = False
        self._caller_units = 0
        self._needs_reset = ""
        self._carried_texts = []
        self._prepare_duplex()
        self._prepared = True

    def prefill(self, unit: Unit) -> None:
        """Feed exactly one unit: 16,560 samples the first time after prepare(), then 16,000."""
        self._check_usable()
        if not self._prepared:
            raise StateError("prefill() before prepare(): call prepare(system_prompt) first")
        if self._pending is not _Pending.NONE:
            raise StateError(
                "prefill() twice without generate(): call generate() after each prefill()"
            )
        self._check_unit(unit)
        frames = [_frame_to_pil(f, self.config.frame_max_area) for f in self._unit_frames(unit)]
        # Text is fed after the unit's audio and the decision comes from the audio feed's logits
        # (modeling_minicpmo.py streaming_prefill: step 3 audio sets pending_logits, step 4 text is
        # "mixed mode: just feed"), so it steers the next unit's decision. Text of a unit lost to a
        # break rides with this one.
        texts = [*self._carried_texts, *(t for t in unit.texts if t)]
        # Valid: from here on the unit belongs to the caller's timeline, even if the model fails.
        self._caller_units += 1

        # Clear a pending interrupt first (in reset mode this re-prepares: the unit becomes a first).
        self._take_interrupt()
        audio = self._unit_audio(unit)
        started = time.perf_counter()
        try:
            result = self._call(
                "streaming_prefill",
                self.config.prefill_timeout_s,
                self._duplex.streaming_prefill,
                audio_waveform=audio,
                frame_list=frames or None,
                text_list=texts or None,
                max_slice_nums=1,
            )
        except BackendError as exc:
            self._needs_reset = f"streaming_prefill failed ({exc})"
            raise
        wall_ms = (time.perf_counter() - started) * 1000.0
        if not isinstance(result, Mapping) or not isinstance(
            result.get("success"), (bool, np.bool_)
        ):
            raise BackendProtocolError(
                f"streaming_prefill returned {type(result).__name__} without a bool 'success': {result!r:.200}"
            )
        timings = {"prefill_call": wall_ms}
        for key, stage in _PREFILL_TIMINGS.items():
            if key in result:
                if not isinstance(result[key], _NUM_TYPES) or isinstance(result[key], bool):
                    raise BackendProtocolError(
                        f"streaming_prefill returned {key} = {result[key]!r}"
                    )
                timings[stage] = _ms("streaming_prefill", key, result[key])
        self._prefill_timings = timings
        if bool(result["success"]):
            self._units_fed += 1
            self._pending = _Pending.PREFILLED
            self._carried_texts = []
            return
        if self._duplex.is_session_stop_set():
            # Only prepare() clears a session stop: every later unit would vanish silently.
            raise BackendUnavailable(
                "streaming_prefill refused the unit: the model's session stop event is set "
                "(someone called set_session_stop()); call reset() and prepare() to start again"
            )
        if self._duplex.is_break_set() or self._interrupt_pending():
            # interrupt() landed after this unit started: the API made the call a no-op, on
            # purpose. The unit is lost (counted) and the next unit clears the break; a break set
            # by anyone else is handled the same way.
            with self._interrupt_lock:
                self._interrupt_requested = True
            self.units_lost_to_interrupt += 1
            self._close_turn = self._close_turn or self._in_turn
            self._pending = _Pending.LOST
            if texts:
                # The API returned before feeding anything: keep the words for the next unit.
                self.texts_carried += 1
                self._carried_texts = texts
            return
        # Whether the API consumed audio (and how much) is now unknown: feeding on could leave the
        # 16,560/16,000 accounting off and start the backlog this adapter exists to prevent.
        self._needs_reset = f"streaming_prefill refused a unit ({result.get('reason', '')!r})"
        raise BackendProtocolError(
            f"streaming_prefill failed: {result.get('reason', '')!r}. The API feeds <unit> before it "
            "validates, so a stray <unit> may now be in the KV cache: reset() and prepare() to start clean"
        )

    def generate(self) -> UnitResult:
        """Listen/speak decision and output for the unit prefilled last."""
        self._check_usable()
        if not self._prepared:
            raise StateError("generate() before prepare(): call prepare(system_prompt) first")
        if self._pending is _Pending.NONE:
            raise StateError(
                "generate() without prefill(): call prefill(unit) before each generate()"
            )
        pending, self._pending = self._pending, _Pending.NONE
        timings = dict(self._prefill_timings)
        if pending is _Pending.LOST:
            return self._listen_result(timings)

        # An interrupt between our prefill and this generate: honour it now.
        self._take_interrupt()
        kwargs = dict(self._generate_kwargs)
        spoken_before = self._spoken_token_count()
        started = time.perf_counter()
        raw = self._call(
            "streaming_generate",
            self.config.generate_timeout_s,
            self._duplex.streaming_generate,
            **kwargs,
        )
        timings["generate_call"] = (time.perf_counter() - started) * 1000.0
        fields = self._validate_generate(raw)
        for key, stage in _GENERATE_TIMINGS.items():
            timings[stage] = _ms("streaming_generate", key, fields[key])
        return self._map_result(fields, timings, spoken_before)

    def interrupt(self) -> None:
        """Barge-in: set the API's break event now (thread-safe); the next unit closes the turn."""
        with self._interrupt_lock:
            self._interrupt_requested = True
            try:
                self._duplex.set_break_event()
            except Exception as exc:  # a threading.Event.set() does not fail; a broken object might
                _LOG.warning("set_break_event failed: %s", exc)

    def reset(self) -> None:
        """Forget the conversation; the session then needs :meth:`prepare` again (the Protocol).

        The API has no reset of its own: its ``prepare()`` clears the KV cache and the break/stop
        events but keeps the Whisper encoder's streaming cache (``model.audio_past_key_values``,
        cleared only by ``MiniCPMO.reset_session``), so two fresh sessions fed the same first unit
        would decide differently. This clears that cache now; the KV cache is rebuilt by the
        :meth:`prepare` that must follow (running the API's prepare here too would prefill the
        prompt and voice twice).

        Raises:
            BackendTimeout: a call that timed out earlier is still running; try again later.
        """
        if self._stuck is not None:
            self._stuck.join(timeout=self.config.generate_timeout_s)
            if self._stuck.is_alive():
                raise BackendTimeout(
                    f"reset(): the {self._stuck_reason} that timed out is still running inside the "
                    "model; the object is not re-entrant, retry reset() later or restart the process"
                )
            self._stuck = None
            self._stuck_reason = ""
        with self._interrupt_lock:
            self._interrupt_requested = False
        self._prepared = False
        self._needs_reset = ""
        self._pending = _Pending.NONE
        self._carried_texts = []
        if self._closed:
            return
        self._clear_encoder_cache()

    def close(self) -> None:
        """Stop the session and drop the model reference (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._prepared = False
        # A threading.Event underneath: safe even while a timed-out call is still running.
        with contextlib.suppress(Exception):
            self._duplex.set_session_stop()
        self._remove_temp_voice()
        self._duplex = _ClosedDuplex()
        self._model = None

    # ------------------------------------------------------------------------------ internals
    def _check_listen_settings(self) -> None:
        """Refuse listen settings that break the loaded model.

        ``StreamDecoder`` takes its listen id from ``tokenizer.eos_token_id`` (``utils.py``
        ``StreamDecoder.__init__``: ``<|im_end|>``, 151645) while the duplex loop ends a listen unit
        only on ``<|listen|>`` (``modeling_minicpmo.py`` ``from_existing_model``:
        ``listen_token_id``, 151705; ``streaming_generate`` tests ``last_id == listen_token_id``).
        ``decode(listen_top_k=...)`` then returns ``<|im_end|>``, which the loop speaks: with it
        set every unit is speech. ``listen_prob_scale`` scales the same wrong logit.
        """
        decoder_id = getattr(getattr(self._duplex, "decoder", None), "listen_id", None)
        loop_id = getattr(self._duplex, "listen_token_id", None)
        if decoder_id is None or loop_id is None or int(decoder_id) == int(loop_id):
            return
        bad = []
        if self.config.listen_top_k is not None:
            bad.append(f"listen_top_k = {self.config.listen_top_k}")
        if self.config.listen_prob_scale != 1.0:
            bad.append(f"listen_prob_scale = {self.config.listen_prob_scale}")
        if bad:
            raise ConfigError(
                f"MiniCPMOConfig.{' and '.join(bad)}: this model's decoder acts on token "
                f"{int(decoder_id)} (<|im_end|>) but its duplex loop listens on token {int(loop_id)} "
                "(<|listen|>), so the setting makes the model speak instead of listen (with "
                "listen_top_k every unit becomes speech); remove it (listen_top_k unset, "
                "listen_prob_scale 1.0) and steer listening with force_listen_count and the prompt"
            )

    def _check_usable(self, *, preparing: bool = False) -> None:
        if self._closed:
            raise StateError("the minicpmo backend is closed; create a new one")
        if self._stuck is not None:
            raise BackendUnavailable(
                f"a {self._stuck_reason} timed out and may still be running inside the model, which is "
                "not re-entrant: call reset() (it waits for that call) before using the backend again"
            )
        if self._needs_reset and not preparing:
            raise BackendUnavailable(
                f"{self._needs_reset}; the model's unit accounting is unknown: "
                "call reset() and prepare() before feeding more units"
            )

    def _prepare_duplex(self) -> None:
        self._units_fed = 0
        self._pending = _Pending.NONE
        self._in_turn = False
        self._mute_turn = False
        self._close_turn = False
        with self._interrupt_lock:
            self._interrupt_requested = False
        self._clear_encoder_cache()
        self._call(
            "prepare",
            self.config.prepare_timeout_s,
            self._duplex.prepare,
            prefix_system_prompt=self._system_prompt or None,
            ref_audio=self._ref_voice,
            prompt_wav_path=self._voice_path,
        )
        if self._voice_path is None:
            _LOG.warning(
                "no TTS voice (prompt_wav_path / ref_audio_path / ref_voice): the model returns text only"
            )

    def _tts_voice_path(self, ref_voice: FloatArray | None) -> str | None:
        """The WAV file that sets the TTS voice (the API only takes a path).

        Checked here: the API hands the path straight to the vocoder's ``set_stream_cache``
        (``modeling_minicpmo.py`` ``MiniCPMODuplex.prepare`` -> ``_init_token2wav_cache``), whose
        OSError would otherwise read like missing weights.
        """
        for key in ("prompt_wav_path", "ref_audio_path"):
            configured: str | None = getattr(self.config, key)
            if configured:
                path = os.path.expanduser(configured)
                if not (os.path.isfile(path) and os.access(path, os.R_OK)):
                    raise ConfigError(
                        f"MiniCPMOConfig.{key} = {configured!r}: the TTS voice file does not exist "
                        "or is not readable; point it at a WAV file (or unset it for text-only "
                        "speech units)"
                    )
                return path
        self._remove_temp_voice()
        if ref_voice is None:
            return None
        from scipy.io import wavfile

        handle, path = tempfile.mkstemp(prefix="omni_ros_voice_", suffix=".wav")
        os.close(handle)
        wavfile.write(path, INPUT_SAMPLE_RATE, np.asarray(ref_voice, dtype=np.float32))
        self._temp_voice_path = path
        return path

    def _remove_temp_voice(self) -> None:
        if self._temp_voice_path is not None:
            with contextlib.suppress(OSError):
                os.remove(self._temp_voice_path)
            self._temp_voice_path = None

    def _check_unit(self, unit: Unit) -> None:
        """Reject a unit the API would mis-handle, before any state changes."""
        # The caller's timeline restarts at prepare(): its first unit is 1.035 s, the rest 1.0 s.
        first = self._caller_units == 0
        check_unit(
            unit,
            self,
            first,
            which="" if first else "a unit after the first",
            why="the duplex API consumes exactly one unit per call and would queue the rest",
        )

    def _unit_audio(self, unit: Unit) -> FloatArray:
        """Exactly the samples the API consumes in one call, so no backlog ever builds."""
        audio = np.asarray(unit.audio)
        api_first = self._units_fed == 0
        samples = np.clip(np.nan_to_num(audio.astype(np.float32, copy=False)), -1.0, 1.0)
        if api_first and samples.size == UNIT_SAMPLES:
            # The API still waits for its 16,560-sample first unit although the caller is past its
            # own (the first unit was lost to a break, or interrupt_mode reset re-prepared). The
            # API would left-pad it itself; doing it here keeps the count exact.
            self.first_units_padded += 1
            samples = np.concatenate(
                [np.zeros(FIRST_UNIT_SAMPLES - UNIT_SAMPLES, np.float32), samples]
            )
        out: FloatArray = np.ascontiguousarray(samples, dtype=np.float32)
        return out

    def _unit_frames(self, unit: Unit) -> tuple[VideoFrame, ...]:
        if not unit.frames:
            return ()
        return unit.frames[-self.config.max_frames_per_unit :]

    def _interrupt_pending(self) -> bool:
        with self._interrupt_lock:
            return self._interrupt_requested

    def _take_interrupt(self) -> None:
        """On the worker thread: clear the break an interrupt() set and close the turn it cut."""
        with self._interrupt_lock:
            if not self._interrupt_requested:
                return
            self._interrupt_requested = False
            self._duplex.clear_break_event()
        self._close_turn = self._close_turn or self._in_turn
        if self.config.interrupt_mode == "reset":
            # A clean stop: the HF API cannot switch to listen mid-turn, prepare() is its only reset.
            was_in_turn = self._close_turn
            self._prepare_duplex()
            self._close_turn = was_in_turn
        # The unit after an interrupt is always a listen. Speech the model produces from here on
        # belongs to a turn the user cut (or, after a reset, one whose start was decided while the
        # user was talking), so it is muted until the model itself listens or ends that turn.
        self._mute_turn = True

    def _listen_result(self, timings: dict[str, float]) -> UnitResult:
        end_of_turn = self._close_turn
        self._close_turn = False
        self._in_turn = False
        return UnitResult(is_listen=True, end_of_turn=end_of_turn, timings_ms=timings)

    def _validate_generate(self, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, Mapping):
            raise BackendProtocolError(
                f"streaming_generate returned {type(raw).__name__}, expected a dict with "
                f"{sorted(_GENERATE_KEYS)}"
            )
        missing = [key for key in _GENERATE_KEYS if key not in raw]
        if missing:
            raise BackendProtocolError(f"streaming_generate result lacks {missing}")
        fields: dict[str, Any] = {}
        for key, types in _GENERATE_KEYS.items():
            value = raw[key]
            if key == "audio_waveform" and value is not None and not isinstance(value, np.ndarray):
                value = _to_numpy(value)
            bad_bool = isinstance(value, bool) and bool not in types
            if not isinstance(value, types) or bad_bool:
                raise BackendProtocolError(
                    f"streaming_generate returned {key} = {value!r:.80} of type "
                    f"{type(value).__name__}; expected {' | '.join(t.__name__ for t in types)}"
                )
            fields[key] = value
        return fields

    def _map_result(
        self, fields: dict[str, Any], timings: dict[str, float], spoken_before: int | None
    ) -> UnitResult:
        raw_listen = bool(fields["is_listen"])
        raw_end = bool(fields["end_of_turn"])
        text = str(fields["text"])
        if raw_listen and self._in_turn and not self._mute_turn:
            # Mid-turn the loop turns a sampled <|listen|> into <|tts_bos|> until <|turn_eos|> set
            # current_turn_ended (modeling_minicpmo.py streaming_generate). So a listen while a
            # turn is open means this unit spoke <|turn_eos|> and then <|listen|>: the API returns a
            # bare listen (text "", end_of_turn False) and skips the TTS and its end-of-turn reset.
            return self._recover_turn_end(timings, spoken_before)
        if self._mute_turn:
            if raw_listen or raw_end:
                self._mute_turn = False
            if not raw_listen:
                self.speech_units_muted += 1
            return self._listen_result(timings)
        if raw_listen:
            if text:
                # A listen unit carries no words; keep the Protocol's invariant and count it.
                self.listen_texts_dropped += 1
            end_of_turn = raw_end or self._close_turn
            self._close_turn = False
            self._in_turn = False
            return UnitResult(is_listen=True, end_of_turn=end_of_turn, timings_ms=timings)
        audio = self._speech_audio(fields["audio_waveform"])
        self._in_turn = not raw_end
        self._close_turn = False
        return UnitResult(
            is_listen=False, text=text, audio=audio, end_of_turn=raw_end, timings_ms=timings
        )

    def _recover_turn_end(self, timings: dict[str, float], spoken_before: int | None) -> UnitResult:
        """The words and the end of turn of a unit that spoke ``<|turn_eos|>`` then ``<|listen|>``."""
        self.turn_ends_recovered += 1
        self._in_turn = False
        self._close_turn = False
        words = ""
        res_ids = getattr(self._duplex, "res_ids", None)
        tokenizer = getattr(self._duplex, "tokenizer", None)
        if spoken_before is not None and isinstance(res_ids, list) and tokenizer is not None:
            # res_ids collects every spoken token of the session (streaming_generate appends each
            # non-<|speak|> token before feeding it back).
            with contextlib.suppress(Exception):
                words = str(tokenizer.decode(res_ids[spoken_before:], skip_special_tokens=True))
        self._close_tts_turn()
        if not words.strip():
            return UnitResult(is_listen=True, end_of_turn=True, timings_ms=timings)
        # The vocoder never ran for these words (no audio); the text and the turn end still count.
        return UnitResult(
            is_listen=False, text=words.strip(), audio=None, end_of_turn=True, timings_ms=timings
        )

    def _close_tts_turn(self) -> None:
        """Reset the TTS turn state as ``streaming_generate`` does after an end of turn.

        The API skips this when the unit that ended the turn was a listen, and the next turn's
        speech would continue the old turn's TTS context (the same three assignments and
        ``_reset_token2wav_for_new_turn`` as ``modeling_minicpmo.py`` streaming_generate).
        """
        duplex = self._duplex
        if not hasattr(duplex, "tts_text_start_pos"):
            return
        try:
            duplex.tts_text_start_pos = 0
            duplex.tts_past_key_values = None
            duplex.tts_current_turn_start_time = None
            reset = getattr(duplex, "_reset_token2wav_for_new_turn", None)
            if callable(reset):
                reset()
        except Exception as exc:  # a broken object must not cost the caller its unit
            _LOG.warning("could not reset the TTS turn state: %s", exc)

    def _spoken_token_count(self) -> int | None:
        res_ids = getattr(self._duplex, "res_ids", None)
        return len(res_ids) if isinstance(res_ids, list) else None

    def _clear_encoder_cache(self) -> None:
        """Forget the Whisper encoder's streaming cache (the API's prepare() keeps it).

        ``get_audio_embedding_streaming`` continues from ``model.audio_past_key_values``; only
        ``MiniCPMO.reset_session`` sets it to None (``modeling_minicpmo.py``), and
        ``MiniCPMODuplex.prepare`` never calls that.
        """
        model = getattr(self._duplex, "model", None) or self._model
        if model is not None and hasattr(model, "audio_past_key_values"):
            try:
                model.audio_past_key_values = None
            except Exception as exc:
                _LOG.warning("could not clear the audio encoder cache: %s", exc)

    @staticmethod
    def _speech_audio(value: np.ndarray | None) -> FloatArray | None:
        if value is None:
            return None  # the TTS token buffer is still filling
        audio = np.asarray(value)
        if audio.ndim == 2 and 1 in audio.shape:
            audio = audio.reshape(-1)
        if audio.ndim != 1:
            raise BackendProtocolError(
                f"streaming_generate audio has shape {audio.shape}; expected 1-D"
            )
        if audio.size == 0:
            return None
        audio = audio.astype(np.float32, copy=False)
        if not np.all(np.isfinite(audio)):
            raise BackendProtocolError("streaming_generate returned non-finite audio samples")
        out: FloatArray = np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False)
        return out

    def _call(self, what: str, timeout_s: float, func: Callable[..., _T], /, **kwargs: Any) -> _T:
        """Run ``func`` in a worker thread with a deadline, converting its errors.

        A thread per call, not a pool: after a timeout the stuck thread is abandoned (Python cannot
        kill it), and the backend refuses calls until :meth:`reset` sees it finish.
        """
        box: dict[str, Any] = {}
        done = threading.Event()

        def run() -> None:
            try:
                box["value"] = func(**kwargs)
            except BaseException as exc:  # re-raised on the caller's thread below
                box["error"] = exc
            finally:
                done.set()

        thread = threading.Thread(target=run, name=f"minicpmo-{what}", daemon=True)
        thread.start()
        if not done.wait(timeout_s):
            self._stuck = thread
            self._stuck_reason = f"{what} call"
            raise BackendTimeout(
                f"{what} did not finish within {timeout_s:g} s; the backend refuses further calls "
                "until reset() (the model object is not re-entrant)"
            )
        error = box.get("error")
        if error is not None:
            if isinstance(error, OmniError):
                raise error
            if not isinstance(error, Exception):
                raise error  # KeyboardInterrupt / SystemExit travel unchanged
            raise _convert_error(what, error) from error
        value: _T = box["value"]
        return value


def _to_numpy(value: Any) -> Any:
    """Accept a torch tensor where the API documents a numpy array (converted, not trusted)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        try:
            return value.detach().float().cpu().numpy()
        except Exception:
            return value
    return value


class _ClosedDuplex:
    """Stands in for the released API object after close(); every call fails clearly."""

    def __getattr__(self, name: str) -> Any:
        raise StateError("the minicpmo backend is closed; create a new one")
