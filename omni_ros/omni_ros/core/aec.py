"""Acoustic echo cancellation: the robot must not hear (and barge in on) its own voice.

The far-end (reference) signal is the speech *we* publish: every :class:`~omni_ros.core.types.SpeechOut`
carries the time its first sample is scheduled to play, on the same clock as the microphone stamps.
:class:`EchoCanceller` keeps that reference on an absolute time grid at the microphone processing rate,
and for each microphone frame captured at ``t`` it hands Speex's adaptive MDF echo canceller
(libspeexdsp, through ctypes) the reference that was scheduled to play at ``t - delay``.

``delay`` is what the schedule does not know: playback buffering in the audio driver, the speaker to
microphone flight time, capture buffering. It is estimated continuously by GCC-PHAT between the raw
microphone and the scheduled reference (only while the reference carries energy), and the reference is
aligned ``delay_margin_ms`` *early*, because Speex's filter can model an echo that arrives up to
``filter_ms`` after the reference but never one that arrives before it.

GCC-PHAT whitens both signals, so it always finds *some* peak: with no echo in the microphone at all
(the user talking over a muted speaker) it still reported confident, self-consistent lags (measured:
39 of 40 espeak-ng scenes accepted a false delay, peak/RMS 8-15). An estimate is therefore accepted
only with echo evidence: the magnitude-squared coherence of the microphone and the reference shifted
by that lag, averaged over the speech band, must reach ``delay_min_coherence`` (measured: unrelated
speech 0.01-0.12, echo alone 0.78-0.84, echo under the user's double talk 0.27-0.59).

Speex's filter needs 2-3 s of our speech to converge, after a start and again after every
re-alignment. An accepted estimate that finds the filter young therefore replays the last
``delay_window_ms`` of microphone audio into it (``replay_passes``): the estimate was just measured
on that audio, so its echo path is the one to learn (measured: 4-8 dB of echo reduction in the second
after the first estimate without, 11-26 dB with it).

A stream's first chunk that the next chunk's report shows to have been reported up to 5 ms early
(a player reads its clock for the report, publishes it, and only then writes to a device that had
paused; speaker_node's reports were 1.2-1.5 ms early, and the turn's first syllable went
uncancelled) is moved to where the next chunk began.

A reference stream is placed between grid samples, to the fraction of a sample its stamp says
(a windowed-sinc fractional delay, ``_FRAC_HALF`` taps a side): the echo of a turn that starts
between two microphone samples is sampled there, and rounded to the grid the reference was off by
up to half a sample, a new fraction each turn (the filter converged on one turn cancelled 3-8 dB
of the next one's first syllable instead of 30-50).

A :class:`RobotSpeakingGate` covers speech the canceller has no reference for (another TTS on the
robot, announced on the ``robot_speaking`` topic): while it is set, barge-in needs a longer speech run,
or is suppressed entirely, as configured.

Speex ships as Debian's ``libspeexdsp1`` (``apt-get install libspeexdsp1``); a missing library is a
:class:`~omni_ros.core.errors.ConfigError` that says so, raised when the canceller is built.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import soxr

from omni_ros.core.clock import NS_PER_S
from omni_ros.core.config import from_mapping
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.core.types import AudioBlock, FloatArray

Int16Array = npt.NDArray[np.int16]

# speex_echo.h / speex_preprocess.h request codes.
_SPEEX_ECHO_SET_SAMPLING_RATE = 24
_SPEEX_PREPROCESS_SET_DENOISE = 0
_SPEEX_PREPROCESS_SET_ECHO_SUPPRESS = 20
_SPEEX_PREPROCESS_SET_ECHO_SUPPRESS_ACTIVE = 22
_SPEEX_PREPROCESS_SET_ECHO_STATE = 24

_GATE_MODES = ("off", "stricter", "suppress")
# Reference gaps up to this long are zero-filled; a longer one (a forward clock jump) starts a
# new run, so memory follows the speech written, never the size of a jump.
_MAX_REF_GAP_S = 10
_REPLAY_TEST_MS = 480  # at most this much of a replay runs once, for an a-priori residual
# A chunk that starts at most this long after a stream of ONE chunk ended shows where that chunk
# really played: a player reports a fresh start's first chunk with the clock it read before
# publishing the report, and its device starts playing only when the write comes, after it.
# speaker_node: Playback report (heard = now + latency), then Playhead.wrote(now') for the
# write; the next chunk follows on from now' (measured through the nodes: 1.2-1.5 ms).
_FIRST_CHUNK_SNAP_NS = 5_000_000
# Windowed-sinc fractional delay that places a reference stream between grid samples: taps on
# each side, and the Kaiser window's beta (error below -60 dB up to 6 kHz at 16 kHz against an
# exact delay of a sine, test_aec; about -80 dB measured).
_FRAC_HALF = 16
_FRAC_BETA = 8.0


@dataclass(frozen=True)
class AecConfig:
    """Echo canceller and ``robot_speaking`` gate settings.

    Attributes:
        enabled: run the canceller at all (the flow bypasses it when False).
        sample_rate: microphone processing rate; the flow resamples the mic to this rate.
        frame_ms: Speex frame length. 20 ms measured better than 10 ms on the synthetic echo
            scenes (33-45 dB vs 27-32 dB ERLE, and no residual-echo VAD blips after warm-up);
            the output lags the input by less than one frame.
        filter_ms: echo tail the adaptive filter models (room reverberation + delay error).
        residual_suppression: run Speex's preprocessor with the echo state to suppress what the
            linear filter leaves (non-linear loudspeaker distortion, filter misadjustment).
        echo_suppress_db: residual echo attenuation when the near end is silent (negative dB).
        echo_suppress_active_db: residual echo attenuation while the near end talks (negative dB).
        denoise: let the preprocessor also suppress stationary noise. Speex applies its residual
            echo suppression only through the denoiser's gains, so ``residual_suppression``
            does nothing unless this is on (measured: 16-20 dB without it, 33-38 dB with it, median
            ERLE over the benchmark scenes; docs/BENCHMARKS.md).
        estimate_delay: estimate the playback-to-capture delay by GCC-PHAT.
        initial_delay_ms: delay assumed before the first estimate.
        max_delay_ms: largest delay searched for.
        delay_window_ms: correlation window for one estimate.
        delay_update_ms: how often (in microphone time) a new estimate is attempted.
        delay_margin_ms: the reference is aligned this much earlier than the estimate, so the echo
            never arrives before its reference (which Speex cannot cancel).
        delay_min_confidence: GCC-PHAT peak over the correlation's RMS needed to accept an estimate.
        delay_min_coherence: echo evidence needed to accept an estimate: mean magnitude-squared
            coherence, over ``delay_coherence_low_hz`` to ``delay_coherence_high_hz``, of the
            microphone window and the reference shifted by the estimated lag (see the module
            docstring for the measured ranges).
        delay_first_window_ms: correlation window until the first estimate is accepted.
        delay_first_min_coherence: coherence that lets the first estimate stand alone (no second
            agreeing estimate needed); measured over 500 ms windows: unrelated speech <= 0.29,
            echo median 0.65.
        delay_coherence_low_hz: lower edge of the band the coherence is averaged over.
        delay_coherence_high_hz: upper edge of that band.
        delay_tolerance_ms: two consecutive estimates must agree within this to count.
        delay_first_arrival_ms: an estimate is the echo's first arrival: the earliest lag, up
            to this much before GCC-PHAT's highest peak, whose correlation reaches
            ``delay_first_arrival_ratio`` of it. An early reflection (a table, a wall) can
            correlate more than the direct path; aligned to it, the direct path reaches the
            microphone before its reference, which Speex cannot cancel (measured: the first
            estimate 11 ms late on a fresh start, a false barge-in 0.7 s later).
        delay_first_arrival_ratio: see ``delay_first_arrival_ms``; 1.0 takes the highest peak.
        delay_headroom_ms: the filter covers echoes ``[align, align + filter_ms)`` after the
            aligned reference; the alignment moves only when an estimate falls outside
            ``[align, align + filter_ms - delay_headroom_ms]`` (the headroom keeps room for the
            reverberation tail), because every move makes Speex re-converge.
        replay_passes: after an accepted delay estimate while the filter is young (it was just
            reset by a re-alignment, or has seen less than ``warmup_ms`` of our speech), the last
            ``delay_window_ms`` of microphone audio is run through the filter again this many
            times with the reference at the (new) alignment, outputs discarded: the filter starts
            from seconds of adaptation instead of none (the echo path is known to be the one in
            that audio: the estimate was just measured on it). 0 turns it off.
        reference_gain: scale applied to the published speech before it becomes the reference.
        warmup_ms: active reference the filter must have processed after a reset (or after the
            delay estimate moved the alignment) before :attr:`EchoCanceller.converged` says so
            (measured: 2-3 s of speech to reach > 25 dB). Diagnostic only: barge-in does not wait
            for it (omni_ros.core.bargein judges the residual it actually sees).
        echo_tail_ms: how long after its direct path our echo can still be heard (the room's
            reverberation): the barge-in detector's echo envelope covers it.
        dtd_margin_db: double talk: how far above the learned residual-to-reference ratio a
            frame's echo-cancelled energy must be to count as the user (omni_ros.core.bargein).
        dtd_prior_db: the residual-to-reference ratio assumed before enough echo was heard (a
            loud echo path: the first frames of our speech must not barge in on themselves).
        dtd_history_ms: echo-only frames the residual ratio is learned over (its 90th
            percentile); until 8 frames were learned the prior stands.
        dtd_spectral: the spectral double-talk test while the canceller is young (it has not
            heard ``warmup_ms`` of our speech since its last filter reset; omni_ros.core.bargein):
            per frequency bin, the raw microphone's power against what the echo path can bring
            there from the reference's spectra at the estimated delay (a per-bin gain learned
            on echo-only frames). It needs the delay, not a converged filter.
        dtd_spectral_db: how far above that prediction a bin's power must be to be the user's.
        dtd_spectral_fraction: share of the frame's 150-4000 Hz power in such bins that makes
            the frame near-end by the spectral test.
        gate_mode: what ``robot_speaking`` does to barge-in: ``off`` (nothing), ``stricter`` (needs
            ``gate_min_speech_ms`` of speech), ``suppress`` (no barge-in while it is set).
        gate_min_speech_ms: speech run needed for barge-in while the gate is ``stricter``.
        echo_path_file: where the echo path is remembered between runs (an ``.npz`` the flow
            writes when it stops and reads when it starts, omni_ros.core.echo_path); empty:
            every start is a cold one.
        echo_path_seconds: how much echo-only audio the file keeps (and the warm start
            replays); at least 1 s of it must have our speech playing for a file to be written.
        echo_path_passes: how often the warm start plays the remembered stretch through the
            canceller and the detector. Measured on the 0.3 s ``start`` trial of the 120 ms
            path, same room: 3 s x 2 passes 1470 ms, 3 s x 3 passes 150 ms, 6 s x 2 passes
            190 ms (docs/BENCHMARKS.md). The warm-up costs about 60 ms of CPU per second played,
            once, before the first microphone block.
    """

    enabled: bool = True
    sample_rate: int = 16_000
    frame_ms: int = 20
    filter_ms: int = 200
    residual_suppression: bool = True
    echo_suppress_db: int = -40
    echo_suppress_active_db: int = -15
    denoise: bool = True
    estimate_delay: bool = True
    initial_delay_ms: int = 0
    max_delay_ms: int = 500
    delay_window_ms: int = 1000
    delay_update_ms: int = 250
    delay_margin_ms: int = 10
    delay_min_confidence: float = 8.0
    delay_min_coherence: float = 0.2
    delay_first_window_ms: int = 500
    delay_first_min_coherence: float = 0.4
    delay_coherence_low_hz: int = 300
    delay_coherence_high_hz: int = 3400
    delay_tolerance_ms: int = 4
    delay_first_arrival_ms: int = 30
    delay_first_arrival_ratio: float = 0.5
    delay_headroom_ms: int = 100
    replay_passes: int = 2
    reference_gain: float = 1.0
    warmup_ms: int = 3000
    echo_tail_ms: int = 200
    dtd_margin_db: float = 6.0
    dtd_prior_db: float = 0.0
    dtd_history_ms: int = 500
    dtd_spectral: bool = True
    dtd_spectral_db: float = 10.0
    dtd_spectral_fraction: float = 0.3
    gate_mode: str = "stricter"
    gate_min_speech_ms: int = 500
    echo_path_file: str = ""
    echo_path_seconds: float = 6.0
    echo_path_passes: int = 2

    def __post_init__(self) -> None:
        if self.sample_rate not in (8_000, 16_000, 32_000, 48_000):
            raise ConfigError(
                f"AecConfig.sample_rate = {self.sample_rate}; use 8000, 16000, 32000 or 48000"
            )
        if self.frame_ms <= 0 or (self.sample_rate * self.frame_ms) % 1000:
            raise ConfigError(f"AecConfig.frame_ms = {self.frame_ms} must give whole samples")
        if self.filter_ms < self.frame_ms:
            raise ConfigError("AecConfig.filter_ms must be >= frame_ms")
        for name in (
            "initial_delay_ms",
            "max_delay_ms",
            "delay_margin_ms",
            "delay_tolerance_ms",
            "delay_headroom_ms",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"AecConfig.{name} must be >= 0")
        if self.delay_window_ms <= 0 or self.delay_update_ms <= 0:
            raise ConfigError("AecConfig.delay_window_ms and delay_update_ms must be > 0")
        if not 0.0 <= self.delay_min_coherence < 1.0 or not self.delay_first_min_coherence >= 0.0:
            raise ConfigError(
                "AecConfig.delay_min_coherence must be in [0, 1), delay_first_min_coherence >= 0"
            )
        if self.delay_first_arrival_ms < 0:
            raise ConfigError("AecConfig.delay_first_arrival_ms must be >= 0")
        if not 0.0 < self.delay_first_arrival_ratio <= 1.0:
            raise ConfigError(
                f"AecConfig.delay_first_arrival_ratio = {self.delay_first_arrival_ratio}; "
                "use (0, 1]"
            )
        if self.delay_first_window_ms <= 0:
            raise ConfigError("AecConfig.delay_first_window_ms must be > 0")
        low, high = self.delay_coherence_low_hz, self.delay_coherence_high_hz
        if not 0 <= low < high <= self.sample_rate // 2:
            raise ConfigError(
                f"AecConfig.delay_coherence_low_hz / _high_hz = {low} / {high}: need "
                "0 <= low < high <= sample_rate / 2"
            )
        if self.echo_tail_ms < 0 or self.dtd_history_ms <= 0:
            raise ConfigError("AecConfig.echo_tail_ms must be >= 0 and dtd_history_ms > 0")
        if not 0.0 < self.dtd_spectral_db <= 40.0 or not 0.0 < self.dtd_spectral_fraction <= 1.0:
            raise ConfigError(
                f"AecConfig.dtd_spectral_db / _fraction = {self.dtd_spectral_db} / "
                f"{self.dtd_spectral_fraction}: need (0, 40] dB and (0, 1]"
            )
        if self.gate_mode not in _GATE_MODES:
            raise ConfigError(f"AecConfig.gate_mode = {self.gate_mode!r}; use one of {_GATE_MODES}")
        if self.replay_passes < 0:
            raise ConfigError("AecConfig.replay_passes must be >= 0")
        if self.gate_min_speech_ms < 0 or self.warmup_ms < 0:
            raise ConfigError("AecConfig.gate_min_speech_ms and warmup_ms must be >= 0")
        if not 1.0 <= self.echo_path_seconds <= 30.0:
            raise ConfigError(
                f"AecConfig.echo_path_seconds = {self.echo_path_seconds}; use 1 to 30 seconds"
            )
        if not 1 <= self.echo_path_passes <= 5:
            raise ConfigError(f"AecConfig.echo_path_passes = {self.echo_path_passes}; use 1 to 5")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> AecConfig:
        """Build from a plain mapping (YAML / ROS parameters); unknown keys raise ConfigError."""
        return from_mapping(cls, mapping)

    @property
    def frame_len(self) -> int:
        """Samples per Speex frame."""
        return self.sample_rate * self.frame_ms // 1000


# --------------------------------------------------------------------------------- Speex binding
_LIB: ctypes.CDLL | None = None


def load_speexdsp() -> ctypes.CDLL:
    """Load libspeexdsp once and declare the functions used.

    Raises:
        ConfigError: the library is not installed.
    """
    global _LIB
    if _LIB is not None:
        return _LIB
    names = [ctypes.util.find_library("speexdsp"), "libspeexdsp.so.1", "libspeexdsp.so"]
    lib: ctypes.CDLL | None = None
    for name in names:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise ConfigError(
            "echo cancellation needs Speex's libspeexdsp: apt-get install libspeexdsp1 "
            "(or set aec.enabled: false)"
        )
    vp, i16p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int16)
    lib.speex_echo_state_init.restype = vp
    lib.speex_echo_state_init.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.speex_echo_state_destroy.restype = None
    lib.speex_echo_state_destroy.argtypes = [vp]
    lib.speex_echo_state_reset.restype = None
    lib.speex_echo_state_reset.argtypes = [vp]
    lib.speex_echo_ctl.restype = ctypes.c_int
    lib.speex_echo_ctl.argtypes = [vp, ctypes.c_int, vp]
    lib.speex_echo_cancellation.restype = None
    lib.speex_echo_cancellation.argtypes = [vp, i16p, i16p, i16p]
    lib.speex_preprocess_state_init.restype = vp
    lib.speex_preprocess_state_init.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.speex_preprocess_state_destroy.restype = None
    lib.speex_preprocess_state_destroy.argtypes = [vp]
    lib.speex_preprocess_ctl.restype = ctypes.c_int
    lib.speex_preprocess_ctl.argtypes = [vp, ctypes.c_int, vp]
    lib.speex_preprocess_run.restype = ctypes.c_int
    lib.speex_preprocess_run.argtypes = [vp, i16p]
    _LIB = lib
    return lib


class SpeexEcho:
    """One Speex MDF echo canceller (+ optional residual-echo preprocessor) on int16 frames.

    Args:
        frame_len: samples per frame.
        filter_len: adaptive filter length in samples.
        sample_rate: audio rate in Hz.
        residual_suppression: chain ``speex_preprocess`` with the echo state.
        echo_suppress_db: preprocessor residual echo suppression (near end silent), negative dB.
        echo_suppress_active_db: the same while the near end is active.
        denoise: preprocessor noise suppression.
    """

    def __init__(
        self,
        frame_len: int,
        filter_len: int,
        sample_rate: int,
        *,
        residual_suppression: bool = True,
        echo_suppress_db: int = -40,
        echo_suppress_active_db: int = -15,
        denoise: bool = False,
    ) -> None:
        self._lib = load_speexdsp()
        self.frame_len = frame_len
        self._echo: int | None = self._lib.speex_echo_state_init(frame_len, filter_len)
        if not self._echo:
            raise ConfigError(f"speex_echo_state_init({frame_len}, {filter_len}) failed")
        rate = ctypes.c_int(sample_rate)
        self._lib.speex_echo_ctl(self._echo, _SPEEX_ECHO_SET_SAMPLING_RATE, ctypes.byref(rate))
        self._pre: int | None = None
        if residual_suppression:
            self._pre = self._lib.speex_preprocess_state_init(frame_len, sample_rate)
            ctl = self._lib.speex_preprocess_ctl
            ctl(self._pre, _SPEEX_PREPROCESS_SET_ECHO_STATE, ctypes.c_void_p(self._echo))
            ctl(self._pre, _SPEEX_PREPROCESS_SET_DENOISE, ctypes.byref(ctypes.c_int(int(denoise))))
            ctl(
                self._pre,
                _SPEEX_PREPROCESS_SET_ECHO_SUPPRESS,
                ctypes.byref(ctypes.c_int(echo_suppress_db)),
            )
            ctl(
                self._pre,
                _SPEEX_PREPROCESS_SET_ECHO_SUPPRESS_ACTIVE,
                ctypes.byref(ctypes.c_int(echo_suppress_active_db)),
            )
        self._out = np.zeros(frame_len, dtype=np.int16)

    def process(self, rec: Int16Array, play: Int16Array) -> Int16Array:
        """Cancel ``play``'s echo from ``rec``; both are ``n * frame_len`` contiguous int16 samples."""
        if self._echo is None:
            raise ConfigError("SpeexEcho used after close()")
        n = len(rec) // self.frame_len
        out = np.empty(n * self.frame_len, dtype=np.int16)
        rec = np.ascontiguousarray(rec, dtype=np.int16)
        play = np.ascontiguousarray(play, dtype=np.int16)
        i16p = ctypes.POINTER(ctypes.c_int16)
        fl = self.frame_len
        cancel = self._lib.speex_echo_cancellation
        pre = self._lib.speex_preprocess_run
        for j in range(n):
            dst = out[j * fl : (j + 1) * fl]
            cancel(
                self._echo,
                rec[j * fl :].ctypes.data_as(i16p),
                play[j * fl :].ctypes.data_as(i16p),
                dst.ctypes.data_as(i16p),
            )
            if self._pre is not None:
                pre(self._pre, dst.ctypes.data_as(i16p))
        return out

    def reset(self) -> None:
        """Forget the adapted echo path."""
        if self._echo is not None:
            self._lib.speex_echo_state_reset(self._echo)

    def close(self) -> None:
        """Free the native state. Idempotent."""
        if self._pre is not None:
            self._lib.speex_preprocess_state_destroy(self._pre)
            self._pre = None
        if self._echo is not None:
            self._lib.speex_echo_state_destroy(self._echo)
            self._echo = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


