"""Benchmark: OmniFlow's own worker cost per 1 s unit (an instant backend, no model, no ROS).

Drives :class:`omni_ros.core.flow.OmniFlow` the way the node's worker does, on a ManualClock:
every 20 ms one microphone chunk (``--mic-rate`` S16LE mono, 48 kHz by default so the mic
resampler runs; quiet noise, with the user's voice (espeak-ng where installed) in three units
of five; ``--swap-every N`` swaps chunk pairs so the reorder hold works) is pushed and
:meth:`OmniFlow.step_once` runs; a 640x480 rgb8 frame every 200 ms; the player's report of
every speech chunk a unit later. The backend answers at once and speaks two units out of every
five (24 kHz audio), so the echo canceller has a reference and the user's bursts overlap the
robot's speech (the VAD and the barge-in detector run on them; whether they decide a barge-in
is printed). What is timed is everything the flow does with one second of input: decode,
reorder, resample, echo cancelling, VAD, barge-in detection, unit assembly, the backend call's
hand-off to its helper thread, session and output events. The digest of every output event
(wall-clock compute figures left out) tells whether two versions of the flow behave the same.

Run: ``.venv/bin/python benchmarks/flow_bench.py [--units 120] [--mic-rate 48000] [--swap-every 7]``. Prints the
median / p95 / max per unit in ms and the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import platform
import shutil
import statistics
import sys
import time
from typing import Any, ClassVar

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(ROOT, "omni_ros"), os.path.join(ROOT, "omni_ros", "test")]

from omni_ros.core.clock import NS_PER_S, ManualClock  # noqa: E402
from omni_ros.core.flow import FlowConfig, OmniFlow  # noqa: E402
from omni_ros.core.types import (  # noqa: E402
    FloatArray,
    OutputEvent,
    PlaybackReport,
    RawAudio,
    RawImage,
    SpeechOut,
    StateOut,
    Unit,
    UnitResult,
)

CHUNK_NS = 20_000_000
FRAME_EVERY = 10  # chunks: 5 fps
WIDTH, HEIGHT = 640, 480


class InstantBackend:
    """Answers every unit at once: speaks units 5k+2 and 5k+3 (the second ends the turn)."""

    name: ClassVar[str] = "bench_instant"
    config_class: ClassVar[type[Any]] = dict

    def __init__(self) -> None:
        self.input_sample_rate = 16_000
        self.output_sample_rate = 24_000
        self.unit_ns = NS_PER_S
        self.first_unit_ns = NS_PER_S
        self._index = 0
        rng = np.random.default_rng(1)
        self._voice = 0.2 * np.sin(np.arange(24_000) * 0.05) + 0.02 * rng.standard_normal(24_000)
        self._voice = self._voice.astype(np.float32)

    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        self._index = 0

    def prefill(self, unit: Unit) -> None:
        self._index = unit.index

    def generate(self) -> UnitResult:
        phase = self._index % 5
        if phase in (2, 3):
            return UnitResult(is_listen=False, text="x", audio=self._voice, end_of_turn=phase == 3)
        return UnitResult(is_listen=True)

    def interrupt(self) -> None:
        pass

    def reset(self) -> None:
        self._index = 0

    def close(self) -> None:
        pass


def _fingerprint(event: OutputEvent) -> str:
    """The event without its wall-clock figures (compute time), to compare runs."""
    if isinstance(event, StateOut):
        event = dataclasses.replace(event, unit_compute_ms=0.0, real_time_factor=0.0)
    fields = dataclasses.asdict(event)
    for key, value in fields.items():
        if isinstance(value, np.ndarray):
            fields[key] = hashlib.sha256(value.tobytes()).hexdigest()
    return f"{type(event).__name__}{sorted(fields.items())}"


def _user_voice(mic_rate: int, samples: int) -> np.ndarray:
    """The user's burst: espeak-ng speech where installed (the barge-in detector's Silero VAD
    hears it as speech), else a voiced buzz (harmonics of 140 Hz, a 4 Hz syllable envelope)."""
    if shutil.which("espeak-ng"):
        from unit.core.speech_audio import speech

        voice = speech("Wait, stop, I have a question.", rate=mic_rate, voice="en+f3") * 20_000
        return np.resize(voice, samples)
    t = np.arange(samples) / mic_rate
    voiced = sum(np.sin(2 * np.pi * 140 * h * t) / h for h in range(1, 12))
    return voiced * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)) * 4000


def run(
    units: int, mic_rate: int, swap_every: int = 0, warmup: int = 5
) -> tuple[list[float], dict[str, Any]]:
    """Per-unit wall times in milliseconds (after ``warmup`` untimed units), and what came out:
    counters and a digest of every output event (equal digests: the same behaviour)."""
    rng = np.random.default_rng(0)
    per_chunk = mic_rate * CHUNK_NS // NS_PER_S
    quiet = [(rng.standard_normal(per_chunk) * 60).astype("<i2").tobytes() for _ in range(50)]
    voiced = _user_voice(mic_rate, 50 * per_chunk) + rng.standard_normal(50 * per_chunk) * 60
    loud = [voiced[i * per_chunk : (i + 1) * per_chunk].astype("<i2").tobytes() for i in range(50)]
    image = rng.integers(0, 256, WIDTH * HEIGHT * 3, dtype=np.uint8).tobytes()
    origin = 1_700_000_000 * NS_PER_S
    clock = ManualClock(origin)
    speech: list[SpeechOut] = []
    digest = hashlib.sha256()
    tally = {"events": 0, "states": 0}

    def emit(event: OutputEvent) -> None:
        digest.update(_fingerprint(event).encode())
        tally["events"] += 1
        tally["states"] += isinstance(event, StateOut)
        if isinstance(event, SpeechOut):
            speech.append(event)

    flow = OmniFlow(FlowConfig(), InstantBackend(), clock, emit)
    flow.run_until_idle(origin)
    times: list[float] = []
    for k in range(units + warmup):
        begin = time.perf_counter_ns()
        for n in range(50):
            # Chunk pairs swapped every swap_every chunks (the reorder hold puts them back).
            i = n + 1 if swap_every and n % swap_every == 0 and n < 49 else n
            i = n - 1 if swap_every and n % swap_every == 1 else i
            stamp = origin + k * NS_PER_S + i * CHUNK_NS
            # The user talks 0.4-0.9 s into three units of five (over the robot's speech in two).
            payload = loud[i] if k % 5 in (1, 2, 3) and 20 <= i < 45 else quiet[i]
            flow.push_audio(RawAudio(stamp, mic_rate, 1, "S16LE", payload, received_ns=stamp))
            if n % FRAME_EVERY == 0:
                flow.push_image(RawImage(stamp, "rgb8", image, WIDTH, HEIGHT, WIDTH * 3))
            now = clock.advance_ns(CHUNK_NS)
            while speech and speech[0].stamp_ns + NS_PER_S <= now:
                done = speech.pop(0)
                report = PlaybackReport(
                    done.stamp_ns, done.turn_id, done.stamp_ns, done.sample_rate, len(done.samples)
                )
                flow.on_playback(report)
            flow.step_once(now)
        flow.run_until_idle(clock.now_ns())
        end = time.perf_counter_ns()
        if k >= warmup:
            times.append((end - begin) / 1e6)
    flow.close()
    out: dict[str, Any] = {
        **tally,
        "barge_ins": flow.counters.barge_ins,
        "dropped_audio_samples": flow.counters.dropped_audio_samples,
        "gap_samples_filled": flow.counters.gap_samples_filled,
        "events_sha256": digest.hexdigest()[:16],
    }
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=120)
    parser.add_argument("--mic-rate", type=int, default=48_000)
    parser.add_argument("--swap-every", type=int, default=0, help="swap chunk pairs every N")
    args = parser.parse_args()
    load_before = os.getloadavg()
    times, counters = run(args.units, args.mic_rate, args.swap_every)
    load_after = os.getloadavg()
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    print(f"machine: {platform.machine()} {os.cpu_count()} cpu, python {platform.python_version()}")
    print(f"load average before {load_before[0]:.2f} after {load_after[0]:.2f} (1 min)")
    voice = "espeak-ng" if shutil.which("espeak-ng") else "a voiced buzz"
    print(
        f"units: {len(times)}  mic {args.mic_rate} Hz, 20 ms chunks (pairs swapped every "
        f"{args.swap_every or '-'}), user: {voice}, 5 fps 640x480"
    )
    print(
        f"per 1 s unit: median {statistics.median(times):.2f} ms  p95 {p95:.2f} ms  "
        f"max {times[-1]:.2f} ms"
    )
    print("counters: " + "  ".join(f"{k} {v}" for k, v in counters.items()))


if __name__ == "__main__":
    main()
