"""A simulated room for the conversation benchmark: what the robot plays comes back into its microphone.

:class:`RoomSink` is an :class:`~omni_ros.audio_io.AudioSink` for ``speaker_node``: it "plays"
PCM at real-time pace like a sound card with a 40 ms buffer (``write`` blocks until the block fits)
and logs every block with the wall-clock time its first sample is heard. :class:`Room`
turns that log into the echo part of the microphone signal: the played audio resampled to the
microphone rate, placed between microphone samples where each stretch of sound began (a
fractional delay: continuous time, as in a real room), convolved with a room impulse response
(a direct path after ``delay_ms``, scaled by ``gain``, plus an exponentially decaying diffuse
tail ``reverb_db`` below it) and summed with the user's speech and a noise floor by the
benchmark's microphone thread.

Everything here runs on the wall clock (``time.time_ns``), which is the ROS clock of nodes that do
not use sim time; the microphone stamps, the speaker's schedule and this log share it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import soxr
from omni_ros.audio_io import AudioFormat
from omni_ros.core.clock import NS_PER_S

_DEVICE_SLACK_NS = 5_000_000
_FRAC_TAPS = 48  # each side of the fractional-delay sinc (3 ms at 16 kHz)


@dataclass(frozen=True)
class RoomConfig:
    """One echo path.

    Attributes:
        name: label in the results.
        delay_ms: speaker to microphone delay of the direct path (playback + flight + capture).
        gain: linear gain of the direct path (loudspeaker close to the mic: 0.3-0.6).
        reverb_db: level of the diffuse tail's first tap relative to the direct path.
        rt60_ms: time for the tail to decay by 60 dB (it is cut after ``tail_ms``).
        tail_ms: length of the simulated tail.
        noise_dbfs: level of the white noise floor added to the microphone.
    """

    name: str
    delay_ms: float
    gain: float = 0.4
    reverb_db: float = -12.0
    rt60_ms: float = 250.0
    tail_ms: float = 150.0
    noise_dbfs: float = -55.0

    def impulse_response(self, rate: int, seed: int = 0) -> np.ndarray:
        """The room's impulse response at ``rate`` (float32, starts at lag 0)."""
        rng = np.random.default_rng(seed)
        delay = round(self.delay_ms * rate / 1000)
        tail = round(self.tail_ms * rate / 1000)
        h = np.zeros(delay + tail + 1, np.float32)
        h[delay] = self.gain
        t = np.arange(1, tail + 1) / rate
        decay = 10 ** (-3.0 * t / (self.rt60_ms / 1000))  # -60 dB after rt60
        level = self.gain * 10 ** (self.reverb_db / 20)
        h[delay + 1 :] = level * decay * rng.standard_normal(tail).astype(np.float32) * 0.5
        return h


ROOMS: dict[str, RoomConfig] = {
    "near_40ms": RoomConfig("near_40ms", 40.0, gain=0.5, reverb_db=-15.0, rt60_ms=200.0),
    "mid_120ms": RoomConfig("mid_120ms", 120.0, gain=0.4, reverb_db=-12.0, rt60_ms=300.0),
    "far_300ms": RoomConfig("far_300ms", 300.0, gain=0.3, reverb_db=-10.0, rt60_ms=400.0),
}


