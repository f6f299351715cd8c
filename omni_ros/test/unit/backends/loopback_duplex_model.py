"""``DuplexModelDouble``: a test double of MiniCPM-o's per-unit listen/speak decision.

Used by the loopback servers (``loopback_llama_server``, ``loopback_vllm_server``), which stand in for
llama.cpp-omni and vllm-omni. It has no weights and says so: its "speech" is a sine tone whose
frequency names the turn, its "text" names the turn and unit. Its policy is simple and
input-dependent, so the tests can check that the audio the client sent really reached the server:

- a scripted decision list is consumed first (``"listen"``, ``"speak"``, ``"speak_end"``);
- then: a unit whose RMS exceeds ``speak_threshold_rms`` starts a turn of ``turn_units`` speaking
  units (the last one ends the turn); quiet units are listened to;
- ``force_listen()`` (barge-in) ends the current turn at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from omni_ros.core.types import FloatArray

OUTPUT_RATE = 24_000


@dataclass(frozen=True)
class Decision:
    """One unit's outcome."""

    speak: bool
    text: str = ""
    audio: FloatArray | None = None
    end_of_turn: bool = False
    turn: int = -1


def tone(turn: int, n_samples: int = OUTPUT_RATE) -> FloatArray:
    """The double's speech for ``turn``: a 0.25-amplitude sine at ``300 + 50 * turn`` Hz."""
    t = np.arange(n_samples, dtype=np.float64) / OUTPUT_RATE
    return (0.25 * np.sin(2 * np.pi * (300 + 50 * turn) * t)).astype(np.float32)


@dataclass
class DuplexModelDouble:
    """Stateful listen/speak policy (see the module docstring)."""

    speak_threshold_rms: float = 0.05
    turn_units: int = 2
    script: list[str] = field(default_factory=list)
    speech_samples: int = OUTPUT_RATE
    turns_started: int = 0
    units_seen: int = 0
    _remaining: int = 0
    _unit_in_turn: int = 0

    def step(self, audio: FloatArray) -> Decision:
        """Decide for one unit of 16 kHz input ``audio``."""
        self.units_seen += 1
        if self.script:
            choice = self.script.pop(0)
            if choice == "listen":
                return Decision(speak=False)
            if choice not in ("speak", "speak_end"):
                raise ValueError(f"unknown scripted decision {choice!r}")
            if self._remaining == 0 and self._unit_in_turn == 0:
                self.turns_started += 1
            return self._speak(end=choice == "speak_end")
        if self._remaining > 0:
            self._remaining -= 1
            return self._speak(end=self._remaining == 0)
        rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) if len(audio) else 0.0
        if rms > self.speak_threshold_rms:
            self.turns_started += 1
            self._remaining = self.turn_units - 1
            return self._speak(end=self._remaining == 0)
        return Decision(speak=False)

    def force_listen(self) -> None:
        """Barge-in: stop the current turn."""
        self._remaining = 0
        self._unit_in_turn = 0

    def _speak(self, end: bool) -> Decision:
        turn = self.turns_started
        unit = self._unit_in_turn
        self._unit_in_turn = 0 if end else unit + 1
        if end:
            self._remaining = 0
        return Decision(
            speak=True,
            text=f"turn{turn}.unit{unit} ",
            audio=tone(turn, self.speech_samples),
            end_of_turn=end,
            turn=turn,
        )
