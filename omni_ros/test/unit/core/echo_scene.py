"""A synthetic echo path for the echo-cancellation tests and benchmark.

The robot publishes 24 kHz speech (espeak-ng) stamped with its scheduled play time; the "room" plays it
``delay_ms`` later through a decaying random FIR (direct path + 60 ms of reflections) at -6 dB, and the
16 kHz microphone records that echo, the user's own speech on top for part of the time, and a little
noise. Nothing here is cancelled: the scene only produces signals and the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr
from omni_ros.core.types import FloatArray
from unit.core.speech_audio import speech

MIC_RATE = 16_000
OUT_RATE = 24_000
T0_NS = 1_000_000_000

ROBOT_TEXT = (
    "The weather today is sunny with a light breeze from the west. I will remind you about the "
    "meeting at three o clock. Please remember to water the plants."
)
USER_TEXT = "Stop, robot, I need help in the kitchen"


@dataclass(frozen=True)
class EchoScene:
    """Signals and ground truth of one synthetic scene (sample indices are at ``MIC_RATE``)."""

    far: FloatArray  # published speech at OUT_RATE, first sample scheduled at T0_NS
    mic: FloatArray  # what the microphone records, first sample captured at T0_NS
    echo_end: int  # last mic sample that can contain echo
    user_start: int
    user_end: int
    delay_ms: int


def room_response(rng: np.random.Generator) -> FloatArray:
    """Direct path + 60 ms of exponentially decaying reflections, total gain -6 dB, at MIC_RATE."""
    taps = int(0.06 * MIC_RATE)
    room = rng.normal(0, 1, taps) * np.exp(-np.arange(taps) / (0.012 * MIC_RATE))
    room[0] = 1.0
    room *= 0.5 / np.sqrt(np.sum(room**2))
    return room.astype(np.float32)


def make_scene(delay_ms: int, seed: int = 0, user_at: float = 0.6) -> EchoScene:
    """Build a scene with the user talking from ``user_at`` (fraction of the robot's speech) on."""
    rng = np.random.default_rng(seed)
    far = np.concatenate([speech(ROBOT_TEXT, rate=OUT_RATE, level=0.6)] * 2)
    far16 = soxr.resample(far, OUT_RATE, MIC_RATE)
    room = room_response(rng)
    echo = np.convolve(far16, room)[: len(far16)]
    d = delay_ms * MIC_RATE // 1000
    n = len(far16) + d + MIC_RATE
    mic = np.zeros(n)
    mic[d : d + len(echo)] += echo
    user = speech(USER_TEXT, voice="en-us", level=0.3)
    start = int(len(far16) * user_at)
    mic[start : start + len(user)] += user
    mic += rng.normal(0, 0.001, n)
    return EchoScene(
        far=far.astype(np.float32),
        mic=mic.astype(np.float32),
        echo_end=d + len(echo),
        user_start=start,
        user_end=start + len(user),
        delay_ms=delay_ms,
    )


def stamp(sample_index: int) -> int:
    """Capture stamp of mic sample ``sample_index``."""
    return T0_NS + round(sample_index * 1e9 / MIC_RATE)


def erle_db(raw: FloatArray, cleaned: FloatArray) -> float:
    """Echo return loss enhancement: energy before over energy after cancellation, in dB."""
    return float(
        10
        * np.log10(
            np.sum(raw.astype(np.float64) ** 2)
            / max(float(np.sum(cleaned.astype(np.float64) ** 2)), 1e-20)
        )
    )
