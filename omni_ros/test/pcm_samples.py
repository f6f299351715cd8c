"""A test signal whose every frame says where it is (for the audio source/sink and node tests)."""

from __future__ import annotations

from typing import Any

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


def speech_chunk(
    stamp_ns: int, first_frame: int, frames: int, fmt: AudioFormat, turn_id: int = 1
) -> Any:
    """An ``omni_ros_msgs/AudioChunk`` of :func:`pcm_sequence` frames from ``first_frame``,
    stamped ``stamp_ns`` (needs the built interfaces)."""
    from omni_ros.core.clock import NS_PER_S

    from omni_ros_msgs.msg import AudioChunk

    msg = AudioChunk(
        sample_rate=fmt.sample_rate, channels=fmt.channels, encoding=fmt.encoding, turn_id=turn_id
    )
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, NS_PER_S)
    msg.data = pcm_sequence(frames, fmt, start=first_frame)
    return msg