class RoomSink:
    """A sound card that plays into the :class:`Room`, with a device buffer.

    Like a blocking PortAudio stream (``Pa_WriteStream`` returns once the frames fit in the host
    buffer, portaudio.h), ``write`` returns as soon as what is queued fits in ``buffer_ms``, and
    ``latency_ns`` is that buffer (``speaker_node`` writes a chunk that much before its stamp). A
    write that comes before the queued audio has played out (within 5 ms) follows on without a
    gap; after that the device ran dry (an underrun: the player was late to write) and the
    block is heard ``buffer_ms`` after its write. :meth:`flush` cannot drop what the device
    holds, like ``speaker_node``'s default PyAudio sink (no ``Pa_AbortStream`` in PyAudio):
    the buffered audio plays out after a cut.

    Args:
        fmt: the speaker's PCM format (``speaker_node`` uses S16LE mono, 24 kHz by default).
        room: where the played audio goes.
        buffer_ms: the device buffer: two of ``speaker_node``'s 20 ms blocks by default.
    """

    def __init__(self, fmt: AudioFormat, room: Room, buffer_ms: float = 40.0) -> None:
        if fmt.encoding != "S16LE" or fmt.channels != 1:
            raise ValueError("RoomSink plays S16LE mono (speaker_node's default format)")
        if buffer_ms < 0:
            raise ValueError(f"buffer_ms = {buffer_ms}; must be >= 0")
        self.format = fmt
        self.room = room
        self._buffer_ns = round(buffer_ms * 1e6)
        self._closed = threading.Event()
        self._end_ns = 0  # when the audio written so far has played out (wall clock)
        self.flushes = 0
        #: How late each write came after the device could take it (the queued audio fitted
        #: into the buffer), for writes within 200 ms of that; over the buffer + 5 ms: underrun.
        self.write_lag_ns: list[int] = []
        self.underruns = 0
        #: Whether the write under way is the player's keep-alive silence (speaker_node's
        #: ``writing_silence``): logged as silence, not as robot speech.
        self.is_silence: Callable[[], bool] = lambda: False

    def write(self, data: bytes) -> None:
        samples = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
        now = time.time_ns()
        if self._end_ns > 0 and now - self._end_ns < 200_000_000:
            self.write_lag_ns.append(now - (self._end_ns - self._buffer_ns))
        if now <= self._end_ns + _DEVICE_SLACK_NS:
            start = self._end_ns  # still playing what was queued: follows on
        else:
            if self._end_ns > 0 and now - self._end_ns < 200_000_000:
                self.underruns += 1  # mid-speech: the device ran dry
            start = now + self._buffer_ns
        self._end_ns = start + len(samples) * NS_PER_S // self.format.sample_rate
        self.room.play(start, samples, data, silence=self.is_silence())
        remaining = self._end_ns - self._buffer_ns - time.time_ns()
        if remaining > 0:
            self._closed.wait(remaining / NS_PER_S)

    def flush(self) -> None:
        self.flushes += 1  # the device's buffer plays out (see the class docstring)

    def drain(self) -> None:
        """Wait until everything written has been heard."""
        remaining = self._end_ns - time.time_ns()
        if remaining > 0:
            self._closed.wait(remaining / NS_PER_S)

    @property
    def latency_ns(self) -> int:
        return self._buffer_ns

    def close(self) -> None:
        self._closed.set()


@dataclass
class Played:
    """One block the speaker played: wall time of its first sample, sample count, its bytes, and
    whether it was the player's keep-alive silence."""

    start_ns: int
    samples: int
    data: bytes
    silence: bool = False

    def end_ns(self, rate: int) -> int:
        return self.start_ns + self.samples * NS_PER_S // rate


