"""Simulated room for the barge-in tests and benchmark: our speech echoes, the user talks over it.

The robot's speech (espeak-ng, 24 kHz) is the far end: each sample plays at a known time (the
reference the flow gets from the speaker's playback reports). The room brings it to the 16 kHz
microphone ``delay_ms`` later, attenuated by ``echo_db``, through a direct path plus exponentially
decaying reflections (``rt60_ms``), with a mild loudspeaker soft clip and white noise at
``noise_db``; the user's speech (another espeak-ng voice, ``user_db`` relative to the echo's RMS) is
added at known times. The echo delay can jump once (``delay_jump_at_s``), as when an audio driver
changes its buffering, which makes the canceller re-align. Nothing here cancels or decides; the
scene only produces the signals and the ground truth.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import soxr
from omni_ros.core.types import FloatArray
from unit.core.speech_audio import speech

MIC_RATE = 16_000
OUT_RATE = 24_000

ROBOT_LINES = (
    "The weather today is sunny with a light breeze from the west.",
    "I will remind you about the meeting at three o clock.",
    "Please remember to water the plants before you leave the house.",
    "The kitchen timer will ring in about ten minutes, so keep an eye on the oven.",
    "Your next appointment is with the dentist on Thursday morning at nine.",
    "I found three recipes with tomatoes, basil and a little garlic.",
    "The battery is at eighty percent, which is enough for the rest of the afternoon.",
    "Traffic on the main road is heavy, so the bus may be a few minutes late.",
    "Here is a short story about a cat who learned to open the refrigerator door.",
    "Tomorrow will be colder, with rain expected from the early evening onwards.",
)
USER_LINES = (
    "Stop, robot, I need help in the kitchen.",
    "Wait, wait, listen to me.",
    "No, that is not what I asked.",
    "Hey, can you stop for a second?",
    "Excuse me, where are my keys?",
)
USER_VOICES = ("en-us", "en+f3", "en-gb+m3", "en-us+f2")


@functools.lru_cache(maxsize=64)
def robot_line(index: int) -> FloatArray:
    """Robot utterance ``index`` at ``OUT_RATE``, peak 0.6."""
    return speech(ROBOT_LINES[index % len(ROBOT_LINES)], rate=OUT_RATE, level=0.6)


@functools.lru_cache(maxsize=64)
def user_line(index: int) -> FloatArray:
    """User utterance ``index`` at ``MIC_RATE`` (peak 0.5), in one of several voices."""
    voice = USER_VOICES[index % len(USER_VOICES)]
    return speech(USER_LINES[index % len(USER_LINES)], rate=MIC_RATE, voice=voice, level=0.5)


def robot_speech(seconds: float, seed: int, gap_s: tuple[float, float] = (0.3, 1.5)) -> FloatArray:
    """About ``seconds`` of robot speech at ``OUT_RATE``: utterances with pauses between them."""
    rng = np.random.default_rng(seed)
    parts: list[FloatArray] = []
    total = 0
    while total < seconds * OUT_RATE:
        line = robot_line(int(rng.integers(0, len(ROBOT_LINES))))
        gap = np.zeros(int(rng.uniform(*gap_s) * OUT_RATE), np.float32)
        parts += [line, gap]
        total += len(line) + len(gap)
    return np.concatenate(parts).astype(np.float32)


@dataclass(frozen=True)
class Room:
    """One echo path."""

    delay_ms: int = 120
    echo_db: float = -6.0  # echo RMS relative to the reference's RMS (direct + reflections)
    rt60_ms: float = 150.0
    noise_db: float = -60.0  # white noise RMS, dBFS
    delay_jump_at_s: float | None = None  # the delay changes to ``jump_to_ms`` at this time
    jump_to_ms: int = 0
    # The room's reflections change at this time (the robot moved; the direct path, fixed on its
    # body, stays): a second set of reflections fades in over ``reflections_fade_s``.
    reflections_change_at_s: float | None = None
    reflections_fade_s: float = 0.0


def room_response(room: Room, rng: np.random.Generator) -> FloatArray:
    """Direct path + decaying reflections, total energy gain ``echo_db``, at ``MIC_RATE``."""
    taps = max(1, int(room.rt60_ms / 1000 * MIC_RATE))
    tau = room.rt60_ms / 1000 * MIC_RATE / 6.9  # amplitude e-folding for 60 dB over rt60
    ir = rng.normal(0, 0.3, taps) * np.exp(-np.arange(taps) / tau)
    ir[0] = 1.0
    ir *= 10 ** (room.echo_db / 20) / np.sqrt(np.sum(ir**2))
    return ir.astype(np.float32)


def echo_of(far: FloatArray, room: Room, seed: int, length: int) -> FloatArray:
    """What the microphone hears of ``far`` (first sample plays at mic sample 0), ``length`` long."""
    rng = np.random.default_rng(seed)
    far16 = soxr.resample(far, OUT_RATE, MIC_RATE).astype(np.float32)
    played = np.tanh(1.2 * far16) / 1.2  # a small loudspeaker's soft saturation
    wet = np.convolve(played, room_response(room, rng))
    if room.reflections_change_at_s is not None:
        # Drawn after the first room, so a scene without the change is the same as before.
        moved = np.convolve(played, room_response(room, rng))
        ramp = (np.arange(len(wet)) - room.reflections_change_at_s * MIC_RATE) / max(
            1.0, room.reflections_fade_s * MIC_RATE
        )
        mix = np.clip(ramp, 0.0, 1.0)
        wet = (1.0 - mix) * wet + mix * moved

    def delayed(delay_ms: int) -> FloatArray:
        out = np.zeros(length, np.float32)
        d = delay_ms * MIC_RATE // 1000
        seg = wet[: max(0, length - d)]
        out[d : d + len(seg)] = seg
        return out

    out = delayed(room.delay_ms)
    if room.delay_jump_at_s is not None:
        cut = int(room.delay_jump_at_s * MIC_RATE)
        out[cut:] = delayed(room.jump_to_ms)[cut:]
    return out


def noise(length: int, room: Room, seed: int) -> FloatArray:
    rng = np.random.default_rng(seed + 1000)
    return (rng.normal(0, 10 ** (room.noise_db / 20), length)).astype(np.float32)


def rms(x: FloatArray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2))) if len(x) else 0.0


def voiced_start(x: FloatArray) -> int:
    """First sample of ``x`` inside a 10 ms window above -40 dB of its peak RMS (speech onset)."""
    win = MIC_RATE // 100
    n = len(x) // win
    e = np.sqrt(np.mean(x[: n * win].astype(np.float64).reshape(n, win) ** 2, axis=1))
    above = np.flatnonzero(e > 0.01 * e.max())
    return int(above[0]) * win if len(above) else 0


def later_turn(room: Room, seed: int, lead_s: float = 3.0) -> tuple[FloatArray, FloatArray, int]:
    """``lead_s`` of our speech, 1 s of silence, then 6 s of a later turn; returns the reference,
    the echoed mic (noise included) and the mic sample where the later turn starts."""
    lead = robot_speech(lead_s, seed=seed + 5000)[: int(lead_s * OUT_RATE)]
    lead = np.concatenate([lead, np.zeros(OUT_RATE, dtype=np.float32)])
    far = np.concatenate([lead, robot_speech(6, seed=seed)]).astype(np.float32)
    n = len(far) * MIC_RATE // OUT_RATE + MIC_RATE
    mic = echo_of(far, room, seed=seed, length=n) + noise(n, room, seed)
    return far, mic.astype(np.float32), len(lead) * MIC_RATE // OUT_RATE


def echo_scene(
    room: Room, seconds: float, seed: int, room_seed: int | None = None
) -> tuple[FloatArray, FloatArray]:
    """About ``seconds`` of our speech (drawn from ``seed``) and the mic that hears it through
    ``room``, whose reflections are drawn from ``room_seed`` (default ``seed``), noise included."""
    far = robot_speech(seconds, seed=seed)
    n = len(far) * MIC_RATE // OUT_RATE + MIC_RATE
    ir_seed = seed if room_seed is None else room_seed
    mic = echo_of(far, room, seed=ir_seed, length=n) + noise(n, room, seed)
    return far, mic.astype(np.float32)


def with_user(
    room: Room, far: FloatArray, mic: FloatArray, at: int, k: int, room_seed: int
) -> tuple[FloatArray, int, int]:
    """User line ``k`` as loud as our echo (0 dB SER) added from mic sample ``at``; returns the
    mic and the samples where the user's voice starts and ends (-40 dB of its peak)."""
    echo = echo_of(far, room, seed=room_seed, length=len(mic))
    level = rms(echo[np.abs(echo) > 0.03 * np.abs(echo).max()])
    user = user_line(k)
    user = user * (level / rms(user[np.abs(user) > 0.03 * np.abs(user).max()]))
    out = mic.copy()
    m = min(len(user), len(out) - at)
    out[at : at + m] += user[:m]
    voiced_end = len(user) - voiced_start(user[::-1].copy())
    return out, at + voiced_start(user), at + min(m, voiced_end)


def first_decision_after(runs: list[tuple[int, int]], onset_ns: int) -> int | None:
    """Nanoseconds from ``onset_ns`` to the first barge-in decided after it (runs are
    ``(run start, decided at)``), None if none; a run that began well before it is an error."""
    assert [s for s, _ in runs if s < onset_ns - 100_000_000] == [], "a barge-in before the user"
    later = [decided for _start, decided in runs if decided >= onset_ns]
    return later[0] - onset_ns if later else None