# ------------------------------------------------------------------------------ delay estimation
def fractional_delay_taps(frac: float, half: int = _FRAC_HALF) -> FloatArray:
    """FIR taps ``h[0 .. 2 half]`` that delay a band-limited signal by ``frac`` samples
    (``0 <= frac < 1``): ``z[m] = sum_n h[n] y[m - n + half]`` is ``y`` at ``m - frac``.

    A Kaiser-windowed sinc (``_FRAC_BETA``), normalised to unit gain at DC; ``frac = 0`` gives
    the identity.
    """
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"frac = {frac}; must be in [0, 1)")
    n = np.arange(-half, half + 1, dtype=np.float64)
    x = n - frac
    w = np.i0(_FRAC_BETA * np.sqrt(np.clip(1.0 - (x / (half + 1)) ** 2, 0.0, 1.0)))
    h = np.sinc(x) * w / np.i0(_FRAC_BETA)
    taps: FloatArray = (h / h.sum()).astype(np.float32)
    return taps


def gcc_phat_delay(
    mic: FloatArray,
    ref: FloatArray,
    max_lag: int,
    beta: float = 1.0,
    first_arrival: tuple[int, float] | None = None,
) -> tuple[int, float]:
    """Estimate how many samples ``mic`` lags ``ref`` by GCC-PHAT.

    ``ref`` must start ``max_lag`` samples before ``mic`` and be ``len(mic) + max_lag`` long, so a
    lag ``L`` in ``[0, max_lag]`` pairs ``mic[n]`` with ``ref[n + max_lag - L]``.

    Args:
        first_arrival: ``(samples, ratio)``: the echo's first arrival, not its strongest one:
            the earliest lag up to ``samples`` before the highest peak whose correlation reaches
            ``ratio`` of that peak is returned (an early reflection can correlate as strongly as
            the direct path; aligned to it, the direct path would arrive before its reference,
            which the canceller cannot cancel). None: the highest peak.

    Returns:
        ``(lag, confidence)`` where confidence is the correlation peak over the RMS of the
        correlation across the searched lags (about 3-4 for unrelated signals).
    """
    n = len(mic) + len(ref)
    size = 1 << (n - 1).bit_length()
    a = np.fft.rfft(mic.astype(np.float64), size)
    b = np.fft.rfft(ref.astype(np.float64), size)
    cross = b * np.conj(a)
    cross /= np.maximum(np.abs(cross), 1e-12) ** beta
    cc = np.fft.irfft(cross, size)[: max_lag + 1]  # cc[k] = sum mic[n] ref[n + k]
    mag = np.abs(cc)
    peak = int(np.argmax(mag))
    k = peak
    if first_arrival is not None:
        span, ratio = first_arrival
        # Earlier arrivals are smaller lags, i.e. larger k (cc[k] pairs mic[n] with ref[n + k]).
        hi = min(max_lag, peak + span)
        strong = np.flatnonzero(mag[peak : hi + 1] >= ratio * mag[peak])
        k = peak + int(strong[-1])
    rms = float(np.sqrt(np.mean(mag**2))) or 1e-12
    return max_lag - k, float(mag[peak] / rms)


