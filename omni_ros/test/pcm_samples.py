"""A test signal whose every frame says where it is (for the audio source/sink and node tests)."""

from __future__ import annotations

import numpy as np
from omni_ros.audio_io import AudioFormat


def pcm_sequence(n_frames: int, fmt: AudioFormat, start: int = 0) -> bytes:
    """Interleaved PCM in which frame i holds ``(start + i) % 32000`` on every channel.

    Proves that no frame is lost, duplicated or reordered between a source and a sink.
    """
    values = (np.arange(start, start + n_frames) % 32000).astype(np.int64)
    frames = np.repeat(values[:, None], fmt.channels, axis=1)
    if fmt.encoding == "S16LE":
        return frames.astype("<i2").tobytes()
    return (frames / 32768.0).astype("<f4").tobytes()
