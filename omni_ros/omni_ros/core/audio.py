"""Audio conversions: raw PCM bytes <-> mono float32, resampling, fixed-size output chunks.

Everything here is vectorised numpy (no per-sample Python loops). Inside the core, audio is mono
float32 in [-1, 1] (see :mod:`omni_ros.core.types`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import soxr

from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.core.types import AudioBlock, Counters, FloatArray, RawAudio

MAX_SAMPLE_RATE = 384_000
"""Highest accepted input rate; anything above is a corrupt header, not a microphone."""

# Bytes per sample and numpy dtype per supported encoding (explicit little-endian).
_ENCODINGS: dict[str, tuple[int, str]] = {"S16LE": (2, "<i2"), "F32LE": (4, "<f4")}
ENCODINGS = tuple(_ENCODINGS)
RESAMPLE_QUALITIES = ("HQ", "VHQ")

# S16 full scale: decode divides by 32768 so that -32768 maps to exactly -1.0; encode multiplies
# by the same factor and clips to the int16 range, so decode(encode(x)) is within 1/32768 of x.
_S16_SCALE = 32768.0


@dataclass(frozen=True)
class DecodedAudio:
    """Result of :func:`decode_audio_counted`: the block and how many samples were NaN / inf."""

    block: AudioBlock
    nonfinite_samples: int


def _validate(raw: RawAudio) -> tuple[int, str]:
    encoding = raw.encoding.strip().upper()
    if encoding not in _ENCODINGS:
        raise DecodeError(
            f"unknown audio encoding {raw.encoding!r}; supported: {', '.join(ENCODINGS)}"
        )
    if raw.channels <= 0:
        raise DecodeError(f"audio chunk has channels={raw.channels}; it must be >= 1")
    if raw.sample_rate <= 0 or raw.sample_rate > MAX_SAMPLE_RATE:
        raise DecodeError(
            f"audio chunk has sample_rate={raw.sample_rate}; expected 1..{MAX_SAMPLE_RATE} Hz"
        )
    width, dtype = _ENCODINGS[encoding]
    frame_bytes = width * raw.channels
    if len(raw.data) % frame_bytes:
        raise DecodeError(
            f"truncated audio chunk: {len(raw.data)} bytes is not a multiple of the "
            f"{frame_bytes}-byte frame ({encoding}, {raw.channels} channel(s))"
        )
    return frame_bytes, dtype


def audio_frames(raw: RawAudio) -> int:
    """How many sample frames ``raw`` holds, without decoding it.

    Raises:
        DecodeError: the same checks as :func:`decode_audio` (encoding, channels, rate, truncation).
    """
    frame_bytes, _ = _validate(raw)
    return len(raw.data) // frame_bytes


def decode_audio_counted(raw: RawAudio) -> DecodedAudio:
    """Decode interleaved S16LE / F32LE PCM of any channel count to mono float32 in [-1, 1].

    Channels are downmixed by their mean. NaN / inf samples (F32LE only) are replaced by 0 before
    the downmix (so one bad channel does not poison the others) and counted; the result is
    clipped to [-1, 1].

    Raises:
        DecodeError: unknown encoding, channels < 1, a sample rate outside 1..384000 Hz, or a data
            length that is not a whole number of frames (truncated chunk).
    """
    _, dtype = _validate(raw)
    # Zero-copy view of the message bytes; every later step produces a new array.
    pcm = np.frombuffer(raw.data, dtype=dtype)
    nonfinite = 0
    if dtype == "<i2":
        # One pass int16 -> float32; the result is within [-1, 1) by construction (no clip).
        samples = np.multiply(pcm, np.float32(1.0 / _S16_SCALE), dtype=np.float32)
    else:
        finite = np.isfinite(pcm)
        nonfinite = int(pcm.size - np.count_nonzero(finite))
        samples = np.where(finite, pcm, np.float32(0.0)).astype(np.float32, copy=False)
        np.clip(samples, -1.0, 1.0, out=samples)
    if raw.channels > 1:
        samples = samples.reshape(-1, raw.channels).mean(axis=1, dtype=np.float32)
    return DecodedAudio(AudioBlock(raw.stamp_ns, raw.sample_rate, samples), nonfinite)


def decode_audio(raw: RawAudio, counters: Counters | None = None) -> AudioBlock:
    """Like :func:`decode_audio_counted`, adding the NaN / inf count to ``counters`` if given.

    Raises:
        DecodeError: see :func:`decode_audio_counted`.
    """
    decoded = decode_audio_counted(raw)
    if counters is not None:
        counters.nonfinite_samples += decoded.nonfinite_samples
    return decoded.block


def encode_audio(samples: FloatArray, encoding: str) -> bytes:
    """Encode mono float32 samples as S16LE (clipped, rounded to nearest) or F32LE bytes.

    NaN / inf become 0 and F32LE output is clipped to [-1, 1] as well, so a listener never gets a
    non-finite or out-of-range sample from us.

    Raises:
        DecodeError: unknown encoding.
    """
    name = encoding.strip().upper()
    if name not in _ENCODINGS:
        raise DecodeError(f"unknown audio encoding {encoding!r}; supported: {', '.join(ENCODINGS)}")
    clean = np.nan_to_num(np.asarray(samples, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    if name == "S16LE":
        scaled = np.rint(clean * np.float32(_S16_SCALE))
        return bytes(np.clip(scaled, -32768, 32767).astype("<i2").tobytes())
    return bytes(np.clip(clean, -1.0, 1.0).astype("<f4").tobytes())


def resample(samples: FloatArray, in_rate: int, out_rate: int, quality: str = "HQ") -> FloatArray:
    """Resample a whole block with soxr (no state; the output is aligned with the input).

    Raises:
        ConfigError: a non-positive rate or an unknown quality.
    """
    _check_rates(in_rate, out_rate, quality)
    data = np.ascontiguousarray(samples, dtype=np.float32)
    if in_rate == out_rate:
        same: FloatArray = data.copy()  # annotated: numpy's stubs give Any under Python 3.10
        return same
    out: FloatArray = soxr.resample(data, in_rate, out_rate, quality=quality).astype(
        np.float32, copy=False
    )
    return out


def _check_rates(in_rate: int, out_rate: int, quality: str) -> None:
    if in_rate <= 0 or out_rate <= 0:
        raise ConfigError(f"resampler rates must be positive, got {in_rate} -> {out_rate}")
    if quality not in RESAMPLE_QUALITIES:
        raise ConfigError(f"resample quality {quality!r} unknown; use one of {RESAMPLE_QUALITIES}")


class StreamResampler:
    """A stateful streaming resampler (``soxr.ResampleStream``) with an explicit :meth:`reset`.

    Feed consecutive chunks of one stream; the concatenated output equals resampling the whole
    stream, except that the filter delay holds back the last few milliseconds until more input (or
    ``last=True``) arrives. Use it for continuous streams such as speech output; the timeline uses
    windowed :func:`resample` instead because a unit must be complete when it closes.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        _check_rates(in_rate, out_rate, quality)
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.quality = quality
        self._stream = self._new_stream()
        self._finished = False

    def _new_stream(self) -> soxr.ResampleStream:
        return soxr.ResampleStream(
            self.in_rate, self.out_rate, 1, dtype="float32", quality=self.quality
        )

    def process(self, samples: FloatArray, last: bool = False) -> FloatArray:
        """Resample the next chunk; ``last=True`` flushes the held-back tail.

        After ``last=True`` the next call starts a new stream (as if :meth:`reset` was called).
        """
        if self._finished:
            self.reset()
        data = np.ascontiguousarray(samples, dtype=np.float32)
        if self.in_rate == self.out_rate:
            out: FloatArray = data.copy()  # annotated: numpy's stubs give Any under Python 3.10
        else:
            out = self._stream.resample_chunk(data, last=last).astype(np.float32, copy=False)
        self._finished = last
        return out

    def reset(self) -> None:
        """Forget all history (start of a new stream)."""
        self._stream = self._new_stream()
        self._finished = False


