"""The conversation benchmark's backend: the ``reference`` model, told by the benchmark when to speak.

Random weights cannot decide *when* to talk (see ``config/demo.yaml``, which fixes the pattern with
``speak_schedule``), so the benchmark fixes it too, but in time rather than by unit count: it writes
a plan file of turns (``{"turns": [[first_unit_start_ns, units], ...]}``) and this backend speaks in
exactly those units, ending the turn in the last one. Everything else is the real reference model
(SigLIP + Whisper encoders, the Qwen3 LLM, speech head and vocoder run every unit).

Three things are added on top, all for measurement:

- ``voice: espeak`` (the default) replaces the audio of every speaking unit with the next second
  of an espeak-ng voice track (robot lines, half of espeak-ng's full scale, like the user's
  utterances); a turn's first unit starts at the next line's first syllable. The reference
  model's vocoder has random weights: its "speech" is a hiss at about -48 dBFS RMS with most
  of its energy above 3.4 kHz, so through the rooms (gain 0.4, a -55 dBFS noise floor) the
  echo lay at the noise floor. Measured: the delay estimator accepted
  no estimate in a 6-unit turn through the nodes (7 refused for lack of echo coherence), so the
  benchmark never exercised the echo canceller or the detector against real echo.
  ``voice: model`` keeps the vocoder's output (the figures before 2026-12-03);

- every unit appends one JSON line to ``timing_path``: the unit's span on the ROS clock, the wall
  time ``prefill`` started and ``generate`` returned (the node runs on the wall clock), whether it
  spoke and the compute it was stretched to;
- ``delay_min_ms``/``delay_max_ms`` stretch each unit's prefill + generate to a uniformly drawn
  total (the "slow backend": a real 9B model takes 400-800 ms a unit on a fast GPU).

After ``interrupt()`` (barge-in) the rest of the interrupted turn listens, as a real duplex model
that hears the user does; the plan's next turn speaks again.

Registered into ``BACKENDS`` as ``bench_planned`` by ``_flow_runner.py``; never by the package.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
from omni_ros.backends.reference import ReferenceBackend, ReferenceConfig
from omni_ros.core.errors import ConfigError
from omni_ros.core.types import FloatArray, Unit, UnitResult


@dataclass(frozen=True)
class PlannedConfig:
    """Settings of :class:`PlannedBackend` (the node checks parameter names against these fields);
    ``size``, ``seed`` and ``num_threads`` are the reference backend's own."""

    plan_path: str = ""
    timing_path: str = ""
    delay_min_ms: float = 0.0
    delay_max_ms: float = 0.0
    delay_seed: int = 0
    size: str = "tiny"
    seed: int = 7
    num_threads: int = 1
    voice: str = "espeak"

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> PlannedConfig:
        config = cls(**dict(mapping or {}))
        if not config.plan_path or not config.timing_path:
            raise ConfigError("bench_planned needs plan_path and timing_path")
        if not 0 <= config.delay_min_ms <= config.delay_max_ms:
            raise ConfigError("bench_planned needs 0 <= delay_min_ms <= delay_max_ms")
        if config.voice not in ("espeak", "model"):
            raise ConfigError(f"bench_planned.voice = {config.voice!r}; use espeak or model")
        return config


ROBOT_LINES = (
    "The weather today is sunny with a light breeze from the west.",
    "I will remind you about the meeting at three o clock.",
    "Please remember to water the plants before you leave the house.",
    "Your next appointment is with the dentist on Thursday morning at nine.",
    "The battery is at eighty percent, which is enough for the rest of the afternoon.",
)


def voice_track(rate: int) -> tuple[FloatArray, list[int]]:
    """The robot's voice for ``voice: espeak``: the lines with 0.3 s pauses, at ``rate``, and
    where each line's speech begins (its first sample over -40 dBFS; espeak-ng's own leading
    silence is digital zero)."""
    from omni_ros.tools.synth import speak

    parts: list[FloatArray] = []
    onsets: list[int] = []
    at = 0
    for line in ROBOT_LINES:
        x = speak(line, rate) * 0.5
        loud = np.flatnonzero(np.abs(x) > 0.01)
        onsets.append(at + (int(loud[0]) if len(loud) else 0))
        parts += [x, np.zeros(int(0.3 * rate), np.float32)]
        at += len(x) + int(0.3 * rate)
    return np.concatenate(parts).astype(np.float32), onsets


