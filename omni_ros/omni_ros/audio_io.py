"""Audio sources and sinks for ``mic_node`` and ``speaker_node`` (no rclpy here: unit-testable;
it sits beside the core, outside ``omni_ros.ros``, so benchmarks and tools use it without ROS).

A source yields interleaved PCM with the *capture time of its first sample* on the process's
monotonic clock; the node maps that onto the ROS clock (see :class:`CaptureStamper`). A sink
accepts PCM and blocks like a sound card would (``write`` returns when the device took the data).

Implementations:

- :class:`PyAudioSource` / :class:`PyAudioSink`: a real device through PortAudio (``pyaudio`` is
  imported lazily). Devices are chosen by index or by a unique part of their name; a wrong or
  absent device raises :class:`AudioDeviceError` whose message lists the devices that exist.
- :class:`WavFileSource` / :class:`WavFileSink`: a WAV file played or recorded at real-time pace,
  for machines without a sound card (CI, headless robots, demos).
- :class:`ArraySource`, :class:`NullSink`, :class:`RecordingSink`: in-memory, for tests.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError

_BYTES_PER_SAMPLE = {"S16LE": 2, "F32LE": 4}


class AudioDeviceError(ConfigError):
    """An audio device is missing, ambiguous or cannot be opened; the message lists the devices."""


# ------------------------------------------------------------------------------------------- format
@dataclass(frozen=True)
class AudioFormat:
    """Interleaved little-endian PCM layout.

    Attributes:
        sample_rate: frames per second.
        channels: interleaved channels per frame.
        encoding: ``"S16LE"`` or ``"F32LE"`` (the ``omni_ros_msgs/AudioChunk`` encodings).
    """

    sample_rate: int = 16_000
    channels: int = 1
    encoding: str = "S16LE"

    def __post_init__(self) -> None:
        if self.encoding not in _BYTES_PER_SAMPLE:
            raise ConfigError(
                f"audio encoding {self.encoding!r} unknown; use one of {sorted(_BYTES_PER_SAMPLE)}"
            )
        if self.sample_rate <= 0 or self.channels <= 0:
            raise ConfigError(
                f"audio format needs sample_rate > 0 and channels > 0, got {self.sample_rate} Hz, "
                f"{self.channels} channel(s)"
            )

    @property
    def bytes_per_frame(self) -> int:
        return _BYTES_PER_SAMPLE[self.encoding] * self.channels

    def frames(self, data: bytes) -> int:
        """Number of whole frames in ``data``."""
        return len(data) // self.bytes_per_frame

    def duration_ns(self, n_frames: int) -> int:
        return n_frames * NS_PER_S // self.sample_rate


@dataclass(frozen=True)
class CapturedAudio:
    """One read from a source.

    Attributes:
        data: interleaved PCM in the source's :class:`AudioFormat`.
        n_frames: frames in ``data``.
        capture_mono_ns: when the FIRST frame was captured, on ``time.monotonic_ns``'s clock (or
            the source's injected monotonic clock).
        timing: how ``capture_mono_ns`` was obtained: ``"adc"`` (PortAudio's input ADC time),
            ``"estimate"`` (read time minus buffered duration and input latency) or ``"paced"``
            (a simulated device: exact by construction).
        overflowed: the device reported lost input before this read.
    """

    data: bytes
    n_frames: int
    capture_mono_ns: int
    timing: str
    overflowed: bool = False


@runtime_checkable
class AudioSource(Protocol):
    """Anything that captures audio. ``read`` blocks like a device until ``n_frames`` are there."""

    format: AudioFormat

    def read(self, n_frames: int) -> CapturedAudio | None:
        """Return exactly ``n_frames`` frames, or fewer / ``None`` once the source is exhausted."""
        ...

    def close(self) -> None:
        """Release the device. Idempotent; a blocked ``read`` returns ``None``."""
        ...


@runtime_checkable
class AudioSink(Protocol):
    """Anything that plays audio. ``write`` blocks like a device while its buffer is full."""

    format: AudioFormat

    def write(self, data: bytes) -> None:
        """Queue interleaved PCM (whole frames) for playback."""
        ...

    def flush(self) -> None:
        """Drop audio that was written but has not been played yet (best effort)."""
        ...

    def drain(self) -> None:
        """Block until everything written has been played."""
        ...

    @property
    def latency_ns(self) -> int:
        """Delay from ``write`` returning to the sound leaving the speaker."""
        ...

    def close(self) -> None:
        """Release the device. Idempotent."""
        ...


# ------------------------------------------------------------------------------------- time stamps
class CaptureStamper:
    """Turns per-read capture times into gap-free, jitter-free chunk stamps.

    Stamps follow the sample count from an anchor (chunk k+1 starts exactly where chunk k ended,
    as ``AudioChunk`` promises: sample i at ``stamp + i / rate``). Measured capture times jitter
    by scheduling noise, so they only re-anchor the count when they disagree with it by more than
    ``resync_ns`` (a lost buffer, a clock jump, sound-card clock drift accumulated over minutes).

    Args:
        sample_rate: frames per second of the stamped stream.
        resync_ns: tolerated disagreement between measurement and sample count.
    """

    def __init__(self, sample_rate: int, resync_ns: int = 20_000_000) -> None:
        if sample_rate <= 0 or resync_ns < 0:
            raise ConfigError("CaptureStamper needs sample_rate > 0 and resync_ns >= 0")
        self._rate = sample_rate
        self._resync_ns = resync_ns
        self._anchor_ns: int | None = None
        self._frames = 0
        self.resyncs = 0

    def reset(self) -> None:
        self._anchor_ns = None
        self._frames = 0
        self.resyncs = 0

    def stamp(self, measured_ns: int, n_frames: int) -> int:
        """Stamp of a chunk of ``n_frames`` whose first frame was measured at ``measured_ns``."""
        predicted = self._predicted_ns()
        if predicted is None or abs(measured_ns - predicted) > self._resync_ns:
            if predicted is not None:
                self.resyncs += 1
            self._anchor_ns = measured_ns
            self._frames = 0
            predicted = measured_ns
        self._frames += n_frames
        return predicted

    def _predicted_ns(self) -> int | None:
        if self._anchor_ns is None:
            return None
        return self._anchor_ns + self._frames * NS_PER_S // self._rate


# --------------------------------------------------------------------------------- in-memory / wav
#: How late a write may come after the previous one finished and still play without a gap.
_DEVICE_SLACK_NS = 5_000_000


def _pace(due_ns: int, monotonic_ns: Callable[[], int], stop: threading.Event) -> None:
    """Sleep until ``due_ns`` on ``monotonic_ns``'s clock, or until ``stop`` is set."""
    remaining = due_ns - monotonic_ns()
    if remaining > 0:
        stop.wait(remaining / NS_PER_S)


class ArraySource:
    """Plays interleaved PCM bytes as if a microphone were capturing them.

    With ``realtime`` (default) ``read`` returns only once the chunk's last frame "was captured",
    so a node downstream sees real capture timing. Capture times are exact: frame i of the data
    is captured at ``start + i / rate`` where ``start`` is the first ``read`` call.

    Args:
        data: interleaved PCM in ``fmt``.
        fmt: its layout.
        loop: start over at the end instead of ending.
        realtime: pace reads at the sample rate.
        monotonic_ns: clock used for pacing and capture times (injectable for tests).
    """

    def __init__(
        self,
        data: bytes,
        fmt: AudioFormat,
        *,
        loop: bool = False,
        realtime: bool = True,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.format = fmt
        usable = fmt.frames(data) * fmt.bytes_per_frame
        if usable == 0:
            raise ConfigError("ArraySource needs at least one whole audio frame")
        self._data = data[:usable]
        self._loop = loop
        self._realtime = realtime
        self._monotonic_ns = monotonic_ns
        self._start_ns: int | None = None
        self._frames_read = 0
        self._closed = threading.Event()

    def read(self, n_frames: int) -> CapturedAudio | None:
        if self._closed.is_set():
            return None
        if self._start_ns is None:
            self._start_ns = self._monotonic_ns()
        total = len(self._data) // self.format.bytes_per_frame
        if not self._loop and self._frames_read >= total:
            return None
        if not self._loop:
            n_frames = min(n_frames, total - self._frames_read)
        bpf = self.format.bytes_per_frame
        chunk = bytearray()
        pos = self._frames_read % total
        while len(chunk) < n_frames * bpf:
            take = min(n_frames - len(chunk) // bpf, total - pos)
            chunk += self._data[pos * bpf : (pos + take) * bpf]
            pos = (pos + take) % total
        first_ns = self._start_ns + self.format.duration_ns(self._frames_read)
        self._frames_read += n_frames
        if self._realtime:
            due = self._start_ns + self.format.duration_ns(self._frames_read)
            _pace(due, self._monotonic_ns, self._closed)
            if self._closed.is_set():
                return None
        return CapturedAudio(bytes(chunk), n_frames, first_ns, "paced")

    def close(self) -> None:
        self._closed.set()


def read_wav(path: str | Path) -> tuple[bytes, AudioFormat]:
    """Read a PCM WAV file as interleaved bytes: 16-bit stays S16LE, anything else becomes F32LE.

    Raises:
        ConfigError: the file is missing or not a PCM/float WAV file.
    """
    from scipy.io import wavfile  # scipy is a base dependency; imported here to keep startup light

    try:
        rate, samples = wavfile.read(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read WAV file {str(path)!r}: {exc}") from exc
    channels = 1 if samples.ndim == 1 else int(samples.shape[1])
    if samples.dtype == np.int16:
        return samples.astype("<i2").tobytes(), AudioFormat(int(rate), channels, "S16LE")
    if samples.dtype == np.uint8:
        floats = (samples.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(samples.dtype, np.integer):
        floats = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max + 1)
    else:
        floats = samples.astype(np.float32)
    return floats.astype("<f4").tobytes(), AudioFormat(int(rate), channels, "F32LE")


class WavFileSource(ArraySource):
    """A WAV file captured at real-time pace (a microphone for machines without one)."""

    def __init__(
        self,
        path: str | Path,
        *,
        loop: bool = False,
        realtime: bool = True,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        data, fmt = read_wav(path)
        super().__init__(data, fmt, loop=loop, realtime=realtime, monotonic_ns=monotonic_ns)
        self.path = Path(path)


class RecordingSink:
    """Keeps everything written (``data`` / ``writes``); paced like a device when ``realtime``.

    Audio is "played" when written (zero latency), so :meth:`flush` has nothing to drop and only
    counts the call.
    """

    def __init__(
        self,
        fmt: AudioFormat,
        *,
        realtime: bool = True,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.format = fmt
        self._realtime = realtime
        self._monotonic_ns = monotonic_ns
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._chunks: list[bytes] = []
        #: (monotonic ns when the write started, frames) for every write.
        self.writes: list[tuple[int, int]] = []
        self._device_ns = 0  # when the audio written so far has finished playing
        self.flushes = 0

    def write(self, data: bytes) -> None:
        n_frames = self.format.frames(data)
        start = self._monotonic_ns()
        self._keep(data[: n_frames * self.format.bytes_per_frame])
        with self._lock:
            self.writes.append((start, n_frames))
        if self._realtime:
            # Paced by the "device's" own clock, as a sound card with a small buffer is: writes
            # that follow each other within _DEVICE_SLACK_NS play back-to-back, so the caller's
            # overhead between writes does not accumulate as drift (a real device buffers that
            # much). After a longer gap (the device ran dry) playback restarts at the write.
            begin = self._device_ns if start - self._device_ns < _DEVICE_SLACK_NS else start
            self._device_ns = begin + self.format.duration_ns(n_frames)
            _pace(self._device_ns, self._monotonic_ns, self._closed)

    def _keep(self, data: bytes) -> None:
        with self._lock:
            self._chunks.append(data)

    @property
    def data(self) -> bytes:
        with self._lock:
            return b"".join(self._chunks)

    def flush(self) -> None:
        self.flushes += 1

    def drain(self) -> None:
        """Nothing is buffered: written audio has already been played."""

    @property
    def latency_ns(self) -> int:
        return 0

    def close(self) -> None:
        self._closed.set()


class NullSink(RecordingSink):
    """Discards audio (keeps only the ``writes`` log) while pacing like a device."""

    def _keep(self, data: bytes) -> None:
        del data


class WavFileSink(RecordingSink):
    """Writes played audio to a 16-bit WAV file, paced like a device. The header is valid after
    every write, so the file can be read while the node runs."""

    def __init__(
        self,
        path: str | Path,
        fmt: AudioFormat,
        *,
        realtime: bool = True,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if fmt.encoding != "S16LE":
            raise ConfigError(f"WavFileSink writes S16LE only, got {fmt.encoding}")
        super().__init__(fmt, realtime=realtime, monotonic_ns=monotonic_ns)
        self.path = Path(path)
        try:
            # Our own file object, so that every write can be flushed to disk for live readers.
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise ConfigError(f"cannot create WAV file {str(path)!r}: {exc}") from exc
        self._wav = wave.open(self._file, "wb")  # noqa: SIM115 - closed in close()
        self._wav.setnchannels(fmt.channels)
        self._wav.setsampwidth(2)
        self._wav.setframerate(fmt.sample_rate)
        self._keep(b"")  # writes the header now: an empty recording is a valid file

    def _keep(self, data: bytes) -> None:
        with self._lock:
            if not self._closed.is_set():
                self._wav.writeframes(data)
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if not self._closed.is_set():
                self._closed.set()
                self._wav.close()
                self._file.close()


# ------------------------------------------------------------------------------------ PortAudio
def _import_pyaudio(api: Any | None) -> Any:
    if api is not None:
        return api
    try:
        import pyaudio
    except ImportError as exc:  # converted: callers catch ConfigError
        raise AudioDeviceError(
            "pyaudio is not installed (pip install pyaudio==0.2.14; it needs Debian/Ubuntu "
            "portaudio19-dev to build)"
        ) from exc
    return pyaudio


def _channels_key(direction: str) -> str:
    return "maxInputChannels" if direction == "input" else "maxOutputChannels"


def list_devices(pa: Any, direction: str) -> list[dict[str, Any]]:
    """Device info dicts of every device with at least one ``direction`` channel."""
    key = _channels_key(direction)
    infos = [pa.get_device_info_by_index(i) for i in range(pa.get_device_count())]
    return [info for info in infos if int(info.get(key, 0)) > 0]


def describe_devices(pa: Any, direction: str) -> str:
    """A human-readable list of the ``direction`` devices, for error messages."""
    devices = list_devices(pa, direction)
    if not devices:
        return f"This machine has no audio {direction} devices (PortAudio found none)."
    key = _channels_key(direction)
    lines = [f"Available {direction} devices:"]
    for info in devices:
        lines.append(
            f"  [{info['index']}] {info['name']} ({info[key]} ch, "
            f"{float(info.get('defaultSampleRate', 0)):.0f} Hz)"
        )
    return "\n".join(lines)


def resolve_device(pa: Any, spec: str | int | None, direction: str) -> int | None:
    """Return the PortAudio index for ``spec``: ``None``/``""``/``"default"`` -> the default device
    (``None``), an int or digit string -> that index, otherwise a unique case-insensitive part of a
    device name.

    Raises:
        AudioDeviceError: no such device, not a ``direction`` device, or an ambiguous name; the
            message lists the devices that exist.
    """
    text = "" if spec is None else str(spec).strip()
    devices = list_devices(pa, direction)
    hint = "Set the `device` parameter to an index or a unique part of a name."
    if text.lower() in ("", "default"):
        if not devices:
            raise AudioDeviceError(
                f"no default audio {direction} device. {describe_devices(pa, direction)}"
            )
        return None
    if text.lstrip("-").isdigit():
        index = int(text)
        if any(int(info["index"]) == index for info in devices):
            return index
        raise AudioDeviceError(
            f"audio device index {index} is not an {direction} device.\n"
            f"{describe_devices(pa, direction)}\n{hint}"
        )
    matches = [info for info in devices if text.lower() in str(info["name"]).lower()]
    exact = [info for info in matches if str(info["name"]).lower() == text.lower()]
    if len(matches) == 1 or len(exact) == 1:
        return int((exact or matches)[0]["index"])
    if matches:
        names = ", ".join(repr(str(info["name"])) for info in matches)
        raise AudioDeviceError(
            f"audio {direction} device {text!r} is ambiguous: it matches {names}.\n"
            f"{describe_devices(pa, direction)}\n{hint}"
        )
    raise AudioDeviceError(
        f"no audio {direction} device matches {text!r}.\n{describe_devices(pa, direction)}\n{hint}"
    )


def _pa_format(module: Any, fmt: AudioFormat) -> Any:
    return module.paInt16 if fmt.encoding == "S16LE" else module.paFloat32


def _open_stream(pa: Any, direction: str, spec: str | int | None, **kwargs: Any) -> Any:
    index = resolve_device(pa, spec, direction)
    key = "input_device_index" if direction == "input" else "output_device_index"
    try:
        return pa.open(**{direction: True, key: index}, **kwargs)
    except (OSError, ValueError) as exc:  # PortAudio errors surface as OSError(-99xx, text)
        where = "the default device" if index is None else f"device {index}"
        raise AudioDeviceError(
            f"cannot open audio {direction} on {where} ({kwargs.get('rate')} Hz, "
            f"{kwargs.get('channels')} ch): {exc}\n{describe_devices(pa, direction)}"
        ) from exc


class PyAudioSource:
    """A microphone through PortAudio, in callback mode so that every buffer gets PortAudio's
    input ADC time.

    Capture time of a buffer's first frame: ``monotonic_at_callback - (current_time -
    input_buffer_adc_time)`` when the host API provides ADC times (stream time, e.g. ALSA hw,
    CoreAudio, WASAPI); otherwise ``monotonic_at_callback - buffer duration - input latency``
    (``timing="estimate"``). Buffers queue up to ``max_queued_s``; older ones are dropped and
    the next read reports ``overflowed``.

    Args:
        device: index, unique part of a name, or ``""`` for the default input.
        fmt: capture format.
        frames_per_buffer: PortAudio buffer size (use the node's chunk size).
        api: the ``pyaudio`` module or a test double with the same API (default: import pyaudio).
        monotonic_ns: clock for capture times.
        max_queued_s: buffered audio kept when the reader is slow.

    Raises:
        AudioDeviceError: the device is wrong, absent or cannot be opened (lists devices).
    """

    def __init__(
        self,
        device: str | int | None,
        fmt: AudioFormat,
        frames_per_buffer: int,
        *,
        api: Any | None = None,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        max_queued_s: float = 2.0,
    ) -> None:
        self.format = fmt
        self._module = _import_pyaudio(api)
        self._monotonic_ns = monotonic_ns
        self._max_blocks = max(2, int(max_queued_s * fmt.sample_rate / frames_per_buffer))
        self._queue: queue.Queue[CapturedAudio | None] = queue.Queue()
        self._pending: collections.deque[CapturedAudio] = collections.deque()
        self._overflow = threading.Event()
        self._closed = False
        self.dropped_buffers = 0
        self._pa = self._module.PyAudio()
        try:
            self._stream = _open_stream(
                self._pa,
                "input",
                device,
                format=_pa_format(self._module, fmt),
                channels=fmt.channels,
                rate=fmt.sample_rate,
                frames_per_buffer=frames_per_buffer,
                stream_callback=self._callback,
            )
        except BaseException:
            self._pa.terminate()
            raise
        self._latency_ns = int(float(self._stream.get_input_latency()) * NS_PER_S)

    def _callback(
        self, in_data: bytes | None, frame_count: int, time_info: dict[str, float], status: int
    ) -> tuple[None, int]:
        # PortAudio's audio thread: only timestamp and enqueue, never block.
        now = self._monotonic_ns()
        adc = float(time_info.get("input_buffer_adc_time", 0.0) or 0.0)
        current = float(time_info.get("current_time", 0.0) or 0.0)
        age_s = current - adc
        if adc > 0.0 and 0.0 <= age_s < 1.0:
            captured, timing = now - int(age_s * NS_PER_S), "adc"
        else:
            captured = now - self.format.duration_ns(frame_count) - self._latency_ns
            timing = "estimate"
        if status & int(getattr(self._module, "paInputOverflow", 2)):
            self._overflow.set()
        if self._queue.qsize() >= self._max_blocks:
            self.dropped_buffers += 1
            self._overflow.set()
        else:
            data = bytes(in_data or b"")
            self._queue.put(CapturedAudio(data, self.format.frames(data), captured, timing))
        return None, int(self._module.paContinue)

    def read(self, n_frames: int) -> CapturedAudio | None:
        bpf = self.format.bytes_per_frame
        parts: list[CapturedAudio] = []
        have = 0
        while have < n_frames:
            block = self._pending.popleft() if self._pending else self._queue.get()
            if block is None:
                return None
            need = n_frames - have
            if block.n_frames > need:
                rest = CapturedAudio(
                    block.data[need * bpf :],
                    block.n_frames - need,
                    block.capture_mono_ns + self.format.duration_ns(need),
                    block.timing,
                )
                self._pending.appendleft(rest)
                block = CapturedAudio(
                    block.data[: need * bpf], need, block.capture_mono_ns, block.timing
                )
            parts.append(block)
            have += block.n_frames
        overflowed = self._overflow.is_set()
        self._overflow.clear()
        first = parts[0]
        return CapturedAudio(
            b"".join(p.data for p in parts), have, first.capture_mono_ns, first.timing, overflowed
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stream.stop_stream()
            self._stream.close()
        finally:
            self._pa.terminate()
            self._queue.put(None)


class PyAudioSink:
    """A speaker through PortAudio in blocking mode: ``write`` returns once PortAudio took the data.

    PyAudio exposes no ``Pa_AbortStream``, so :meth:`flush` cannot discard what PortAudio already
    holds; callers bound that by writing small blocks (the host buffer is ``latency_ns`` long).

    Raises:
        AudioDeviceError: the device is wrong, absent or cannot be opened (lists devices).
    """

    def __init__(
        self,
        device: str | int | None,
        fmt: AudioFormat,
        frames_per_buffer: int,
        *,
        api: Any | None = None,
    ) -> None:
        self.format = fmt
        self._module = _import_pyaudio(api)
        self._pa = self._module.PyAudio()
        try:
            self._stream = _open_stream(
                self._pa,
                "output",
                device,
                format=_pa_format(self._module, fmt),
                channels=fmt.channels,
                rate=fmt.sample_rate,
                frames_per_buffer=frames_per_buffer,
            )
        except BaseException:
            self._pa.terminate()
            raise
        self._closed = False

    def write(self, data: bytes) -> None:
        self._stream.write(data, exception_on_underflow=False)

    def flush(self) -> None:
        """Nothing to drop on our side: writes are small and PortAudio cannot abort from pyaudio."""

    def drain(self) -> None:
        time.sleep(self.latency_ns / NS_PER_S)

    @property
    def latency_ns(self) -> int:
        return int(float(self._stream.get_output_latency()) * NS_PER_S)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stream.stop_stream()
            self._stream.close()
        finally:
            self._pa.terminate()


__all__: Sequence[str] = (
    "ArraySource",
    "AudioDeviceError",
    "AudioFormat",
    "AudioSink",
    "AudioSource",
    "CaptureStamper",
    "CapturedAudio",
    "NullSink",
    "PyAudioSink",
    "PyAudioSource",
    "RecordingSink",
    "WavFileSink",
    "WavFileSource",
    "describe_devices",
    "list_devices",
    "read_wav",
    "resolve_device",
)