def chunk_output(
    samples: FloatArray,
    sample_rate: int,
    chunk_samples: int,
    stamp_ns: int,
    pad_last: bool = False,
) -> list[tuple[int, FloatArray]]:
    """Split ``samples`` (``samples[0]`` plays at ``stamp_ns``) into chunks of ``chunk_samples``.

    Each chunk's stamp is computed from its absolute offset (``stamp_ns + round(i * 1e9 / rate)``),
    so stamps never drift however many chunks there are. The last chunk is shorter unless
    ``pad_last`` zero-pads it to full size. Chunks are views into ``samples`` (or one padded copy).

    Raises:
        ConfigError: a non-positive ``sample_rate`` or ``chunk_samples``.
    """
    if sample_rate <= 0 or chunk_samples <= 0:
        raise ConfigError(
            f"chunk_output needs sample_rate > 0 and chunk_samples > 0, got {sample_rate}, "
            f"{chunk_samples}"
        )
    data = np.asarray(samples, dtype=np.float32)
    chunks: list[tuple[int, FloatArray]] = []
    for offset in range(0, len(data), chunk_samples):
        chunk = data[offset : offset + chunk_samples]
        if pad_last and len(chunk) < chunk_samples:
            chunk = np.concatenate([chunk, np.zeros(chunk_samples - len(chunk), np.float32)])
        chunks.append((stamp_ns + _offset_ns(offset, sample_rate), chunk))
    return chunks


