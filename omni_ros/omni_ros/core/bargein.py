"""Barge-in decision: is the user talking over our own speech, frame by frame?

The microphone carries the user and the echo of what the robot plays. The echo canceller removes
most of the echo, but not all and not at once: Speex needs 2-3 s of speech to converge (after a
start, and again after a re-alignment), and until then its output is nearly the raw echo, which any
VAD calls speech. A fixed speech-run guard (the old 400 ms ``echo_min_speech_ms``) is both slow and
blind during convergence. :class:`BargeInDetector` instead asks, for each 32 ms frame of the
echo-cancelled signal, two questions:

1. **Is it speech?** Silero VAD (:class:`~omni_ros.core.vad.SileroVad`) on the cleaned frame.
2. **Is it more than our echo can explain?** The frame's cleaned energy ``E_e`` is compared with the
   energy the echo path could bring from what played: ``E_x`` is the loudest 16 ms of the reference
   that can reach this frame (the estimated delay, minus a tolerance, to the delay plus the room's
   ``echo_tail_ms``; before any delay estimate: anywhere from 0 to ``max_delay_ms``). The ratio
   ``E_e / E_x`` of frames judged echo-only is the canceller's *residual-to-reference ratio*: it
   starts near the echo path's own gain and falls by 20-40 dB as Speex converges. Its recent
   90th percentile ``r`` is learned online, and a frame is near-end speech only if
   ``E_e > r * dtd_margin_db``. A frame that may be the user is not learned: one Silero calls
   speech within the margin's upper half, and one above the threshold with P in Silero's
   hysteresis band (the first syllable of a user starting early in a turn). Until 8 echo-only
   frames (~250 ms) have been heard, ``r`` is the conservative ``dtd_prior_db``. When the canceller resets its filter (a re-alignment), the history's residual
   energies are replaced by the raw microphone energies (what an unconverged filter passes), and
   when the delay estimate moves, every ratio is recomputed against the new window, so neither
   event blinds the detector or lets echo through. A reset also ends the current run: what the
   old filter heard as near-end is as often the changed echo path itself.
3. **After a replay.** At a delay estimate that finds the filter young (the first one, or a
   re-alignment), the canceller adapts it on its last second of microphone audio
   (``aec.replay_passes``), so it is converged at once instead of after 2-3 s of our speech.
   The history is then learned again from the replay's untrained end (its a-priori residual,
   what the next frames can expect): the frames where our echo's direct path had arrived, that
   did not count as the user (after a re-alignment every frame, the old filter's verdicts do
   not count), and that lie within the margin of the lower quartile of their ratios (the user,
   if they were already talking, sits above it). The user who starts 0.5 s into our first turn,
   or 0.1 s after a re-alignment, is heard (docs/BENCHMARKS.md); one who starts as our first
   echo arrives is not: nothing tells their voice from an echo path not heard yet.

4. **Per frequency bin, while the canceller is young** (``aec.dtd_spectral``, on by default). In the
   first second of a start the filter has heard too little of our echo to cancel it, so the residual
   is about the echo's full level, and a user as loud as our echo is within the broadband ratio's
   spread (measured: the 0 dB ``start`` trials decided after 0.7-2.3 s, docs/BENCHMARKS.md). The raw
   microphone's power spectrum is compared bin by bin with the power the echo path can bring there:
   the reference's spectrum at the estimated delay plus its reverberant tail, times a per-bin gain
   learned on echo-only frames (their median, from 4 frames on). Two voices seldom fill the same
   bins at once, so a frame with ``dtd_spectral_fraction`` of its 150-4000 Hz power more than
   ``dtd_spectral_db`` above that prediction is near-end, if Silero calls it speech. How reverberant
   the room is (the tail's level and decay) is learned with the gain: of a small set of tail models,
   the one that predicts the learned frames best. The test needs the delay, not a converged filter,
   and applies only once the delay is known: before, the loudest spectrum at any lag is no bound on
   a reverberant echo. A frame it calls near-end is not learned as echo unless Silero rejects it
   outright (as above: that is how the learned ratio follows a room change).

``barge_in_min_speech_ms`` of consecutive near-end frames make a barge-in run
(``barge_in_young_min_speech_ms`` while the canceller is young: it has not yet heard
``aec.warmup_ms`` of our speech since its last filter reset, i.e. the first seconds after a start
or a re-alignment, where echo the filter has not learned yet looks most like the user: measured,
most false barge-ins of fresh starts, docs/BENCHMARKS.md); the flow decides with it and the
session's speech span (:meth:`omni_ros.core.flow.OmniFlow._check_barge_in`). Frames with
no reference that could echo are judged by the classifier alone.

Every frame stamp is sample-exact from the stream's anchor; a block whose stamp does not continue
the stream restarts it (like :class:`~omni_ros.core.vad.VoiceActivityDetector`).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from omni_ros.core.aec import AecConfig, EchoCanceller
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import DecodeError
from omni_ros.core.types import AudioBlock, FloatArray
from omni_ros.core.vad import SILERO_FRAME, SileroVad, VadConfig

_SUB_BLOCK_MS = 16  # the reference envelope's resolution: about one syllable's attack
_REF_FLOOR = 1e-7  # mean square below which the reference cannot echo audibly (-70 dBFS)
_DELAY_TOLERANCE_NS = 20_000_000  # GCC-PHAT's estimate vs the true direct path (+-2 ms measured)
# Silero's hysteresis (utils_vad.get_speech_timestamps: neg_threshold = threshold - 0.15).
_HYSTERESIS = 0.15
# The spectral test (AecConfig.dtd_spectral): its band, the learned frames it needs, how many it
# keeps, and the gain's smoothing across bins (5 bins of 31.25 Hz at 16 kHz: about a harmonic's
# spacing, so one voice's partials do not each get a gain of their own).
_SPEC_LOW_HZ, _SPEC_HIGH_HZ = 150.0, 4000.0
Spectrum = npt.NDArray[np.float64]  # power per frequency bin (or rows of them)
_SPEC_MIN_FRAMES = 4
_SPEC_HISTORY_FRAMES = 16
_SPEC_SMOOTH_BINS = 5
_DECAY_60_DB = 13.8  # ln(1e6): energy down 60 dB over the tail
# The reverberation models tried: energy down 60 or 30 dB over echo_tail_ms, at these levels
# against the direct path (a steady sound's tail over its direct energy).
_SPEC_TAIL_DECAYS = (_DECAY_60_DB, _DECAY_60_DB / 2)
_SPEC_TAIL_LEVELS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def _tail_weights(n: int, sub_ns: float, tail_ns: float, decay: float) -> Spectrum:
    """Weights of the ``n`` blocks (``sub_ns`` apart, oldest first) before the direct path in an
    exponential reverberation whose energy falls by ``exp(-decay)`` over ``tail_ns``."""
    age = np.arange(n, 0, -1, dtype=np.float64) * sub_ns
    tau = tail_ns / decay
    weights: Spectrum = np.exp(-age / tau) * (sub_ns / tau)
    return weights


class FrameClassifier(Protocol):
    """Speech probability of one frame (Silero, or WebRTC's 0/1 decision)."""

    frame_len: int

    def step(self, frame: FloatArray) -> float:
        """P(speech) for exactly ``frame_len`` samples."""
        ...

    def reset(self) -> None:
        """Start a new stream."""
        ...


class _WebRtcFrames:
    """WebRTC's GMM VAD as a :class:`FrameClassifier` (1.0 for speech, 0.0 otherwise)."""

    def __init__(self, sample_rate: int, frame_ms: int, aggressiveness: int) -> None:
        import webrtcvad

        self._vad = webrtcvad.Vad(aggressiveness)
        self._rate = sample_rate
        self.frame_len = sample_rate * frame_ms // 1000

    def step(self, frame: FloatArray) -> float:
        pcm = (np.clip(frame, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        return 1.0 if self._vad.is_speech(pcm, self._rate) else 0.0

    def reset(self) -> None:
        pass


@dataclass(frozen=True)
class FrameVerdict:
    """What the detector concluded about one frame (for benchmarks, tests and diagnostics).

    Attributes:
        start_ns: capture time of the frame's first sample.
        end_ns: capture time just after its last sample (when a causal system can know).
        speech_prob: the classifier's P(speech) on the cleaned frame.
        echo_possible: some reference could be echoing in this frame.
        ratio_db: cleaned energy over the reference envelope, dB (None when no echo possible).
        threshold_db: the learned residual ratio plus the margin, dB (None likewise).
        near_end: the frame counts as the user's speech.
    """

    start_ns: int
    end_ns: int
    speech_prob: float
    echo_possible: bool
    ratio_db: float | None
    threshold_db: float | None
    near_end: bool


@dataclass
class BargeInState:
    """Explicit streaming state of :class:`BargeInDetector` (see :meth:`reset`)."""

    anchor_ns: int | None = None  # stamp of the stream's first sample
    samples_done: int = 0  # samples consumed into frames since the anchor
    clean_buf: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    mic_buf: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    run_start_ns: int | None = None  # first near-end frame of the current run
    run_end_ns: int = 0
    run_frames: int = 0  # near-end frames in the current run
    gap_frames: int = 0  # consecutive other frames since its last near-end frame
    # Frames judged echo-only while echo was possible: (start_ns, mic energy, cleaned energy).
    history: collections.deque[tuple[int, float, float]] = field(default_factory=collections.deque)
    ratios: FloatArray | None = None  # cached E_e / E_x of ``history`` under ``window``
    window: tuple[int, int] | None = None  # (lo_ns, hi_ns): echo delays the envelope covers
    # Echo-only frames for the spectral test: (start_ns, raw mic power spectrum, and the
    # reference's direct and reverberant power spectra under ``spec_window``, None for a frame
    # learned while the delay was unknown).
    spec_history: collections.deque[tuple[int, Spectrum, tuple[Spectrum, Spectrum] | None]] = field(
        default_factory=lambda: collections.deque(maxlen=_SPEC_HISTORY_FRAMES)
    )
    # The learned echo model under ``spec_window`` (BargeInDetector._spectral_model).
    spec_model: tuple[Spectrum, int, float] | None = None
    spec_window: tuple[int, int] | None = None
    spectral_near_frames: int = 0  # frames only the spectral test called near-end
    # Every recent frame, for a replay to re-learn from: (start_ns, near-end).
    recent: collections.deque[tuple[int, bool]] = field(default_factory=collections.deque)
    filter_resets: int = 0  # the canceller's counts at the last look
    full_resets: int = 0
    replays: int = 0
    young: bool = False  # the canceller had not converged at the last frame
    frames: int = 0
    near_end_frames: int = 0

    def reset(self) -> None:
        """Forget the stream and everything learned about the echo path."""
        self.anchor_ns = None
        self.samples_done = 0
        self.clean_buf = np.zeros(0, dtype=np.float32)
        self.mic_buf = np.zeros(0, dtype=np.float32)
        self.run_start_ns = None
        self.run_end_ns = 0
        self.run_frames = 0
        self.gap_frames = 0
        self.history.clear()
        self.recent.clear()
        self.ratios = None
        self.window = None
        self.spec_history.clear()
        self.spec_model = None
        self.spec_window = None
        self.spectral_near_frames = 0
        self.filter_resets = 0
        self.full_resets = 0
        self.replays = 0
        self.young = False
        self.frames = 0
        self.near_end_frames = 0


class BargeInDetector:
    """Near-end speech over our own echo, from the canceller's input, output and reference.

    Args:
        aec: echo canceller settings (the double-talk fields ``dtd_*``, ``echo_tail_ms``,
            ``max_delay_ms`` and ``sample_rate``).
        vad: VAD settings (``barge_in_model``, ``silero_threshold``, ``barge_in_min_speech_ms``).
        classifier: frame classifier to use instead of the configured one (tests).

    Raises:
        ConfigError: the configured classifier cannot be loaded (missing model or library).
    """

    def __init__(
        self,
        aec: AecConfig | None = None,
        vad: VadConfig | None = None,
        classifier: FrameClassifier | None = None,
    ) -> None:
        self.aec_config = aec or AecConfig()
        self.vad_config = vad or VadConfig()
        self.sample_rate = self.aec_config.sample_rate
        if classifier is None:
            if self.vad_config.barge_in_model == "silero":
                classifier = SileroVad(self.sample_rate)
            else:
                classifier = _WebRtcFrames(
                    self.sample_rate, self.vad_config.frame_ms, self.vad_config.aggressiveness
                )
        self.classifier = classifier
        self.frame_len = classifier.frame_len
        self.frame_ns = round(self.frame_len * NS_PER_S / self.sample_rate)
        aec_cfg = self.aec_config
        self._history_frames = max(1, round(aec_cfg.dtd_history_ms * 1_000_000 / self.frame_ns))
        # Frames a replay can cover (the canceller replays its delay window).
        self._recent_frames = 2 + aec_cfg.delay_window_ms * 1_000_000 // self.frame_ns
        # Echo-only frames needed before the learned ratio replaces the prior (~250 ms of echo).
        self._min_learned = min(self._history_frames, 8)
        self._min_frames = max(1, self._frames_for(self.vad_config.barge_in_min_speech_ms))
        self._young_frames = max(
            self._min_frames, self._frames_for(self.vad_config.barge_in_young_min_speech_ms)
        )
        self._hangover_frames = self.vad_config.barge_in_hangover_ms * 1_000_000 // self.frame_ns
        self._margin = float(10.0 ** (aec_cfg.dtd_margin_db / 10.0))
        self._prior = float(10.0 ** (aec_cfg.dtd_prior_db / 10.0))
        self._sub = max(1, self.sample_rate * _SUB_BLOCK_MS // 1000)
        self._delay_known = False
        self._spectral = aec_cfg.dtd_spectral
        self._spec_excess = float(10.0 ** (aec_cfg.dtd_spectral_db / 10.0))
        self._spec_window_fn = np.hanning(self.frame_len)
        freqs = np.fft.rfftfreq(self.frame_len, 1.0 / self.sample_rate)
        self._spec_band = (freqs >= _SPEC_LOW_HZ) & (freqs <= _SPEC_HIGH_HZ)
        # A bin's power at the reference floor (white noise of mean square _REF_FLOOR, windowed).
        self._spec_floor = _REF_FLOOR * float(np.sum(self._spec_window_fn**2))
        self.state = BargeInState()
        self.last_verdicts: list[FrameVerdict] = []

    # ------------------------------------------------------------------------------------ queries
    def active_run(self) -> tuple[int, int] | None:
        """The ongoing near-end run as ``(start_ns, duration_ns)`` once it is long enough, or None."""
        st = self.state
        if st.run_start_ns is None or st.run_frames < self._needed():
            return None
        return st.run_start_ns, st.run_end_ns - st.run_start_ns

    @property
    def residual_ratio_db(self) -> float:
        """The learned residual-to-reference ratio (90th percentile of echo-only frames), dB."""
        return float(10.0 * np.log10(max(self._residual_ratio(), 1e-12)))

    # ---------------------------------------------------------------------------------- streaming
    def reset(self) -> None:
        """Start over (a session reset or a clock jump): the echo path is learned again."""
        self.state.reset()
        self.classifier.reset()

    def end_run(self) -> None:
        """Forget the current near-end run, keep what was learned (after a warm-up on a
        remembered echo path, omni_ros.core.echo_path: nothing heard there is the user now)."""
        st = self.state
        st.run_start_ns, st.run_frames, st.gap_frames = None, 0, 0

    def process(
        self, cleaned: AudioBlock, mic: FloatArray | None = None, echo: EchoCanceller | None = None
    ) -> list[FrameVerdict]:
        """Judge the frames that ``cleaned`` completes.

        Args:
            cleaned: the canceller's output (or the raw microphone when there is no canceller).
            mic: the raw microphone samples of exactly the same span (the canceller's input).
            echo: the canceller, for its reference, delay estimate and filter resets; None
                when there is none (then every frame is judged by the classifier alone).

        Raises:
            DecodeError: wrong sample rate, or ``mic`` does not match ``cleaned``.
        """
        if cleaned.sample_rate != self.sample_rate:
            raise DecodeError(
                f"barge-in detector runs at {self.sample_rate} Hz (aec.sample_rate), got "
                f"{cleaned.sample_rate} Hz"
            )
        raw = cleaned.samples if mic is None else np.asarray(mic, dtype=np.float32)
        if len(raw) != len(cleaned.samples):
            raise DecodeError(
                f"barge-in detector: {len(raw)} microphone samples for {len(cleaned.samples)} "
                "cleaned ones; pass the canceller's input for exactly its output span"
            )
        self.last_verdicts = []
        if len(raw) == 0:
            return []
        st = self.state
        if st.anchor_ns is None or not self._continues(cleaned.stamp_ns):
            self._restart(cleaned.stamp_ns)
        clean = np.concatenate([st.clean_buf, np.asarray(cleaned.samples, dtype=np.float32)])
        raw = np.concatenate([st.mic_buf, raw])
        n = len(clean) // self.frame_len
        fl = self.frame_len
        for j in range(n):
            self.last_verdicts.append(
                self._frame(clean[j * fl : (j + 1) * fl], raw[j * fl : (j + 1) * fl], echo)
            )
        st.clean_buf = clean[n * fl :].copy()
        st.mic_buf = raw[n * fl :].copy()
        return self.last_verdicts

    # ---------------------------------------------------------------------------------- internals
    def _frames_for(self, ms: int) -> int:
        """Whole frames that cover ``ms`` of audio (rounded up)."""
        return -(-ms * 1_000_000 // self.frame_ns)

    def _needed(self) -> int:
        """Near-end frames a run needs to count as a barge-in now: more while the canceller is
        young. (The run itself is built as always: Silero's lower continuation threshold and the
        hangover apply from ``barge_in_min_speech_ms`` on.)"""
        return self._young_frames if self.state.young else self._min_frames

    def _stamp(self, sample_index: int) -> int:
        assert self.state.anchor_ns is not None
        return self.state.anchor_ns + round(sample_index * NS_PER_S / self.sample_rate)

    def _continues(self, stamp_ns: int) -> bool:
        expected = self._stamp(self.state.samples_done + len(self.state.clean_buf))
        return abs(stamp_ns - expected) <= NS_PER_S // self.sample_rate

    def _restart(self, stamp_ns: int) -> None:
        """A new contiguous stream: buffered samples and the current run are dropped; what was
        learned about the echo path is kept (the room did not change), unless time went back
        (a looping bag), which makes the learned frames' stamps meaningless."""
        st = self.state
        if st.anchor_ns is not None and stamp_ns < self._stamp(st.samples_done):
            st.history.clear()
            st.recent.clear()
            st.ratios = None
            st.spec_history.clear()
            st.spec_model = None
        st.anchor_ns = stamp_ns
        st.samples_done = 0
        st.clean_buf = np.zeros(0, dtype=np.float32)
        st.mic_buf = np.zeros(0, dtype=np.float32)
        st.run_start_ns = None
        st.run_frames = 0
        st.gap_frames = 0
        self.classifier.reset()

    def _window(self, echo: EchoCanceller) -> tuple[int, int]:
        """Echo delays ``[lo, hi]`` (ns, reverberation tail included) the envelope must cover."""
        cfg = self.aec_config
        tail = cfg.echo_tail_ms * 1_000_000
        self._delay_known = echo.delay_estimates > 0 or not cfg.estimate_delay
        if self._delay_known:
            delay = echo.delay_ns
            return max(0, delay - _DELAY_TOLERANCE_NS), delay + _DELAY_TOLERANCE_NS + tail
        return 0, cfg.max_delay_ms * 1_000_000 + tail

    def _envelope(self, echo: EchoCanceller, start_ns: int, window: tuple[int, int]) -> float:
        """Reference energy that can echo into ``[start, start + frame)``.

        With the delay known, the loudest 16 ms around the direct path plus the older reference
        weighted by an exponential reverberation decay (``echo_tail_ms`` to -60 dB): it follows
        the echo's syllables, so the user shows in their valleys. With the delay unknown, the
        loudest 16 ms anywhere in the window (an upper bound whatever the delay).
        """
        lo, hi = window
        first = start_ns - hi
        n = round((hi - lo + self.frame_ns) * self.sample_rate / NS_PER_S)
        ref = echo.reference_window(first, n)
        m = len(ref) // self._sub
        if m == 0:
            return float(np.mean(ref.astype(np.float64) ** 2)) if len(ref) else 0.0
        energies = np.mean(ref[: m * self._sub].astype(np.float64).reshape(m, self._sub) ** 2, 1)
        tail_ns = self.aec_config.echo_tail_ms * 1_000_000
        if not self._delay_known or tail_ns == 0:
            return float(np.max(energies))
        sub_ns = self._sub * NS_PER_S / self.sample_rate
        n_tail = min(m - 1, int(tail_ns / sub_ns))
        direct = float(np.max(energies[n_tail:]))
        if n_tail == 0:
            return direct
        weights = _tail_weights(n_tail, sub_ns, tail_ns, _DECAY_60_DB)
        return direct + float(np.dot(weights, energies[:n_tail]))

    def _power_spectrum(self, x: FloatArray) -> Spectrum:
        """Power spectrum of one frame under a Hann window."""
        return np.abs(np.fft.rfft(self._spec_window_fn * x.astype(np.float64))) ** 2

    def _predicted_parts(self, echo: EchoCanceller, start_ns: int) -> tuple[Spectrum, Spectrum]:
        """What our echo can bring into ``[start, start + frame)`` per frequency bin at the
        estimated delay, from the reference's power spectra (the frame's length and window,
        16 ms apart): the direct path's, the spectrum at exactly the delay (GCC-PHAT's +-2 ms
        against a 32 ms frame; the loudest of its neighbours would overstate a vowel's onset and
        teach too low a gain), and the reverberation's, the older spectra weighted by an
        exponential decay over ``echo_tail_ms``, one row per decay of ``_SPEC_TAIL_DECAYS``."""
        fl = self.frame_len
        hop = self._sub
        tail_ns = self.aec_config.echo_tail_ms * 1_000_000
        sub_ns = hop * NS_PER_S / self.sample_rate
        n_tail = int(tail_ns / sub_ns)
        first_ns = start_ns - echo.delay_ns - round(n_tail * sub_ns)
        ref = echo.reference_window(first_ns, n_tail * hop + fl).astype(np.float64)
        idx = np.arange(n_tail + 1)[:, None] * hop + np.arange(fl)[None, :]  # oldest first
        spectra = np.abs(np.fft.rfft(ref[idx] * self._spec_window_fn, axis=1)) ** 2
        tails = np.zeros((len(_SPEC_TAIL_DECAYS), spectra.shape[1]))
        if n_tail:
            for i, decay in enumerate(_SPEC_TAIL_DECAYS):
                tails[i] = _tail_weights(n_tail, sub_ns, tail_ns, decay) @ spectra[:-1]
        return spectra[-1], tails

    def _spectral_model(
        self, echo: EchoCanceller, window: tuple[int, int]
    ) -> tuple[Spectrum, int, float] | None:
        """The learned echo model ``(gain per bin, decay row, tail level)``: the predicted power
        is ``gain * (direct + level * tails[row])``. Of every decay and level of
        ``_SPEC_TAIL_DECAYS`` x ``_SPEC_TAIL_LEVELS``, the one whose per-bin log ratios over
        the echo-only frames spread least (rooms differ in how much of their echo is
        reverberation); the gain is their median per bin, smoothed across
        ``_SPEC_SMOOTH_BINS``. None until ``_SPEC_MIN_FRAMES`` were learned. Only at a known
        delay: a moved window (a new delay) re-predicts every learned frame, as does a frame
        learned before the delay was known (it has no prediction yet)."""
        st = self.state
        moved = st.spec_window != window
        if moved or any(parts is None for _, _, parts in st.spec_history):
            st.spec_window = window
            st.spec_history = collections.deque(
                (
                    (t, y, self._predicted_parts(echo, t) if moved or parts is None else parts)
                    for t, y, parts in st.spec_history
                ),
                maxlen=_SPEC_HISTORY_FRAMES,
            )
            st.spec_model = None
        if st.spec_model is None and len(st.spec_history) >= _SPEC_MIN_FRAMES:
            floor = self._spec_floor
            band = self._spec_band
            learned = [(y, parts) for _, y, parts in st.spec_history if parts is not None]
            ys = np.log(np.asarray([y for y, _ in learned]) + floor)
            direct = np.asarray([parts[0] for _, parts in learned])
            tails = np.asarray([parts[1] for _, parts in learned])
            best: tuple[float, Spectrum, int, float] | None = None
            for row in range(tails.shape[1]):
                for level in _SPEC_TAIL_LEVELS:
                    logs = ys - np.log(direct + level * tails[:, row] + floor)
                    gain = np.median(logs, axis=0)
                    spread = float(np.mean(np.abs(logs - gain)[:, band]))
                    if best is None or spread < best[0]:
                        best = (spread, gain, row, level)
            assert best is not None
            kernel = np.ones(_SPEC_SMOOTH_BINS) / _SPEC_SMOOTH_BINS
            st.spec_model = (np.convolve(np.exp(best[1]), kernel, mode="same"), best[2], best[3])
        return st.spec_model

    def _spectral_share(
        self,
        y: Spectrum,
        parts: tuple[Spectrum, Spectrum],
        model: tuple[Spectrum, int, float] | None,
    ) -> float | None:
        """Share of the frame's in-band power in bins ``dtd_spectral_db`` above what the echo
        path can bring there (None while nothing was learned or the frame is silent)."""
        if model is None:
            return None
        gain, row, level = model
        p = parts[0] + level * parts[1][row]
        band = self._spec_band
        total = float(y[band].sum())
        if total <= self._spec_floor * np.count_nonzero(band):
            return None
        loud = y > self._spec_excess * np.maximum(gain * p, self._spec_floor)
        return float(y[band & loud].sum()) / total

    def _arrived(self, echo: EchoCanceller, start_ns: int, window: tuple[int, int]) -> bool:
        """Whether the reference was playing the window's longest delay before ``start_ns``."""
        n = round(self.frame_ns * self.sample_rate / NS_PER_S)
        oldest = echo.reference_window(start_ns - window[1], n)
        return bool(np.mean(oldest.astype(np.float64) ** 2) > _REF_FLOOR)

    def _residual_ratio(self) -> float:
        st = self.state
        ratios = st.ratios if st.ratios is not None else np.zeros(0)
        if len(ratios) < self._min_learned:  # not enough echo heard yet: the prior stands
            return self._prior
        return float(np.quantile(ratios, 0.9).item())

    def _refresh(self, echo: EchoCanceller, window: tuple[int, int]) -> None:
        """Keep the cached ratios valid after a filter reset or a moved delay window."""
        st = self.state
        if echo.full_resets != st.full_resets:  # a new time base: nothing learned applies
            st.full_resets = echo.full_resets
            st.history.clear()
            st.ratios = None
            st.spec_history.clear()
            st.spec_model = None
        reset = echo.filter_resets != st.filter_resets
        if reset:
            # The filter starts over: until it converges, it passes about what the mic hears.
            st.filter_resets = echo.filter_resets
            # A new alignment, so a new echo path: a run heard through the old filter (often the
            # echo of the changed path itself) is not evidence for the user.
            st.run_start_ns = None
            st.run_frames = 0
            st.gap_frames = 0
            st.history = collections.deque(
                ((t, e_mic, e_mic) for t, e_mic, _ in st.history), maxlen=self._history_frames
            )
            st.ratios = None
            # The spectral test learns the new path from scratch (a robot warmed up in another
            # room, or moved: the old path's gains would call its echo the user).
            st.spec_history.clear()
            st.spec_model = None
        if echo.replays != st.replays:
            st.replays = echo.replays
            self._relearn(echo, window, reset)
        if window != st.window:
            st.window = window
            st.ratios = None
        if st.ratios is None:
            values = []
            for t, _e_mic, e_res in st.history:
                env = self._envelope(echo, t, window)
                values.append(e_res / env if env > _REF_FLOOR else 0.0)
            st.ratios = np.asarray(values, dtype=np.float64)

    def _after_replay(self, echo: EchoCanceller, start_ns: int, clean: FloatArray) -> FloatArray:
        """The frame's residual as the filter leaves it now: a frame the canceller cleaned just
        before a replay adapted it takes the replay's residual over the span the replay covered
        (the learned ratio is the replayed filter's)."""
        k = min(len(clean), round((echo.replay_end_ns - start_ns) * self.sample_rate / NS_PER_S))
        span = echo.replayed_span(start_ns, k) if k > 0 else None
        return clean if span is None else np.concatenate([span[1], clean[k:]])

    def _relearn(self, echo: EchoCanceller, window: tuple[int, int], reset: bool) -> None:
        """Learn the residual ratio again from the audio the canceller just replayed.

        A replay (``AecConfig.replay_passes``) adapts the filter in one go, so what the history
        says about the residual (an unconverged filter's, or the raw mic after a reset) is
        stale: the residuals of the replay's final pass are what echo leaves now. Its frames are
        learned where echo had arrived and the frame did not count as the user; frames more
        than the margin above the median ratio (the user masked while nothing was learned) are
        left out. After a re-alignment (``reset``) the frames' own verdicts do not count: they
        were judged through the filter of the old echo path. Without such frames the history
        stays as it was.
        """
        st = self.state
        found: list[tuple[int, float, float, float]] = []
        # The direct path has arrived (the delay is known: it was just estimated); the
        # reverberation tail only adds to a frame's echo later.
        direct = (window[0], window[0] + 2 * _DELAY_TOLERANCE_NS)
        for start_ns, near in st.recent:
            span = None if near and not reset else echo.replayed_span(start_ns, self.frame_len)
            if span is None or not self._arrived(echo, start_ns, direct):
                continue
            env = self._envelope(echo, start_ns, window)
            if env <= _REF_FLOOR:
                continue
            e_mic = float(np.mean(span[0].astype(np.float64) ** 2))
            e_res = float(np.mean(span[1].astype(np.float64) ** 2))
            found.append((start_ns, e_mic, e_res, e_res / env))
        if not found:
            return
        bound = float(np.quantile([f[3] for f in found], 0.25)) * self._margin
        kept = [(t, e_mic, e_res) for t, e_mic, e_res, ratio in found if ratio <= bound]
        st.history = collections.deque(kept[-self._history_frames :], maxlen=self._history_frames)
        st.window = window
        st.ratios = np.asarray(
            [r for *_, r in found if r <= bound][-self._history_frames :], dtype=np.float64
        )

    def _frame(
        self, clean: FloatArray, raw: FloatArray, echo: EchoCanceller | None
    ) -> FrameVerdict:
        st = self.state
        start_ns = self._stamp(st.samples_done)
        st.samples_done += self.frame_len
        end_ns = self._stamp(st.samples_done)
        st.frames += 1
        prob = self.classifier.step(clean)
        # Hysteresis as upstream Silero uses it (_HYSTERESIS): a run already under way continues
        # on weaker frames.
        threshold_p = self.vad_config.silero_threshold
        st.young = echo is not None and not echo.converged
        if st.run_start_ns is not None and st.run_frames >= self._min_frames:
            threshold_p = max(0.01, threshold_p - _HYSTERESIS)
        speech = prob >= threshold_p
        if echo is not None:
            clean = self._after_replay(echo, start_ns, clean)
        e_res = float(np.mean(clean.astype(np.float64) ** 2))
        e_mic = float(np.mean(raw.astype(np.float64) ** 2))
        ratio_db = threshold_db = None
        env = 0.0
        window = (0, 0)
        if echo is not None:
            window = self._window(echo)
            self._refresh(echo, window)
            env = self._envelope(echo, start_ns, window)
        echo_possible = env > _REF_FLOOR
        if not echo_possible or echo is None:
            near = speech
        else:
            ratio = e_res / env
            threshold = self._residual_ratio() * self._margin
            near = speech and ratio > threshold
            # The spectral test on the raw microphone: a young filter leaves the echo at about
            # its full level, so the broadband ratio cannot tell a user as loud as our echo.
            # Only at a known delay: the loudest spectrum at any lag is no bound on a
            # reverberant echo, which sums many (measured: false barge-ins 0.9 s into a start).
            # Before it, frames are still learned (their mic spectrum), predicted once it is.
            share = y = parts = None
            if self._spectral and st.young:  # (its FFTs cost about the detector's CPU again)
                y = self._power_spectrum(raw)
                if self._delay_known:
                    parts = self._predicted_parts(echo, start_ns)
                    share = self._spectral_share(y, parts, self._spectral_model(echo, window))
            spectral = share is not None and share >= self.aec_config.dtd_spectral_fraction
            if speech and spectral and not near:
                near = True
                st.spectral_near_frames += 1
            ratio_db = float(10.0 * np.log10(max(ratio, 1e-12)))
            threshold_db = float(10.0 * np.log10(max(threshold, 1e-12)))
            # Learn from echo-only frames; a speech frame within the margin's upper half is
            # suspect (the user masked by our echo) and would teach the detector to ignore them.
            # So is a frame above the threshold that Silero is unsure of (P in its hysteresis
            # band): a user's first syllable often starts there (measured: 0.45 s into a later
            # turn, two such frames at P 0.49 raised the threshold by 10 dB and the user went
            # unheard for 1.6 s). A frame Silero rejects outright is learned even above the
            # threshold: after the room changed, that is how the threshold follows the filter's
            # larger residual. Only once our speech has been playing for the window's longest
            # delay can the echo have arrived whatever the delay: before that (the start of a
            # turn while the delay is unknown) a quiet frame says nothing about the echo path's
            # gain.
            unsure = prob >= self.vad_config.silero_threshold - _HYSTERESIS
            suspect = (
                (speech and ratio > threshold / np.sqrt(self._margin))
                or (unsure and ratio > threshold)
                # More than our echo in enough bins, and not rejected outright by Silero
                # (what it rejects is learned as above: how the ratio follows a room change).
                or (spectral and unsure)
            )
            if not near and not suspect and self._arrived(echo, start_ns, window):
                self._learn(start_ns, e_mic, e_res, ratio)
                if y is not None:
                    st.spec_history.append((start_ns, y, parts))
                    st.spec_model = None
        if st.recent.maxlen != self._recent_frames:
            st.recent = collections.deque(st.recent, maxlen=self._recent_frames)
        st.recent.append((start_ns, near))
        if near:
            st.near_end_frames += 1
            if st.run_start_ns is None:
                st.run_start_ns = start_ns
                st.run_frames = 0
            st.run_frames += 1
            st.run_end_ns = end_ns
            st.gap_frames = 0
        elif st.run_start_ns is not None:
            # A candidate may miss one frame (Silero dips for a frame inside a syllable; measured
            # on the flow's echo scene, the dip cost 100 ms); once confirmed, short gaps (between
            # words) do not end the run, and its duration counts to its last near-end frame.
            st.gap_frames += 1
            allowed = 1 if st.run_frames < self._min_frames else self._hangover_frames
            if st.gap_frames > allowed:
                st.run_start_ns = None
                st.run_frames = 0
                st.gap_frames = 0
        return FrameVerdict(start_ns, end_ns, prob, echo_possible, ratio_db, threshold_db, near)

    def _learn(self, start_ns: int, e_mic: float, e_res: float, ratio: float) -> None:
        st = self.state
        if st.history.maxlen != self._history_frames:
            st.history = collections.deque(st.history, maxlen=self._history_frames)
        st.history.append((start_ns, e_mic, e_res))
        ratios = st.ratios if st.ratios is not None else np.zeros(0)
        st.ratios = np.append(ratios, ratio)[-self._history_frames :]


__all__ = ["SILERO_FRAME", "BargeInDetector", "BargeInState", "FrameClassifier", "FrameVerdict"]
