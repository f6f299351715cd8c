"""Streaming voice activity detection on the (echo-cancelled) microphone stream.

The detector wraps WebRTC's GMM VAD (``webrtcvad`` from the ``webrtcvad-wheels`` package), which
classifies fixed 10/20/30 ms int16 frames at 8/16/32/48 kHz. :class:`VoiceActivityDetector` accepts
float32 :class:`~omni_ros.core.types.AudioBlock` s of any length, keeps the samples that do not fill a
frame for the next block, and turns per-frame decisions into speech *runs* with two debounce rules:

* an onset is reported only after ``min_speech_ms`` of consecutive speech frames (clicks, door slams
  and single noisy frames do not count), stamped at the first speech frame of the run;
* a run ends only after ``hangover_ms`` of consecutive non-speech frames (short pauses between words
  stay one run), stamped at the end of the last speech frame.

Every stamp is sample-exact: frame ``j`` of a contiguous stream starts at
``anchor_ns + round(j * frame_len * 1e9 / rate)`` where ``anchor_ns`` is the stamp of the sample that
started the stream, so rounding never accumulates. A block whose stamp does not continue the stream
(a gap, an overlap, a clock jump) restarts it.

:class:`SileroVad` is the frame classifier the barge-in detector (:mod:`omni_ros.core.bargein`) runs
on the echo-cancelled signal: Silero VAD's ONNX model, shipped inside the ``silero-vad`` wheel, run
through onnxruntime (not torch; the package is only used for its data file, never imported). It
gives a speech probability per 32 ms frame and costs about 0.3 ms of one core per frame on the
2-core x86_64 development machine (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import collections
import enum
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omni_ros.core.clock import NS_PER_S
from omni_ros.core.config import from_mapping
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.core.types import AudioBlock, FloatArray

_VAD_RATES = (8_000, 16_000, 32_000, 48_000)
_VAD_FRAME_MS = (10, 20, 30)
_BARGE_IN_MODELS = ("silero", "webrtc")
# Silero VAD v5/v6 streaming contract (snakers4/silero-vad, src/silero_vad/utils_vad.py,
# OnnxWrapper.__call__): 512 new samples at 16 kHz (256 at 8 kHz) per call, preceded by the last
# 64 (32) samples of the previous call as context, with a (2, 1, 128) recurrent state.
SILERO_FRAME = {16_000: 512, 8_000: 256}
_SILERO_CONTEXT = {16_000: 64, 8_000: 32}
# The 16 kHz-only opset-15 export is ~2x cheaper than the dual-rate silero_vad.onnx (measured
# 0.28 vs 0.59 ms per frame, onnxruntime 1.32, one thread); 8 kHz needs the dual-rate model.
_SILERO_MODEL = {16_000: "silero_vad_16k_op15.onnx", 8_000: "silero_vad.onnx"}


@dataclass(frozen=True)
class VadConfig:
    """Voice activity detector settings.

    Attributes:
        aggressiveness: WebRTC VAD mode 0 (least aggressive about filtering out non-speech) to 3.
        frame_ms: analysis frame, 10, 20 or 30 ms.
        min_speech_ms: consecutive speech needed before an onset is reported. WebRTC's VAD adds
            its own ~4-frame hangover after any voiced burst and flags the first frames of a new
            stream while it learns the noise floor, so anything below ~150 ms lets clicks through.
        hangover_ms: consecutive non-speech needed before a speech run ends.
        history_s: how long finished speech runs are remembered for :meth:`speech_in` queries.
        contiguity_tolerance_ns: a block whose stamp is within this of the expected next stamp
            continues the stream; otherwise the stream restarts (default: a quarter millisecond).
        barge_in_model: frame classifier of the barge-in detector on the echo-cancelled signal:
            ``silero`` (neural, needs the ``silero-vad`` wheel and onnxruntime; the AEC must run
            at 8 or 16 kHz) or ``webrtc`` (the GMM VAD above, frame by frame; more false speech
            on residual echo).
        silero_threshold: speech probability above which a Silero frame counts as speech.
        barge_in_min_speech_ms: near-end speech (classifier frames that the double-talk test
            also accepts) needed for a barge-in. 64 ms (two Silero frames) measured 0 false
            barge-ins in 20 min of own echo over four echo paths; 32 ms made 1 in 12 min
            (benchmarks/aec_bench.py, docs/BENCHMARKS.md).
        barge_in_young_min_speech_ms: the same while the echo canceller is young (it has not
            heard ``aec.warmup_ms`` of our speech since its last filter reset: the first seconds
            after a start or a re-alignment). 96 ms (three Silero frames) measured fewer false
            barge-ins in fresh starts at +32-45 ms of latency there (docs/BENCHMARKS.md).
        barge_in_hangover_ms: other frames allowed inside a confirmed near-end run (between
            words) before it ends (the ``robot_speaking`` gate measures whole runs).
    """

    aggressiveness: int = 2
    frame_ms: int = 30
    min_speech_ms: int = 180
    hangover_ms: int = 300
    history_s: float = 30.0
    contiguity_tolerance_ns: int = 250_000
    barge_in_model: str = "silero"
    silero_threshold: float = 0.5
    barge_in_min_speech_ms: int = 64
    barge_in_young_min_speech_ms: int = 96
    barge_in_hangover_ms: int = 300

    def __post_init__(self) -> None:
        if not 0 <= self.aggressiveness <= 3:
            raise ConfigError(f"VadConfig.aggressiveness = {self.aggressiveness}; use 0..3")
        if self.frame_ms not in _VAD_FRAME_MS:
            raise ConfigError(f"VadConfig.frame_ms = {self.frame_ms}; use one of {_VAD_FRAME_MS}")
        if self.min_speech_ms < 0 or self.hangover_ms < 0:
            raise ConfigError("VadConfig.min_speech_ms and hangover_ms must be >= 0")
        if self.history_s <= 0:
            raise ConfigError(f"VadConfig.history_s = {self.history_s}; must be > 0")
        if self.contiguity_tolerance_ns < 0:
            raise ConfigError("VadConfig.contiguity_tolerance_ns must be >= 0")
        if self.barge_in_model not in _BARGE_IN_MODELS:
            raise ConfigError(
                f"VadConfig.barge_in_model = {self.barge_in_model!r}; use one of {_BARGE_IN_MODELS}"
            )
        if not 0.0 < self.silero_threshold < 1.0:
            raise ConfigError(f"VadConfig.silero_threshold = {self.silero_threshold}; use (0, 1)")
        if (
            self.barge_in_min_speech_ms < 0
            or self.barge_in_young_min_speech_ms < 0
            or self.barge_in_hangover_ms < 0
        ):
            raise ConfigError(
                "VadConfig.barge_in_min_speech_ms, barge_in_young_min_speech_ms and "
                "barge_in_hangover_ms must be >= 0"
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> VadConfig:
        """Build from a plain mapping (YAML / ROS parameters); unknown keys raise ConfigError."""
        return from_mapping(cls, mapping)


class VadEventKind(enum.Enum):
    """What a :class:`VadEvent` reports."""

    ONSET = "onset"
    OFFSET = "offset"


@dataclass(frozen=True)
class VadEvent:
    """A debounced speech boundary.

    Attributes:
        kind: onset (speech run confirmed) or offset (run ended after the hangover).
        stamp_ns: onset: capture time of the run's first speech frame; offset: end of its last
            speech frame.
        detected_ns: capture time of the end of the frame that made the decision (the earliest
            moment a causal system could know).
    """

    kind: VadEventKind
    stamp_ns: int
    detected_ns: int


@dataclass
class VadState:
    """Explicit streaming state of :class:`VoiceActivityDetector` (see :meth:`reset`)."""

    sample_rate: int = 0
    anchor_ns: int = 0  # stamp of the stream's first sample
    frames_done: int = 0  # frames classified since the anchor
    remainder: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    speech_frames: int = 0  # consecutive speech frames (candidate or confirmed run)
    silence_frames: int = 0  # consecutive non-speech frames inside a confirmed run
    run_start_ns: int | None = None  # first frame of the current candidate/confirmed run
    last_speech_end_ns: int = 0
    in_speech: bool = False  # a confirmed run is active
    runs: collections.deque[tuple[int, int]] = field(default_factory=collections.deque)

    def reset(self) -> None:
        """Forget everything (a new stream)."""
        self.sample_rate = 0
        self.anchor_ns = 0
        self.frames_done = 0
        self.remainder = np.zeros(0, dtype=np.float32)
        self.speech_frames = 0
        self.silence_frames = 0
        self.run_start_ns = None
        self.last_speech_end_ns = 0
        self.in_speech = False
        self.runs.clear()


class VoiceActivityDetector:
    """Streaming, debounced WebRTC VAD over float32 audio blocks of any size.

    Args:
        config: detector settings.

    Raises:
        ConfigError: ``webrtcvad`` is not installed.
    """

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        try:
            import webrtcvad
        except ImportError as exc:  # pragma: no cover - the dependency is in requirements/base.txt
            raise ConfigError(
                "the VAD needs webrtcvad: pip install webrtcvad-wheels (see requirements/base.txt)"
            ) from exc
        self._vad = webrtcvad.Vad(self.config.aggressiveness)
        self.state = VadState()

    # ------------------------------------------------------------------------------------ queries
    @property
    def in_speech(self) -> bool:
        """Whether a confirmed speech run is active right now."""
        return self.state.in_speech

    def active_run(self) -> tuple[int, int] | None:
        """The ongoing speech run as ``(start_ns, duration_ns)``, or None.

        The run counts from its first speech frame, also before it is confirmed, so a caller can
        require more evidence than ``min_speech_ms`` (the ``robot_speaking`` gate does).
        """
        st = self.state
        if st.run_start_ns is None or st.speech_frames == 0:
            return None
        return st.run_start_ns, st.last_speech_end_ns - st.run_start_ns

    def speech_in(self, start_ns: int, end_ns: int) -> bool:
        """Whether a confirmed speech run overlapped ``[start_ns, end_ns)``."""
        st = self.state
        for run_start, run_end in st.runs:
            if run_start < end_ns and run_end > start_ns:
                return True
        return bool(st.in_speech and st.run_start_ns is not None and st.run_start_ns < end_ns)

    # ---------------------------------------------------------------------------------- streaming
    def reset(self) -> None:
        """Start over (after a clock jump or a session reset)."""
        self.state.reset()

    def process(self, block: AudioBlock) -> list[VadEvent]:
        """Classify ``block`` (continuing the stream if its stamp says so) and return new events.

        Raises:
            DecodeError: the block's sample rate is not one WebRTC VAD supports.
        """
        if block.sample_rate not in _VAD_RATES:
            raise DecodeError(
                f"VAD needs audio at one of {_VAD_RATES} Hz, got {block.sample_rate} Hz; "
                "resample the microphone stream first (omni_ros.core.audio)"
            )
        st = self.state
        if len(block.samples) == 0:
            return []
        if st.sample_rate != block.sample_rate or not self._continues(block):
            self._restart(block)
        samples = block.samples
        if len(st.remainder):
            samples = np.concatenate([st.remainder, samples])
        frame_len = block.sample_rate * self.config.frame_ms // 1000
        n_frames = len(samples) // frame_len
        used = n_frames * frame_len
        st.remainder = samples[used:].astype(np.float32, copy=True)
        if n_frames == 0:
            return []
        pcm = (np.clip(samples[:used], -1.0, 1.0) * 32767.0).astype("<i2")
        raw = pcm.tobytes()
        step = frame_len * 2
        events: list[VadEvent] = []
        for j in range(n_frames):
            is_speech = self._vad.is_speech(raw[j * step : (j + 1) * step], block.sample_rate)
            self._on_frame(bool(is_speech), events)
        self._trim_history()
        return events

    def _frame_stamp(self, frame_index: int) -> int:
        st = self.state
        frame_len = st.sample_rate * self.config.frame_ms // 1000
        return st.anchor_ns + round(frame_index * frame_len * NS_PER_S / st.sample_rate)

    def _expected_next_ns(self) -> int:
        st = self.state
        frame_len = st.sample_rate * self.config.frame_ms // 1000
        n = st.frames_done * frame_len + len(st.remainder)
        return st.anchor_ns + round(n * NS_PER_S / st.sample_rate)

    def _continues(self, block: AudioBlock) -> bool:
        if self.state.sample_rate == 0:
            return False
        return abs(block.stamp_ns - self._expected_next_ns()) <= self.config.contiguity_tolerance_ns

    def _restart(self, block: AudioBlock) -> None:
        """Begin a new contiguous stream at ``block``; a confirmed run is closed where data ended."""
        st = self.state
        if st.in_speech and st.run_start_ns is not None:
            st.runs.append((st.run_start_ns, st.last_speech_end_ns))
        keep = st.runs
        st.reset()
        st.runs = keep
        st.sample_rate = block.sample_rate
        st.anchor_ns = block.stamp_ns

    def _on_frame(self, is_speech: bool, events: list[VadEvent]) -> None:
        st = self.state
        cfg = self.config
        start_ns = self._frame_stamp(st.frames_done)
        end_ns = self._frame_stamp(st.frames_done + 1)
        st.frames_done += 1
        min_frames = -(-cfg.min_speech_ms // cfg.frame_ms)  # ceil
        hang_frames = -(-cfg.hangover_ms // cfg.frame_ms)
        if is_speech:
            if st.speech_frames == 0 and not st.in_speech:
                st.run_start_ns = start_ns
            st.speech_frames += 1
            st.silence_frames = 0
            st.last_speech_end_ns = end_ns
            if not st.in_speech and st.speech_frames >= max(1, min_frames):
                st.in_speech = True
                assert st.run_start_ns is not None
                events.append(VadEvent(VadEventKind.ONSET, st.run_start_ns, end_ns))
            return
        if not st.in_speech:
            # An unconfirmed candidate run needs *consecutive* speech frames.
            st.speech_frames = 0
            st.run_start_ns = None
            return
        st.silence_frames += 1
        if st.silence_frames >= max(1, hang_frames):
            assert st.run_start_ns is not None
            st.runs.append((st.run_start_ns, st.last_speech_end_ns))
            events.append(VadEvent(VadEventKind.OFFSET, st.last_speech_end_ns, end_ns))
            st.in_speech = False
            st.speech_frames = 0
            st.silence_frames = 0
            st.run_start_ns = None

    def _trim_history(self) -> None:
        st = self.state
        horizon = self._frame_stamp(st.frames_done) - int(self.config.history_s * NS_PER_S)
        while st.runs and st.runs[0][1] < horizon:
            st.runs.popleft()


# ------------------------------------------------------------------------------------ Silero VAD
def silero_model_path(sample_rate: int) -> str:
    """Path of Silero's ONNX model for ``sample_rate`` inside the installed ``silero-vad`` wheel.

    The package is located, not imported: its ``__init__`` imports torch, which the detector
    does not need.

    Raises:
        ConfigError: the rate is not 8 or 16 kHz, or the wheel is not installed.
    """
    if sample_rate not in _SILERO_MODEL:
        raise ConfigError(
            f"Silero VAD runs at 8000 or 16000 Hz, the echo canceller at {sample_rate} Hz: set "
            "aec.sample_rate to 16000 (or vad.barge_in_model: webrtc)"
        )
    spec = importlib.util.find_spec("silero_vad")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = f"{location}/data/{_SILERO_MODEL[sample_rate]}"
        if os.path.isfile(path):
            return path
    raise ConfigError(
        "barge-in detection needs Silero VAD's model: pip install silero-vad onnxruntime "
        "(see requirements/base.txt), or set vad.barge_in_model: webrtc"
    )


@dataclass
class SileroState:
    """Explicit recurrent state of :class:`SileroVad` (see :meth:`reset`)."""

    rnn: FloatArray = field(default_factory=lambda: np.zeros((2, 1, 128), dtype=np.float32))
    context: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    def reset(self) -> None:
        """Forget the stream (the model starts from silence)."""
        self.rnn = np.zeros((2, 1, 128), dtype=np.float32)
        self.context = np.zeros(0, dtype=np.float32)


class SileroVad:
    """Silero VAD through onnxruntime: :meth:`step` takes exactly one frame, returns P(speech).

    Args:
        sample_rate: 8000 or 16000 Hz.

    Raises:
        ConfigError: the model or onnxruntime is missing, or the rate is not supported.
    """

    def __init__(self, sample_rate: int = 16_000) -> None:
        path = silero_model_path(sample_rate)
        try:
            import onnxruntime
        except ImportError as exc:
            raise ConfigError(
                "barge-in detection with Silero VAD needs onnxruntime: pip install onnxruntime "
                "(see requirements/base.txt), or set vad.barge_in_model: webrtc"
            ) from exc
        opts = onnxruntime.SessionOptions()
        # One frame at a time: threads only add hand-off latency (the upstream wrapper does too).
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3  # the exported graph carries unused initializers it warns about
        self._session = onnxruntime.InferenceSession(
            path, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.sample_rate = sample_rate
        self.frame_len = SILERO_FRAME[sample_rate]
        self._context_len = _SILERO_CONTEXT[sample_rate]
        self._sr = np.array(sample_rate, dtype=np.int64)
        self.state = SileroState()

    def reset(self) -> None:
        """Start a new stream."""
        self.state.reset()

    def step(self, frame: FloatArray) -> float:
        """Speech probability of one ``frame_len``-sample frame (float32 in [-1, 1]).

        Raises:
            DecodeError: the frame has the wrong length.
        """
        if len(frame) != self.frame_len:
            raise DecodeError(
                f"SileroVad.step takes exactly {self.frame_len} samples at {self.sample_rate} Hz, "
                f"got {len(frame)}: buffer the stream into frames first"
            )
        st = self.state
        x = np.asarray(frame, dtype=np.float32)
        context = st.context if len(st.context) else np.zeros(self._context_len, np.float32)
        window = np.concatenate([context, x])[None, :]
        prob, st.rnn = self._session.run(None, {"input": window, "state": st.rnn, "sr": self._sr})
        st.context = x[-self._context_len :].copy()
        return float(np.asarray(prob).reshape(-1)[0])