def _offset_ns(samples: int, sample_rate: int) -> int:
    """``round(samples * 1e9 / sample_rate)`` in exact integer arithmetic."""
    return (2 * samples * NS_PER_S + sample_rate) // (2 * sample_rate)


class OutputChunker:
    """Cuts a continuous output stream (e.g. 24 kHz speech, unit after unit) into fixed chunks.

    Unlike :func:`chunk_output` it carries a partial chunk over to the next :meth:`push`, so every
    published chunk has exactly ``chunk_samples`` samples except the one :meth:`flush` returns.
    Stamps are computed from the stream's first stamp and the absolute sample count (no drift); a
    push whose stamp does not continue the stream (a new turn, a gap) flushes the remainder first
    and starts a new stream.
    """

    def __init__(self, sample_rate: int, chunk_samples: int) -> None:
        if sample_rate <= 0 or chunk_samples <= 0:
            raise ConfigError(
                f"OutputChunker needs sample_rate > 0 and chunk_samples > 0, got {sample_rate}, "
                f"{chunk_samples}"
            )
        self.sample_rate = sample_rate
        self.chunk_samples = chunk_samples
        self._pending = np.zeros(0, np.float32)
        self._origin_ns = 0
        self._emitted = 0  # samples of the current stream already returned in chunks

    @property
    def pending_samples(self) -> int:
        """Samples held back waiting for a full chunk."""
        return len(self._pending)

    def _stamp_of(self, sample_index: int) -> int:
        return self._origin_ns + _offset_ns(sample_index, self.sample_rate)

    def push(self, samples: FloatArray, stamp_ns: int) -> list[tuple[int, FloatArray]]:
        """Add samples (``samples[0]`` plays at ``stamp_ns``); return every complete chunk."""
        out: list[tuple[int, FloatArray]] = []
        data = np.asarray(samples, dtype=np.float32)
        # Within half a sample counts as continuous: stamps are rounded to whole nanoseconds.
        half_sample_ns = NS_PER_S // (2 * self.sample_rate)
        expected_ns = self._stamp_of(self._emitted + len(self._pending))
        if len(self._pending) and abs(stamp_ns - expected_ns) > half_sample_ns:
            out.extend(self.flush())
        if not len(self._pending) and abs(stamp_ns - expected_ns) > half_sample_ns:
            self._origin_ns, self._emitted = stamp_ns, 0
        buffer = np.concatenate([self._pending, data]) if len(self._pending) else data
        full = len(buffer) - len(buffer) % self.chunk_samples
        for offset in range(0, full, self.chunk_samples):
            stamp = self._stamp_of(self._emitted + offset)
            out.append((stamp, buffer[offset : offset + self.chunk_samples]))
        self._emitted += full
        self._pending = buffer[full:].copy()
        return out

    def flush(self) -> list[tuple[int, FloatArray]]:
        """Return the held-back partial chunk (if any); the next push starts a new stream."""
        if not len(self._pending):
            return []
        out = [(self._stamp_of(self._emitted), self._pending)]
        self._emitted += len(self._pending)
        self._pending = np.zeros(0, np.float32)
        return out

    def reset(self) -> None:
        """Drop anything held back (e.g. on barge-in); the next push starts a new stream."""
        self._pending = np.zeros(0, np.float32)
        self._origin_ns, self._emitted = 0, 0


# --------------------------------------------------------------------------- WAV files, checked first
#: WAV format tags accepted by :func:`inspect_wav`: PCM, IEEE float, WAVE_FORMAT_EXTENSIBLE.
_WAV_FORMATS = {1: "PCM", 3: "IEEE float", 0xFFFE: "extensible"}
MAX_WAV_CHANNELS = 32
"""More channels than any microphone array we know of: beyond this it is a crafted header."""


@dataclass(frozen=True)
class WavInfo:
    """What a WAV header promises, checked against the file's real size by :func:`inspect_wav`.

    Attributes:
        sample_rate: frames per second.
        channels: interleaved channels.
        bits_per_sample: 8, 16, 24, 32 or 64.
        frames: whole frames the data chunk really holds (a truncated file gives fewer).
    """

    sample_rate: int
    channels: int
    bits_per_sample: int
    frames: int

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