def echo_coherence(
    mic: FloatArray, ref: FloatArray, sample_rate: int, band_hz: tuple[int, int]
) -> float:
    """Mean magnitude-squared coherence of ``mic`` and the time-aligned ``ref`` over ``band_hz``.

    Welch segments of 64 ms (Hann window, 50 % overlap, mean removed: what
    ``scipy.signal.coherence`` computes by default, at a third of its cost): long enough that a
    room's early reflections stay inside one segment (a shorter segment loses coherence to
    reverberation), short enough to average ~30 of them over a one-second window, where unrelated
    signals stay near ``1 / segments``.
    """
    n = min(len(mic), len(ref))
    nperseg = min(n, 1 << (sample_rate * 64 // 1000 - 1).bit_length())
    if nperseg < 64:
        return 0.0
    step = nperseg // 2
    count = 1 + (n - nperseg) // step
    idx = np.arange(nperseg)[None, :] + step * np.arange(count)[:, None]
    window = np.hanning(nperseg + 1)[:-1]  # periodic Hann, scipy.signal.get_window('hann')

    def spectra(x: FloatArray) -> npt.NDArray[np.complex128]:
        seg = np.asarray(x[:n], dtype=np.float64)[idx]
        seg = (seg - seg.mean(axis=1, keepdims=True)) * window
        return np.fft.rfft(seg, axis=1)

    a, b = spectra(mic), spectra(ref)
    pxx = np.mean(np.abs(a) ** 2, axis=0)
    pyy = np.mean(np.abs(b) ** 2, axis=0)
    pxy = np.mean(a * np.conj(b), axis=0)
    freqs = np.fft.rfftfreq(nperseg, 1.0 / sample_rate)
    band = (freqs >= band_hz[0]) & (freqs <= band_hz[1])
    denom = pxx[band] * pyy[band]
    ok = denom > 1e-30
    if not np.any(ok):
        return 0.0
    coh = np.zeros(len(denom))
    coh[ok] = np.abs(pxy[band][ok]) ** 2 / denom[ok]
    return float(np.mean(coh))


# --------------------------------------------------------------------------------- the canceller
@dataclass
class EchoState:
    """Explicit streaming state of :class:`EchoCanceller` (see :meth:`reset`)."""

    mic_anchor_ns: int | None = None  # stamp of the mic stream's first sample
    mic_samples: int = 0  # samples consumed into frames since the anchor
    remainder: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    ref_start_ns: int | None = None  # stamp of the reference grid's sample 0 (never moves)
    ref_offset: int = 0  # grid index below which the reference was trimmed (or dropped)
    # The reference as (grid index, samples) runs, sorted and apart by more than _MAX_REF_GAP_S:
    # a gap that long is not zero-filled, so a forward clock jump costs no memory.
    ref_segments: list[tuple[int, FloatArray]] = field(default_factory=list)
    ref_stream_next_ns: int | None = None  # where the open reference resampler stream continues
    ref_stream_out: int = 0  # samples the open stream has written since it began
    ref_stream_start_ns: int = 0
    ref_stream_chunks: int = 0  # chunks the open stream has taken
    first_chunk_snaps: int = 0  # first chunks moved to where the chunk after them began
    # The open stream's placement between grid samples (see EchoCanceller._place_stream): its
    # first sample lies at grid index ``frac_base`` + the fraction the ``frac_taps`` delay by.
    frac_base: int = 0
    frac_taps: FloatArray = field(default_factory=lambda: fractional_delay_taps(0.0))
    frac_y: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    frac_y0: int = 0  # stream sample index of ``frac_y[0]``
    frac_next: int = 0  # next stream sample index whose placed value is to be written
    delay_ns: int = 0  # latest accepted estimate (or the configured initial delay)
    align_ns: int = 0  # how far back the reference is read for the frame being cancelled
    last_estimate_ns: int | None = None
    delay_estimates: int = 0
    delay_rejected_no_echo: int = 0  # confident GCC-PHAT peaks refused for lack of echo evidence
    mic_hist: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    since_estimate: int = 0  # mic samples since the last estimate attempt
    active_ref_samples: int = 0  # frames with an active reference processed since the reset
    filter_resets: int = 0  # Speex filter resets (re-alignments, reset()) since construction
    replayed: bool = False  # the history was replayed into the filter since its last reset
    replays: int = 0  # replays since construction
    replay_start_ns: int = 0  # mic time of the last replay's first sample
    replay_mic: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    replay_out: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    full_resets: int = 0  # reset() calls: every stamp and estimate was forgotten
    last_mic: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    def reset(self, initial_delay_ns: int) -> None:
        """Forget the streams (the Speex filter is reset separately)."""
        self.mic_anchor_ns = None
        self.mic_samples = 0
        self.remainder = np.zeros(0, dtype=np.float32)
        self.ref_start_ns = None
        self.ref_offset = 0
        self.ref_segments = []
        self.ref_stream_next_ns = None
        self.ref_stream_out = 0
        self.ref_stream_start_ns = 0
        self.ref_stream_chunks = 0
        self.frac_y = np.zeros(0, dtype=np.float32)
        self.frac_y0 = 0
        self.frac_next = 0
        self.delay_ns = initial_delay_ns
        self.align_ns = initial_delay_ns
        self.last_estimate_ns = None
        self.delay_estimates = 0
        self.delay_rejected_no_echo = 0
        self.mic_hist = np.zeros(0, dtype=np.float32)
        self.since_estimate = 0
        self.active_ref_samples = 0
        self.replayed = False
        self.replay_mic = np.zeros(0, dtype=np.float32)
        self.replay_out = np.zeros(0, dtype=np.float32)
        self.last_mic = np.zeros(0, dtype=np.float32)


class EchoCanceller:
    """Stream-driven echo canceller: published speech in, microphone in, cleaned microphone out.

    Call :meth:`push_reference` with every speech chunk as it is published (before it plays) and
    :meth:`process` with every microphone block (at ``config.sample_rate``). Output lags input by
    less than one frame: the samples that do not fill a Speex frame wait for the next block, and the
    returned block's stamp is that of its first sample.

    Args:
        config: canceller settings.

    Raises:
        ConfigError: libspeexdsp is missing.
    """

    def __init__(self, config: AecConfig | None = None) -> None:
        self.config = config or AecConfig()
        cfg = self.config
        self._speex = SpeexEcho(
            cfg.frame_len,
            cfg.sample_rate * cfg.filter_ms // 1000,
            cfg.sample_rate,
            residual_suppression=cfg.residual_suppression,
            echo_suppress_db=cfg.echo_suppress_db,
            echo_suppress_active_db=cfg.echo_suppress_active_db,
            denoise=cfg.denoise,
        )
        self.state = EchoState()
        self.state.reset(cfg.initial_delay_ms * 1_000_000)
        self._resampler: soxr.ResampleStream | None = None
        self._resampler_rate = 0

    # ------------------------------------------------------------------------------------- queries
    @property
    def delay_ns(self) -> int:
        """The playback-to-capture delay currently assumed (estimate, or the initial value)."""
        return self.state.delay_ns

    @property
    def align_ns(self) -> int:
        """How far back (from capture time) the reference is read for cancellation."""
        return self.state.align_ns

    @property
    def converged(self) -> bool:
        """Whether the filter has seen ``warmup_ms`` of active reference since its last reset."""
        cfg = self.config
        return self.state.active_ref_samples >= cfg.sample_rate * cfg.warmup_ms // 1000

    def reference_active(self, start_ns: int, end_ns: int) -> bool:
        """Whether our speech can be echoing in mic time ``[start_ns, end_ns)``.

        Looks back over the aligned reference plus the filter's tail.
        """
        cfg = self.config
        lo = start_ns - self.state.align_ns - cfg.filter_ms * 1_000_000
        n = max(0, round((end_ns - self.state.align_ns - lo) * cfg.sample_rate / NS_PER_S))
        return bool(np.any(np.abs(self._reference_window(lo, n)) > 1e-3))

    @property
    def delay_estimates(self) -> int:
        """How many delay estimates have been accepted."""
        return self.state.delay_estimates

    @property
    def filter_resets(self) -> int:
        """How often the adaptive filter was reset (it has to converge again after each)."""
        return self.state.filter_resets

    @property
    def replays(self) -> int:
        """How often the microphone history was replayed into a young filter (replay_passes)."""
        return self.state.replays

    @property
    def replay_end_ns(self) -> int:
        """Mic time just after the last replay's final sample (0 before any replay)."""
        st = self.state
        if len(st.replay_out) == 0:
            return 0
        return st.replay_start_ns + round(len(st.replay_out) * NS_PER_S / self.config.sample_rate)

    def replayed_span(self, start_ns: int, n: int) -> tuple[FloatArray, FloatArray] | None:
        """Microphone and residual of the last replay's final pass for ``[start_ns, + n)``.

        The residual is what the filter, as adapted by the replay, leaves of that audio: what
        the echo there looks like to the filter now. None unless the span lies inside the replay.
        """
        st = self.state
        i = round((start_ns - st.replay_start_ns) * self.config.sample_rate / NS_PER_S)
        if i < 0 or i + n > len(st.replay_out):
            return None
        return st.replay_mic[i : i + n], st.replay_out[i : i + n]

    @property
    def full_resets(self) -> int:
        """How often :meth:`reset` forgot everything (a new time base)."""
        return self.state.full_resets

    @property
    def last_mic(self) -> FloatArray:
        """The raw microphone samples of the block :meth:`process` returned last (same span)."""
        return self.state.last_mic

    def write_reference(self, stamp_ns: int, samples: FloatArray) -> None:
        """Store reference already at ``config.sample_rate``: ``samples[0]`` plays at
        ``stamp_ns`` (a remembered echo path's reference, omni_ros.core.echo_path). Earlier
        writes win where they overlap: what was published for this span stays."""
        x = np.asarray(samples, dtype=np.float32)
        if len(x) == 0:
            return
        if self.state.ref_start_ns is not None:
            known = self._reference_window(stamp_ns, len(x))
            x = np.where(known != 0.0, known, x)
        self._write_reference(stamp_ns, x)

    def preset_delay(self, delay_ns: int, align_ns: int) -> None:
        """Assume ``delay_ns`` (and read the reference ``align_ns`` back) until an estimate says
        otherwise: a remembered echo path. The estimator still runs from scratch."""
        self.state.delay_ns = int(delay_ns)
        self.state.align_ns = max(0, int(align_ns))

    def reference_window(self, start_ns: int, n: int) -> FloatArray:
        """The reference scheduled to play in ``[start_ns, start_ns + n samples)`` at the
        canceller's rate, zeros where none is known (play time, not aligned to the mic)."""
        return self._reference_window(start_ns, n)

    @property
    def delay_rejected_no_echo(self) -> int:
        """How many confident GCC-PHAT estimates were refused for lack of echo coherence."""
        return self.state.delay_rejected_no_echo

    # ------------------------------------------------------------------------------------ reference
    def push_reference(self, stamp_ns: int, samples: FloatArray, rate: int) -> None:
        """Add published speech: ``samples[0]`` is scheduled to play at ``stamp_ns``.

        Consecutive chunks whose stamps continue each other are resampled as one stream.
        """
        if len(samples) == 0:
            return
        st = self.state
        cfg = self.config
        same = self._resampler is not None and self._resampler_rate == rate
        gap_ns = stamp_ns - st.ref_stream_next_ns if st.ref_stream_next_ns is not None else None
        if (
            same
            and gap_ns is not None
            and st.ref_stream_chunks == 1
            and NS_PER_S // rate < gap_ns <= _FIRST_CHUNK_SNAP_NS
        ):
            self._move_stream(gap_ns)  # the first chunk played right before this one
        contiguous = (
            same
            and st.ref_stream_next_ns is not None
            and abs(stamp_ns - st.ref_stream_next_ns) <= NS_PER_S // rate
        )
        if not contiguous:
            self._close_reference_stream()
            self._resampler = soxr.ResampleStream(rate, cfg.sample_rate, 1, dtype="float32")
            self._resampler_rate = rate
            self._place_stream(stamp_ns)
            st.ref_stream_out = 0
            st.ref_stream_chunks = 0
        st.ref_stream_chunks += 1
        x = np.nan_to_num(np.asarray(samples, dtype=np.float32)) * cfg.reference_gain
        assert self._resampler is not None
        out = self._resampler.resample_chunk(x.astype(np.float32), last=False)
        st.ref_stream_next_ns = stamp_ns + round(len(samples) * NS_PER_S / rate)
        self._write_stream_output(out)

    @property
    def first_chunk_snaps(self) -> int:
        """How often a stream's first chunk was moved to where the next one began (see
        ``_FIRST_CHUNK_SNAP_NS``)."""
        return self.state.first_chunk_snaps

    def _move_stream(self, shift_ns: int) -> None:
        """Move what the open stream wrote so far ``shift_ns`` later (its resampler's state
        goes on: the samples are the same, only their play time was wrong). Only a stream's
        first chunk is moved, and all of its resampled samples are still held (``frac_y``)."""
        st = self.state
        assert st.frac_y0 == 0
        assert st.ref_start_ns is not None
        if st.frac_next > 0:
            self._write_index(st.frac_base, np.zeros(st.frac_next, dtype=np.float32))
        self._place_stream(st.ref_stream_start_ns + shift_ns, keep=True)
        self._emit_placed(st.ref_stream_out - _FRAC_HALF)
        assert st.ref_stream_next_ns is not None
        st.ref_stream_next_ns += shift_ns
        st.first_chunk_snaps += 1

    def _place_stream(self, stamp_ns: int, keep: bool = False) -> None:
        """Begin a stream whose first sample plays at ``stamp_ns``: in general between two grid
        samples. The echo of a sound that starts between two microphone samples is sampled
        there; a reference rounded to the nearest grid sample is off by up to half a sample
        (31 us at 16 kHz), which is 8 dB of error at 2 kHz, and each turn starts at a new
        fraction. Measured through the nodes: a filter converged in one turn left the next
        turn's echo 3-8 dB below the microphone instead of 30-50 dB, until it re-adapted
        (docs/BENCHMARKS.md). So the stream is delayed by the fraction (windowed sinc)."""
        st = self.state
        if st.ref_start_ns is None:
            st.ref_start_ns = stamp_ns
            st.ref_offset = 0
        pos = (stamp_ns - st.ref_start_ns) * self.config.sample_rate / NS_PER_S
        base = int(np.floor(pos))
        st.ref_stream_start_ns = stamp_ns
        st.frac_base = base
        st.frac_taps = fractional_delay_taps(pos - base)
        st.frac_next = 0
        if not keep:  # a new stream (``keep``: the open one moved, its samples stay)
            st.frac_y = np.zeros(0, dtype=np.float32)
            st.frac_y0 = 0

    def _emit_placed(self, until: int) -> None:
        """Write the placed stream up to (not including) stream sample ``until``."""
        st = self.state
        half = _FRAC_HALF
        lo = st.frac_next
        if until <= lo:
            return
        # z[m] = sum_n taps[n] * y[m - n + half]: needs y[lo - half, until + half).
        first = lo - half
        seg = np.zeros(until - lo + 2 * half, dtype=np.float32)
        a = max(first, st.frac_y0)
        b = min(until + half, st.frac_y0 + len(st.frac_y))
        if b > a:
            seg[a - first : b - first] = st.frac_y[a - st.frac_y0 : b - st.frac_y0]
        placed = np.convolve(seg, st.frac_taps)[2 * half : 2 * half + until - lo]
        self._write_index(st.frac_base + lo, placed.astype(np.float32))
        st.frac_next = until

    def drop_reference_after(self, stamp_ns: int) -> None:
        """Forget reference scheduled at or after ``stamp_ns`` (speech flushed by a barge-in)."""
        self._close_reference_stream(write=False)
        st = self.state
        if st.ref_start_ns is None:
            return
        keep = self._ref_index(stamp_ns)
        st.ref_segments = [(i, x[: keep - i]) for i, x in st.ref_segments if keep > i]

    def _write_stream_output(self, out: FloatArray, last: bool = False) -> None:
        """Place the open stream's next resampled samples (``last``: and its end)."""
        st = self.state
        if len(out):
            st.frac_y = np.concatenate([st.frac_y, np.asarray(out, dtype=np.float32)])
            st.ref_stream_out += len(out)
        half = _FRAC_HALF
        self._emit_placed(st.ref_stream_out + half if last else st.ref_stream_out - half)
        if st.ref_stream_chunks > 1:  # no longer movable: keep what the taps still need
            keep = max(st.frac_y0, st.frac_next - half)
            st.frac_y = st.frac_y[keep - st.frac_y0 :]
            st.frac_y0 = keep

    def _close_reference_stream(self, write: bool = True) -> None:
        if self._resampler is not None and write:
            tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            self._write_stream_output(tail, last=True)
        self._resampler = None
        self.state.ref_stream_next_ns = None

    def _ref_index(self, stamp_ns: int) -> int:
        """Grid index (samples at the canceller's rate since ``ref_start_ns``) of ``stamp_ns``."""
        st = self.state
        assert st.ref_start_ns is not None
        return round((stamp_ns - st.ref_start_ns) * self.config.sample_rate / NS_PER_S)

    def _write_reference(self, stamp_ns: int, x: FloatArray) -> None:
        """Store ``x`` from ``stamp_ns`` on the grid; later writes win where they overlap.

        A run that starts more than ``_MAX_REF_GAP_S`` from every stored run is kept as a run of
        its own instead of zero-filling the gap: a forward clock jump of any size (hours, days)
        costs the samples written, not the jump (it used to allocate 220 MB per hour jumped).
        Shorter gaps are zero-filled as before, so reads see the same samples either way.
        """
        st = self.state
        if st.ref_start_ns is None:
            st.ref_start_ns = stamp_ns
            st.ref_offset = 0
        self._write_index(self._ref_index(stamp_ns), x)

    def _write_index(self, i: int, x: FloatArray) -> None:
        """Store ``x`` from grid index ``i`` (see :meth:`_write_reference`)."""
        st = self.state
        if i < st.ref_offset:  # older than what is kept: only the part still ahead matters
            x = x[st.ref_offset - i :]
            i = st.ref_offset
        if len(x) == 0:
            return
        end = i + len(x)
        gap = _MAX_REF_GAP_S * self.config.sample_rate
        segments = st.ref_segments
        near = [k for k, (j, y) in enumerate(segments) if j - gap <= end and i <= j + len(y) + gap]
        if len(near) == 1 and segments[near[0]][0] <= i:  # the common case: in or after a run
            j, y = segments[near[0]]
            if end - j > len(y):
                y = np.concatenate([y, np.zeros(end - j - len(y), dtype=np.float32)])
                segments[near[0]] = (j, y)
            y[i - j : end - j] = x
            return
        start = min([i] + [segments[k][0] for k in near])
        stop = max([end] + [segments[k][0] + len(segments[k][1]) for k in near])
        merged = np.zeros(stop - start, dtype=np.float32)
        for k in near:
            j, y = segments[k]
            merged[j - start : j - start + len(y)] = y
        merged[i - start : end - start] = x
        kept = [seg for k, seg in enumerate(segments) if k not in near]
        kept.append((start, merged))
        kept.sort(key=lambda seg: seg[0])
        st.ref_segments = kept

    def _reference_window(self, start_ns: int, n: int) -> FloatArray:
        """Reference samples for ``[start_ns, start_ns + n samples)``, zeros where none is known."""
        st = self.state
        out = np.zeros(n, dtype=np.float32)
        if st.ref_start_ns is None or n == 0:
            return out
        i0 = self._ref_index(start_ns)
        for j, y in st.ref_segments:
            lo, hi = max(i0, j), min(i0 + n, j + len(y))
            if hi > lo:
                out[lo - i0 : hi - i0] = y[lo - j : hi - j]
        return out

    # ------------------------------------------------------------------------------------ mic side
    def reset(self) -> None:
        """Forget both streams, the delay estimate and the adapted filter."""
        self._close_reference_stream(write=False)
        self.state.reset(self.config.initial_delay_ms * 1_000_000)
        self._speex.reset()
        self.state.filter_resets += 1
        self.state.full_resets += 1

    def close(self) -> None:
        """Free the native state. Idempotent."""
        self._speex.close()

    def process(self, block: AudioBlock) -> AudioBlock:
        """Cancel the echo in ``block``; returns the cleaned samples of every completed frame.

        Raises:
            DecodeError: the block is not at ``config.sample_rate``.
        """
        cfg = self.config
        if block.sample_rate != cfg.sample_rate:
            raise DecodeError(
                f"echo canceller runs at {cfg.sample_rate} Hz, got {block.sample_rate} Hz: "
                "resample the microphone first"
            )
        st = self.state
        rate = cfg.sample_rate
        if st.mic_anchor_ns is None or not self._continues(block):
            self._restart_mic(block.stamp_ns)
        assert st.mic_anchor_ns is not None
        samples = np.asarray(block.samples, dtype=np.float32)
        if len(st.remainder):
            samples = np.concatenate([st.remainder, samples])
        fl = cfg.frame_len
        used = (len(samples) // fl) * fl
        st.remainder = samples[used:].astype(np.float32, copy=True)
        start_ns = st.mic_anchor_ns + round(st.mic_samples * NS_PER_S / rate)
        if used == 0:
            st.last_mic = np.zeros(0, dtype=np.float32)
            return AudioBlock(start_ns, rate, np.zeros(0, dtype=np.float32))
        mic = samples[:used]
        st.last_mic = mic
        self._maybe_flush_reference(start_ns + round(used * NS_PER_S / rate))
        play = self._reference_window(start_ns - st.align_ns, used)
        out16 = self._speex.process(_to_int16(mic), _to_int16(play))
        if np.any(np.abs(play) > 1e-3):
            st.active_ref_samples += used
        st.mic_samples += used
        if cfg.estimate_delay:
            self._update_delay(mic, start_ns + round(used * NS_PER_S / rate))
        self._trim_reference(start_ns)
        return AudioBlock(start_ns, rate, out16.astype(np.float32) / 32768.0)

    def _continues(self, block: AudioBlock) -> bool:
        st = self.state
        assert st.mic_anchor_ns is not None
        n = st.mic_samples + len(st.remainder)
        expected = st.mic_anchor_ns + round(n * NS_PER_S / self.config.sample_rate)
        return abs(block.stamp_ns - expected) <= NS_PER_S // self.config.sample_rate

    def _restart_mic(self, stamp_ns: int) -> None:
        st = self.state
        st.mic_anchor_ns = stamp_ns
        st.mic_samples = 0
        st.remainder = np.zeros(0, dtype=np.float32)
        st.mic_hist = np.zeros(0, dtype=np.float32)
        st.since_estimate = 0

    def _maybe_flush_reference(self, mic_end_ns: int) -> None:
        """Close an idle reference stream once the mic has caught up with its end.

        The resampler holds back its last few milliseconds until told the stream ended; the end of
        a spoken turn must not be missing from the reference.
        """
        st = self.state
        if st.ref_stream_next_ns is not None and mic_end_ns >= st.ref_stream_next_ns:
            self._close_reference_stream()

    def _update_delay(self, mic: FloatArray, end_ns: int) -> None:
        cfg = self.config
        st = self.state
        rate = cfg.sample_rate
        full = rate * cfg.delay_window_ms // 1000
        st.mic_hist = np.concatenate([st.mic_hist, mic])[-full:]
        st.since_estimate += len(mic)
        # Until the first estimate, a shorter window with stronger evidence: barge-in detection
        # is blunt while the delay is unknown (omni_ros.core.bargein), so knowing it early counts.
        first = st.delay_estimates == 0
        window = min(full, rate * cfg.delay_first_window_ms // 1000) if first else full
        if st.since_estimate < rate * cfg.delay_update_ms // 1000 or len(st.mic_hist) < window:
            return
        st.since_estimate = 0
        mic_win = st.mic_hist[-window:]
        max_lag = rate * cfg.max_delay_ms // 1000
        win_start_ns = end_ns - round(window * NS_PER_S / rate)
        ref = self._reference_window(
            win_start_ns - round(max_lag * NS_PER_S / rate), window + max_lag
        )
        # Only a window where the reference is active over most of its span says anything.
        active = np.abs(ref[max_lag:]) > 1e-3
        if active.mean() < 0.5 or float(np.std(mic_win)) < 1e-4:
            return
        lag, confidence = gcc_phat_delay(
            mic_win,
            ref,
            max_lag,
            first_arrival=(
                rate * cfg.delay_first_arrival_ms // 1000,
                cfg.delay_first_arrival_ratio,
            ),
        )
        if confidence < cfg.delay_min_confidence:
            return
        aligned = ref[max_lag - lag : max_lag - lag + window]
        coherence = echo_coherence(
            mic_win, aligned, rate, (cfg.delay_coherence_low_hz, cfg.delay_coherence_high_hz)
        )
        if coherence < cfg.delay_min_coherence:
            # A whitened correlation always has a peak; without coherent echo it is a fluke
            # (the user talking over a muted or distant speaker), and accepting it would reset
            # the filter. It also breaks a pending pair of agreeing estimates.
            st.delay_rejected_no_echo += 1
            st.last_estimate_ns = None
            return
        estimate_ns = round(lag * NS_PER_S / rate)
        previous, st.last_estimate_ns = st.last_estimate_ns, estimate_ns
        alone = first and coherence >= cfg.delay_first_min_coherence
        if not alone and (
            previous is None or abs(estimate_ns - previous) > cfg.delay_tolerance_ms * 1_000_000
        ):
            return  # one estimate alone may be a fluke (e.g. the user talking over the robot)
        st.delay_ns = estimate_ns
        st.delay_estimates += 1
        covered_ns = (cfg.filter_ms - cfg.delay_headroom_ms) * 1_000_000
        if not st.align_ns <= estimate_ns <= st.align_ns + covered_ns:
            st.align_ns = max(0, estimate_ns - cfg.delay_margin_ms * 1_000_000)
            self._speex.reset()  # the adapted taps belong to the old alignment
            st.filter_resets += 1
            st.active_ref_samples = 0  # ...so the filter has to converge again
            st.replayed = False
        if not st.replayed and not self.converged:
            st.replayed = True
            self._replay(end_ns)

    def _replay(self, end_ns: int) -> None:
        """Adapt the filter on the microphone history again (see ``AecConfig.replay_passes``).

        The older part of the history (all but its last half, at most ``_REPLAY_TEST_MS``) is
        run ``replay_passes`` times, then the newest part once: its residual
        (``replayed_span``) is the trained filter's a-priori error on audio it had not been
        trained on, what the next frames can expect (a pass over audio the filter was already
        trained on measured up to 15 dB lower than the frames after it). The history ends with
        the block just processed, so after the replay the filter's memory of the far end
        continues with the next block as if nothing happened.
        """
        cfg = self.config
        st = self.state
        fl = cfg.frame_len
        n = (len(st.mic_hist) // fl) * fl
        if cfg.replay_passes == 0 or n == 0:
            return
        start_ns = end_ns - round(n * NS_PER_S / cfg.sample_rate)
        ref = self._reference_window(start_ns - st.align_ns, n)
        mic, play = _to_int16(st.mic_hist[-n:]), _to_int16(ref)
        active = np.abs(ref.reshape(-1, fl)).max(axis=1) > 1e-3
        test = min(cfg.sample_rate * _REPLAY_TEST_MS // 1000, n // 2) // fl * fl or n
        train = n - test
        for _ in range(cfg.replay_passes if train else 0):
            self._speex.process(mic[:train], play[:train])
            st.active_ref_samples += int(np.count_nonzero(active[: train // fl])) * fl
        out = self._speex.process(mic[train:], play[train:])
        st.active_ref_samples += int(np.count_nonzero(active[train // fl :])) * fl
        st.replays += 1
        st.replay_start_ns = start_ns + round(train * NS_PER_S / cfg.sample_rate)
        st.replay_mic = st.mic_hist[len(st.mic_hist) - test :].copy()
        st.replay_out = out.astype(np.float32) / 32768.0

    def _trim_reference(self, mic_start_ns: int) -> None:
        """Drop reference older than anything the filter or the delay estimator can still need."""
        st = self.state
        cfg = self.config
        if st.ref_start_ns is None:
            return
        keep_ms = cfg.max_delay_ms + cfg.delay_window_ms + cfg.filter_ms + 100
        horizon_ns = mic_start_ns - max(st.delay_ns, 0) - keep_ms * 1_000_000
        cut = self._ref_index(horizon_ns)
        if cut - st.ref_offset > cfg.sample_rate:  # trim in >= 1 s steps to keep copies rare
            st.ref_offset = cut
            st.ref_segments = [
                (max(j, cut), y[max(0, cut - j) :]) for j, y in st.ref_segments if j + len(y) > cut
            ]


def _to_int16(x: FloatArray) -> Int16Array:
    return (np.clip(np.nan_to_num(x), -1.0, 1.0) * 32767.0).astype(np.int16)


# ------------------------------------------------------------------------------- robot_speaking gate
class RobotSpeakingGate:
    """How much user speech a barge-in needs, given whether the robot is speaking.

    Args:
        config: uses ``gate_mode`` and ``gate_min_speech_ms``.
    """

    def __init__(self, config: AecConfig | None = None) -> None:
        self.config = config or AecConfig()
        self.robot_speaking = False

    def required_speech_ns(self, base_ns: int) -> int | None:
        """Speech run needed for barge-in now, or None if barge-in is suppressed.

        Args:
            base_ns: what the VAD alone requires (its ``min_speech_ms``).
        """
        if not self.robot_speaking or self.config.gate_mode == "off":
            return base_ns
        if self.config.gate_mode == "suppress":
            return None
        return max(base_ns, self.config.gate_min_speech_ms * 1_000_000)
