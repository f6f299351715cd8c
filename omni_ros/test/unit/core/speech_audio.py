"""Real speech for the VAD / AEC tests, synthesised with espeak-ng (skips the test if it is missing)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr
from omni_ros.core.types import FloatArray


@functools.lru_cache(maxsize=16)
def _espeak(text: str, voice: str, rate: int) -> bytes:
    exe = shutil.which("espeak-ng")
    if exe is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-v", voice, "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path), "rb") as wav:
            src_rate = wav.getframerate()
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    audio = pcm.astype(np.float32) / 32768.0
    out = soxr.resample(audio, src_rate, rate).astype(np.float32)
    return out.tobytes()


def speech(text: str, rate: int = 16_000, voice: str = "en", level: float = 0.5) -> FloatArray:
    """Speech for ``text`` at ``rate`` Hz, peak-normalised to ``level``."""
    audio = np.frombuffer(_espeak(text, voice, rate), dtype=np.float32).copy()
    peak = float(np.max(np.abs(audio))) or 1.0
    return (audio * (level / peak)).astype(np.float32)