def inspect_wav(data: bytes) -> WavInfo:
    """Check a WAV file's header without decoding its samples (cheap: reads the chunk headers).

    A header can lie (zero channels, a block align of 0, a data chunk larger than the file);
    decoders divide by those fields, so they are checked here first and a crafted file is a
    :class:`DecodeError` with the reason, never a ``ZeroDivisionError`` in a service callback.

    Raises:
        DecodeError: not RIFF/WAVE, no ``fmt `` or ``data`` chunk, an unsupported format tag, a
            channel count outside 1..32, a sample rate outside 1..384000, a block align that is not
            ``channels * bits / 8``, or no whole frame of data.
    """
    import struct

    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise DecodeError("not a WAV file (no RIFF/WAVE header)")
    fmt: tuple[int, int, int, int, int] | None = None
    offset = 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        body = offset + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise DecodeError(f"WAV 'fmt ' chunk is truncated ({size} bytes, 16 needed)")
            tag, channels, rate, _byte_rate, align, bits = struct.unpack_from("<HHIIHH", data, body)
            fmt = (tag, channels, rate, align, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise DecodeError("WAV 'data' chunk comes before its 'fmt ' chunk")
            return _checked_wav(fmt, min(size, len(data) - body))
        offset = body + size + (size & 1)  # chunks are word aligned
    raise DecodeError("WAV file has no 'fmt ' or no 'data' chunk (truncated header?)")


def _checked_wav(fmt: tuple[int, int, int, int, int], data_bytes: int) -> WavInfo:
    tag, channels, rate, align, bits = fmt
    if tag not in _WAV_FORMATS:
        raise DecodeError(f"WAV format tag {tag:#x} unsupported; use PCM or IEEE float")
    if not 1 <= channels <= MAX_WAV_CHANNELS:
        raise DecodeError(f"WAV header says {channels} channels; expected 1..{MAX_WAV_CHANNELS}")
    if not 1 <= rate <= MAX_SAMPLE_RATE:
        raise DecodeError(f"WAV header says {rate} Hz; expected 1..{MAX_SAMPLE_RATE}")
    if bits not in (8, 16, 24, 32, 64) or align != channels * bits // 8:
        raise DecodeError(
            f"WAV header is inconsistent: block align {align} for {channels} channel(s) of "
            f"{bits} bits (expected {channels * bits // 8})"
        )
    frames = data_bytes // align
    if frames == 0:
        raise DecodeError("WAV file holds no audio frame")
    return WavInfo(int(rate), int(channels), int(bits), int(frames))


class ArrivalStamper:
    """The unstamped-input policy: a chunk stamped 0 is stamped on arrival, and counted.

    Many drivers publish ``header.stamp`` 0. Left as is, every such chunk would claim the same
    instant (overlapping, then counted as late or duplicate, and units of the wrong length reach
    the backend). Instead its first sample is placed at ``arrival - duration``; while chunks keep
    arriving within ``tolerance_ns`` of where the previous one ended they are laid end to end, so
    arrival jitter makes neither gaps nor overlaps. Stamped chunks pass unchanged.

    Args:
        tolerance_ns: how far arrival jitter may move a chunk before the stream is re-anchored.
    """

    def __init__(self, tolerance_ns: int = 100_000_000) -> None:
        self.tolerance_ns = tolerance_ns
        #: chunks that arrived unstamped (and were stamped here).
        self.unstamped = 0
        self._next_ns: int | None = None

    def stamp(self, raw: RawAudio, arrival_ns: int) -> RawAudio:
        """``raw``, stamped on arrival if its stamp is 0 (a malformed chunk passes unchanged: the
        decoder counts it)."""
        if raw.stamp_ns != 0:
            return raw
        try:
            frames = audio_frames(raw)
        except DecodeError:
            return raw
        self.unstamped += 1
        duration_ns = _offset_ns(frames, raw.sample_rate)
        start_ns = arrival_ns - duration_ns
        if self._next_ns is not None and abs(start_ns - self._next_ns) <= self.tolerance_ns:
            start_ns = self._next_ns
        self._next_ns = start_ns + duration_ns
        return dataclasses.replace(raw, stamp_ns=max(start_ns, 1))

    def reset(self) -> None:
        """Forget the stream (a new configure, a clock jump)."""
        self._next_ns = None
