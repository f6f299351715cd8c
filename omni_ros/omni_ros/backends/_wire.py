"""Wire helpers shared by the server backends (``llamacpp_omni``, ``vllm_omni``).

Everything here is pure and stdlib/numpy/Pillow only, so the loopback test servers can use the same
encoders and the tests can check both ends against one definition of each format:

- PCM16 little-endian and float32 little-endian sample bytes, and their base64 forms;
- mono WAV files (PCM16) read and written with the stdlib :mod:`wave` module, including a reader
  that tells a half-written file (a server still writing it) from a complete one;
- JPEG encoding of ``uint8`` RGB frames with Pillow;
- a bounded retry/backoff schedule.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omni_ros.core.errors import BackendProtocolError, ConfigError
from omni_ros.core.types import FloatArray, ImageArray

# --------------------------------------------------------------------------------------------- PCM


def float_to_pcm16(samples: FloatArray) -> bytes:
    """Float32 mono in [-1, 1] -> PCM16 little-endian bytes (clipped, rounded)."""
    clipped = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return np.round(clipped * 32767.0).astype("<i2").tobytes()


def pcm16_to_float(data: bytes) -> FloatArray:
    """PCM16 little-endian bytes -> float32 mono in [-1, 1].

    Raises:
        BackendProtocolError: an odd number of bytes (not whole samples).
    """
    if len(data) % 2:
        raise BackendProtocolError(
            f"PCM16 payload has {len(data)} bytes, not a whole number of samples"
        )
    return (np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0).astype(np.float32)


def float_to_f32le(samples: FloatArray) -> bytes:
    """Float32 mono -> float32 little-endian bytes."""
    return np.asarray(samples, dtype="<f4").tobytes()


def f32le_to_float(data: bytes) -> FloatArray:
    """Float32 little-endian bytes -> float32 mono.

    Raises:
        BackendProtocolError: not a whole number of samples, or non-finite samples.
    """
    if len(data) % 4:
        raise BackendProtocolError(
            f"float32 payload has {len(data)} bytes, not a whole number of samples"
        )
    out = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise BackendProtocolError("float32 payload contains NaN or infinite samples")
    return out


def b64encode(data: bytes) -> str:
    """Standard base64 as ASCII text."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: object, what: str = "payload") -> bytes:
    """Decode base64 text received from a server (a ``data:...;base64,`` prefix is stripped).

    Raises:
        BackendProtocolError: ``text`` is not a string or not valid base64.
    """
    if not isinstance(text, str):
        raise BackendProtocolError(f"{what} must be a base64 string, got {type(text).__name__}")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BackendProtocolError(f"{what} is not valid base64: {exc}") from None


# --------------------------------------------------------------------------------------------- WAV


def wav_bytes(samples: FloatArray, sample_rate: int) -> bytes:
    """Encode float32 mono as a complete PCM16 mono WAV file in memory."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(int(sample_rate))
        wav.writeframes(float_to_pcm16(samples))
    return buf.getvalue()


def write_wav(path: str | os.PathLike[str], samples: FloatArray, sample_rate: int) -> Path:
    """Write a PCM16 mono WAV atomically (temp file + rename), so a reader never sees half of it."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(wav_bytes(samples, sample_rate))
    os.replace(tmp, target)
    return target


def parse_wav(data: bytes, what: str = "WAV") -> tuple[FloatArray, int]:
    """Decode a complete PCM16 mono WAV held in memory.

    Returns:
        ``(samples, sample_rate)``.

    Raises:
        BackendProtocolError: not a WAV, not mono PCM16, or shorter than its header says.
    """
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate, n_frames = (
                wav.getnchannels(),
                wav.getsampwidth(),
                wav.getframerate(),
                wav.getnframes(),
            )
            frames = wav.readframes(n_frames)
    except (wave.Error, EOFError) as exc:
        raise BackendProtocolError(f"{what} is not a readable WAV file: {exc}") from None
    if channels != 1 or width != 2:
        raise BackendProtocolError(
            f"{what} must be mono 16-bit PCM, got {channels} channel(s) of {8 * width}-bit samples"
        )
    if len(frames) != n_frames * 2:
        raise BackendProtocolError(
            f"{what} is truncated: header says {n_frames} samples, {len(frames) // 2} present"
        )
    return pcm16_to_float(frames), rate


def read_complete_wav(path: str | os.PathLike[str]) -> tuple[FloatArray, int] | None:
    """Read a WAV another process may still be writing.

    Returns:
        ``(samples, sample_rate)`` when the file is complete, ``None`` while it is missing, empty,
        or shorter than its header promises (the writer has not finished yet).

    Raises:
        BackendProtocolError: the file is complete but not mono PCM16.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < 44:
        return None
    try:
        return parse_wav(data, what=str(path))
    except BackendProtocolError as exc:
        # A header that promises more than is on disk means "still being written": poll again.
        if "truncated" in str(exc) or "not a readable" in str(exc):
            return None
        raise


# ------------------------------------------------------------------------------------------- images


def jpeg_bytes(rgb: ImageArray, quality: int = 85) -> bytes:
    """Encode a ``uint8`` (H, W, 3) RGB frame as JPEG with Pillow."""
    from PIL import Image  # lazy: Pillow is only needed when frames are sent

    array = np.ascontiguousarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ConfigError(f"frames must be (H, W, 3) uint8 RGB, got shape {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``retries`` extra attempts after the first, each delay doubling.

    Attributes:
        retries: extra attempts after the first one (0 = try once).
        base_s: delay before the first retry.
        max_s: cap for any single delay.
    """

    retries: int = 2
    base_s: float = 0.2
    max_s: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.base_s < 0 or self.max_s < 0:
            raise ConfigError(f"retries/backoff must be >= 0, got {self}")

    def delays(self) -> Iterator[float]:
        """Yield the delay to wait before each retry (``retries`` values, bounded)."""
        delay = self.base_s
        for _ in range(self.retries):
            yield min(delay, self.max_s)
            delay *= 2.0


# ------------------------------------------------------------------------------------------ sockets


def open_websocket(url: str, open_timeout_s: float) -> Any:
    """Open a long-lived ``websockets`` sync client connection (no proxy, large frames).

    ``connect(...)`` is entered as a context manager because websockets >= 17 deprecates using its
    return value directly; ``__enter__`` returns the ``ClientConnection`` on every version.
    The caller closes it with ``conn.close()``.
    """
    from websockets.sync.client import connect  # lazy: only the socket backends need it

    return connect(
        url,
        open_timeout=open_timeout_s,
        close_timeout=1.0,
        max_size=64 * 1024 * 1024,
        proxy=None,  # a robot's proxy environment must never capture an inference server
    ).__enter__()
