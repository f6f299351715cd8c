"""Small synthesised bag configurations for the replay tests."""

from __future__ import annotations

from omni_ros.tools.synth import SpeechCue, SynthConfig


def short_config(**kw: object) -> SynthConfig:
    """A 7 s bag with one spoken cue and small frames (fast to write and to replay)."""
    base = {
        "duration_s": 7.0,
        "cues": (SpeechCue(0.5, "Hello robot."),),
        "fps": 5.0,
        "width": 160,
        "height": 120,
    }
    base.update(kw)
    return SynthConfig(**base)  # type: ignore[arg-type]