class PlannedBackend:
    """The reference backend speaking on the benchmark's plan (see the module docstring)."""

    name: ClassVar[str] = "bench_planned"
    config_class: ClassVar[type[PlannedConfig]] = PlannedConfig

    def __init__(self, config: PlannedConfig) -> None:
        ref = {
            "size": config.size,
            "seed": config.seed,
            "num_threads": config.num_threads,
            "speak_schedule": "S",
        }
        self.config = config
        self.inner = ReferenceBackend(ReferenceConfig.from_mapping(ref))
        self.input_sample_rate = self.inner.input_sample_rate
        self.output_sample_rate = self.inner.output_sample_rate
        self.unit_ns = self.inner.unit_ns
        self.first_unit_ns = self.inner.first_unit_ns
        self._rng = random.Random(config.delay_seed)
        self._plan: list[tuple[int, int]] = []
        self._plan_mtime = 0.0
        self._unit: Unit | None = None
        self._prefill_ns = 0
        self._cut_turn: int | None = None  # start of the turn an interrupt() cut
        self._current_turn: int | None = None
        self._lock = threading.Lock()
        self._timing = open(config.timing_path, "a", encoding="utf-8")  # noqa: SIM115
        self._voice, self._line_onsets = (
            voice_track(self.output_sample_rate) if config.voice == "espeak" else (None, [])
        )
        self._voice_at = 0

    @property
    def model(self) -> Any:
        return self.inner.model  # loads the weights at configure, like the reference backend

    def _read_plan(self) -> None:
        try:
            mtime = os.stat(self.config.plan_path).st_mtime
        except FileNotFoundError:
            return
        if mtime != self._plan_mtime:
            with open(self.config.plan_path, encoding="utf-8") as f:
                self._plan = [(int(a), int(b)) for a, b in json.load(f)["turns"]]
            self._plan_mtime = mtime

    def _turn_of(self, unit: Unit) -> tuple[int, int, int] | None:
        """(turn start, position in the turn, units in the turn) of ``unit``, if planned."""
        tolerance = self.unit_ns // 4
        for start, units in self._plan:
            position = round((unit.start_ns - start) / self.unit_ns)
            if 0 <= position < units and abs(unit.start_ns - start - position * self.unit_ns) < (
                tolerance
            ):
                return start, position, units
        return None

    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        self.inner.prepare(system_prompt, ref_voice)

    def prefill(self, unit: Unit) -> None:
        self._prefill_ns = time.time_ns()
        self.inner.prefill(unit)
        self._unit = unit

    def generate(self) -> UnitResult:
        unit = self._unit
        self._read_plan()
        turn = self._turn_of(unit) if unit is not None else None
        with self._lock:
            self._current_turn = turn[0] if turn else None
            cut = turn is not None and self._cut_turn == turn[0]
        if turn is None or cut:
            self.inner.interrupt()  # the reference model's own forced listen
        result = self.inner.generate()
        if turn is not None and not result.is_listen and turn[1] == turn[2] - 1:
            result = replace(result, end_of_turn=True)
        if self._voice is not None and result.audio is not None and len(result.audio):
            if turn is not None and turn[1] == 0:
                # A turn starts with speech, at the next line's first syllable (a turn that
                # began in a pause between lines had no echo in its first 0.3-0.5 s, and its
                # early barge-in trials measured nothing).
                later = [o for o in self._line_onsets if o >= self._voice_at]
                self._voice_at = later[0] if later else self._line_onsets[0]
            n = len(result.audio)
            idx = (self._voice_at + np.arange(n)) % len(self._voice)
            self._voice_at = (self._voice_at + n) % len(self._voice)
            result = replace(result, audio=self._voice[idx].copy())
        target_ms = self._rng.uniform(self.config.delay_min_ms, self.config.delay_max_ms)
        if target_ms > 0:
            remaining = self._prefill_ns + int(target_ms * 1e6) - time.time_ns()
            if remaining > 0:
                time.sleep(remaining / 1e9)
        if unit is not None:
            self._timing.write(
                json.dumps(
                    {
                        "index": unit.index,
                        "start_ns": unit.start_ns,
                        "end_ns": unit.end_ns,
                        "prefill_ns": self._prefill_ns,
                        "generated_ns": time.time_ns(),
                        "spoke": not result.is_listen,
                        "target_ms": round(target_ms, 1),
                    }
                )
                + "\n"
            )
            self._timing.flush()
        return result

    def interrupt(self) -> None:
        with self._lock:
            self._cut_turn = self._current_turn
        self.inner.interrupt()

    def reset(self) -> None:
        self.inner.reset()

    def close(self) -> None:
        self.inner.close()
        self._timing.close()
