"""Chunking invariance end to end through OmniFlow, with the echo canceller on as in production.

However a driver cuts the same microphone stream into messages, the backend must see the same
units and the outputs must be the same: the reorder hold, the resampler, the echo canceller, the
VAD and the barge-in detector all keep their own state across chunk boundaries. The clock steps
every 20 ms in every run and the same samples have arrived at every step; what differs is how they
are cut into ``RawAudio`` messages (down to single samples). The robot's published speech is
played back into the microphone through a room (80 ms, FIR), and the user talks over it, so the
canceller, the double-talk detector and a barge-in flush are all exercised.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import soxr
from omni_ros.core.clock import ManualClock
from omni_ros.core.flow import FlowConfig, OmniFlow
from omni_ros.core.types import OutputEvent, RawAudio, SpeechFlush, SpeechOut, StateOut, UnitResult
from unit.core.echo_scene import ROBOT_TEXT, room_response
from unit.core.scripted_backend import ScriptedBackendDouble
from unit.core.speech_audio import speech

S = 1_000_000_000
T0 = 100 * S
RATE = 16_000
STEP = 320  # the clock moves every 20 ms


def _cuts(*lengths: int) -> Callable[[int], int]:
    """Cut every 20 ms step into ``lengths`` (summing to 320): the next chunk's length at ``i``."""
    assert sum(lengths) == STEP
    ends = np.cumsum(lengths)

    def length(i: int) -> int:
        offset = i % STEP
        return int(ends[np.searchsorted(ends, offset, side="right")] - offset)

    return length


#: How each run cuts the stream. Every cut refines the 20 ms grid the clock steps on, so the same
#: samples have arrived at every step; a coarser driver (100 ms chunks) legitimately changes when
#: a unit can close and when the user is heard, hence the speech schedule, and is not compared.
CHUNKINGS: dict[str, Callable[[int], int]] = {
    "20ms": _cuts(320),
    "10ms": _cuts(160, 160),
    "5ms": _cuts(80, 80, 80, 80),
    "irregular": _cuts(37, 1, 200, 82),
    "odd": _cuts(1, 318, 1),
}


def _run(
    chunk_len: Callable[[int], int], config: dict[str, object] | None = None
) -> tuple[list[np.ndarray], list[OutputEvent], int]:
    robot = np.concatenate([speech(ROBOT_TEXT, rate=24_000, level=0.6)] * 2)
    n_units = len(robot) // 24_000
    backend = ScriptedBackendDouble(
        [UnitResult(False, "w", robot[k * 24_000 : (k + 1) * 24_000]) for k in range(n_units)]
    )
    clock = ManualClock(T0)
    events: list[OutputEvent] = []
    # Production defaults: the echo canceller and the barge-in detector are on.
    flow = OmniFlow(FlowConfig.from_mapping(config or {}), backend, clock, events.append)
    total = (n_units + 2) * RATE
    mic = np.random.default_rng(5).normal(0, 0.001, total + 2 * RATE).astype(np.float32)
    user = speech("Excuse me, robot, stop talking please.", voice="en-us", level=0.3)
    mic[7 * RATE : 7 * RATE + len(user)] += user
    room = room_response(np.random.default_rng(6))
    pushed = echoed = 0
    for end in range(STEP, total + 1, STEP):
        while pushed < end:  # every chunk that ends by now has arrived
            n = min(chunk_len(pushed), end - pushed)
            pcm = (np.clip(mic[pushed : pushed + n], -1, 1) * 32767).astype("<i2")
            flow.push_audio(
                RawAudio(T0 + round(pushed * S / RATE), RATE, 1, "S16LE", pcm.tobytes())
            )
            pushed += n
        clock.set_ns(T0 + round(end * S / RATE))
        flow.run_until_idle(clock.now_ns())
        for out in [e for e in events if isinstance(e, SpeechOut)][echoed:]:
            played = soxr.resample(out.samples, 24_000, RATE)
            at = round((out.stamp_ns - T0) * RATE / S) + RATE * 80 // 1000
            echo = np.convolve(played, room)[: max(0, len(mic) - at)]
            assert at >= pushed, "speech scheduled into the past of the mic stream"
            mic[at : at + len(echo)] += echo
            echoed += 1
    units = [np.asarray(u.audio) for u in backend.units]
    backend.close()
    return units, events, backend.interrupts


def _summary(events: list[OutputEvent]) -> list[tuple[object, ...]]:
    """The outputs, minus what legitimately depends on wall time (compute figures)."""
    out: list[tuple[object, ...]] = []
    for e in events:
        if isinstance(e, StateOut):
            out.append(("state", e.stamp_ns, e.mode, e.unit_index, e.turn_id, e.user_speaking))
        elif isinstance(e, SpeechOut):
            out.append(("speech", e.stamp_ns, len(e.samples)))
        elif isinstance(e, SpeechFlush):
            out.append(("flush", e.stamp_ns, e.reason, e.turn_id, e.dropped_from_ns))
        else:
            out.append((type(e).__name__, getattr(e, "stamp_ns", None)))
    return out


@pytest.fixture(scope="module")
def baseline() -> tuple[list[np.ndarray], list[OutputEvent], int]:
    return _run(CHUNKINGS["20ms"])


@pytest.mark.parametrize("name", [n for n in CHUNKINGS if n != "20ms"])
def test_the_same_stream_cut_differently_gives_the_same_units_and_outputs(
    name: str, baseline: tuple[list[np.ndarray], list[OutputEvent], int]
) -> None:
    units, events, interrupts = _run(CHUNKINGS[name])
    base_units, base_events, base_interrupts = baseline
    # The scene is not trivial: the robot spoke, the user barged in, the canceller worked.
    assert any(isinstance(e, SpeechFlush) and e.reason == "barge_in" for e in base_events)
    assert base_interrupts >= 1
    assert len(units) == len(base_units) > 5
    for k, (a, b) in enumerate(zip(units, base_units, strict=True)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=f"unit {k} differs")
    assert _summary(events) == _summary(base_events)
    assert interrupts == base_interrupts