class Room:
    """Accumulates what was played (at the mic rate, on a sample grid from ``t0_ns``) and renders
    the echo for any microphone span.

    Args:
        config: the echo path.
        t0_ns: wall time of microphone sample 0.
        duration_s: longest run (the buffers are preallocated).
        mic_rate: microphone sample rate.
        out_rate: the speaker's sample rate.
    """

    def __init__(
        self,
        config: RoomConfig,
        t0_ns: int,
        duration_s: float,
        mic_rate: int = 16_000,
        out_rate: int = 24_000,
    ) -> None:
        self.config = config
        self.t0_ns = t0_ns
        self.mic_rate = mic_rate
        self.out_rate = out_rate
        self.h = config.impulse_response(mic_rate)
        self._h_fft: dict[int, np.ndarray] = {}
        self._played = np.zeros(int(duration_s * mic_rate) + mic_rate, np.float32)
        self._lock = threading.Lock()
        self.log: list[Played] = []
        self._rs: soxr.ResampleStream | None = None
        self._next_in_ns = 0
        self._base = 0  # microphone sample index of the stretch's sample ``_y[0]``
        self._taps = fractional_delay(0.0)
        self._y = np.zeros(0, np.float32)  # the stretch's resampled samples not yet all placed
        self._done = 0  # samples of ``_y`` placed so far

    def play(self, start_ns: int, samples: np.ndarray, data: bytes, silence: bool = False) -> None:
        """The speaker started playing ``samples`` (at ``out_rate``) at ``start_ns``.

        A new stretch of sound begins wherever the device started it, in general between two
        microphone samples: its resampled samples are delayed by that fraction of a sample
        (:func:`fractional_delay`), as a real room's continuous time does, instead of rounded
        onto the microphone's grid (which moved each stretch by up to half a sample).
        """
        with self._lock:
            self.log.append(Played(start_ns, len(samples), data, silence))
            if self._rs is None or abs(start_ns - self._next_in_ns) > 2_000_000:
                self._end_stretch()
                # A new stretch of sound: a fresh resampler placed at its own start.
                self._rs = soxr.ResampleStream(self.out_rate, self.mic_rate, 1, dtype="float32")
                pos = (start_ns - self.t0_ns) * self.mic_rate / NS_PER_S
                self._base = int(np.floor(pos))
                self._taps = fractional_delay(pos - self._base)
                self._y = np.zeros(0, np.float32)
                self._done = 0
            self._next_in_ns = start_ns + len(samples) * NS_PER_S // self.out_rate
            self._y = np.concatenate([self._y, self._rs.resample_chunk(samples)])
            self._place(len(self._y) - _FRAC_TAPS)

    def _end_stretch(self) -> None:
        """Play out the stretch that ended: the resampler's held-back samples and the taps'."""
        if self._rs is None:
            return
        self._y = np.concatenate(
            [self._y, self._rs.resample_chunk(np.zeros(0, np.float32), last=True)]
        )
        self._place(len(self._y) + _FRAC_TAPS)
        self._rs = None

    def _place(self, until: int) -> None:
        """Add the stretch's samples ``[done, until)``, delayed by its fraction, to what was played."""
        lo = self._done
        if until <= lo:
            return
        seg = np.zeros(until - lo + 2 * _FRAC_TAPS, np.float32)
        a, b = max(0, lo - _FRAC_TAPS), min(len(self._y), until + _FRAC_TAPS)
        if b > a:
            seg[a - (lo - _FRAC_TAPS) : b - (lo - _FRAC_TAPS)] = self._y[a:b]
        out = np.convolve(seg, self._taps)[2 * _FRAC_TAPS : 2 * _FRAC_TAPS + until - lo]
        pos = self._base + lo
        end = min(len(self._played), pos + len(out))
        if 0 <= pos < end:
            self._played[pos:end] += out[: end - pos].astype(np.float32)
        self._done = until
        keep = max(0, self._done - _FRAC_TAPS)  # what the taps still need
        if keep > 0:
            self._y = self._y[keep:]
            self._base += keep
            self._done -= keep

    def echo(self, first: int, n: int) -> np.ndarray:
        """Echo at microphone samples ``[first, first + n)`` (float32)."""
        taps = len(self.h)
        lo = first - taps + 1
        with self._lock:
            seg = np.zeros(n + taps - 1, np.float32)
            a, b = max(0, lo), min(len(self._played), first + n)
            if b > a:
                seg[a - lo : b - lo] = self._played[a:b]
        size = _fft_size(len(seg))
        spectrum = self._h_fft.get(size)
        if spectrum is None:
            spectrum = self._h_fft[size] = np.fft.rfft(self.h, size)
        full = np.fft.irfft(np.fft.rfft(seg, size) * spectrum, size)
        return full[taps - 1 : taps - 1 + n].astype(np.float32)


def fractional_delay(frac: float) -> np.ndarray:
    """Taps that delay a band-limited signal by ``frac`` (0 <= frac < 1) samples: a sinc
    ``_FRAC_TAPS`` samples each side under a Blackman-Harris window (the room's own design, not
    the echo canceller's; flat to about 0.001 dB below 0.8 x Nyquist)."""
    n = np.arange(-_FRAC_TAPS, _FRAC_TAPS + 1, dtype=np.float64)
    x = n - frac
    t = (x + _FRAC_TAPS + 1) / (2 * _FRAC_TAPS + 2)  # window position in (0, 1)
    w = (
        0.35875
        - 0.48829 * np.cos(2 * np.pi * t)
        + 0.14128 * np.cos(4 * np.pi * t)
        - 0.01168 * np.cos(6 * np.pi * t)
    )
    h = np.sinc(x) * w
    return (h / h.sum()).astype(np.float32)


def _fft_size(n: int) -> int:
    return 1 << (n - 1).bit_length()
