"""Tests for the remembered echo path (omni_ros.core.echo_path): file, recorder, warm start.

Latency figures live in benchmarks/aec_bench.py (phases ``warm`` and ``moved``); these tests check
behaviour with generous bounds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omni_ros.core.aec import AecConfig, EchoCanceller
from omni_ros.core.bargein import BargeInDetector
from omni_ros.core.echo_path import (
    EchoPath,
    EchoPathRecorder,
    load_echo_path,
    save_echo_path,
    warm_up,
)
from omni_ros.core.errors import ConfigError
from omni_ros.core.types import AudioBlock, FloatArray
from omni_ros.core.vad import VadConfig
from unit.core import duplex_scene as room_sim

S = 1_000_000_000
T0 = 100 * S
RATE = room_sim.MIC_RATE
OUT = room_sim.OUT_RATE


def _stamp(i: int) -> int:
    return T0 + round(i * S / RATE)


def _run(
    far: FloatArray,
    mic: FloatArray,
    warm: EchoPath | None = None,
    recorder: EchoPathRecorder | None = None,
) -> tuple[list[tuple[int, int]], EchoCanceller]:
    """Canceller + detector over a scene (warmed by ``warm``); (run start, decided at) per run."""
    aec = AecConfig()
    canceller = EchoCanceller(aec)
    detector = BargeInDetector(aec, VadConfig())
    if warm is not None:
        warm_up(warm, T0, canceller, detector, aec.echo_path_passes)
    canceller.push_reference(T0, far, OUT)
    runs: list[tuple[int, int]] = []
    active = False
    for i in range(0, len(mic), 320):
        cleaned = canceller.process(AudioBlock(_stamp(i), RATE, mic[i : i + 320]))
        detector.process(cleaned, canceller.last_mic, canceller)
        if recorder is not None:
            recorder.add(canceller, cleaned, detector.last_verdicts)
        run = detector.active_run()
        if run is not None and not active:
            runs.append((run[0], cleaned.stamp_ns + cleaned.duration_ns))
        active = run is not None
    return runs, canceller


def _remember(room: room_sim.Room, room_seed: int) -> EchoPath:
    """The last run: 8 s of other speech in the room, nobody else talking."""
    far, mic = _scene(room, 8, seed=room_seed + 2000, room_seed=room_seed)
    recorder = EchoPathRecorder(AecConfig())
    runs, canceller = _run(far, mic, recorder=recorder)
    assert runs == []
    path = recorder.snapshot(canceller)
    assert path is not None
    return path


def _with_user(
    room: room_sim.Room, far: FloatArray, mic: FloatArray, at: int, k: int, room_seed: int
) -> tuple[FloatArray, int, int]:
    """The user as loud as our echo from ``at``: the mic, voiced onset and end stamps."""
    out, onset, end = room_sim.with_user(room, far, mic, at, k, room_seed)
    return out, _stamp(onset), _stamp(end)


_latency = room_sim.first_decision_after
_scene = room_sim.echo_scene


# ----------------------------------------------------------------------------------- warm start
def test_a_remembered_echo_path_hears_the_user_a_third_of_a_second_into_the_first_turn() -> None:
    # A cold start cannot tell the user's voice from an echo path it has not heard yet: the
    # user 0.3 s into the robot's first turn is decided after seconds (aec_bench `start`). The
    # same room remembered from the last run: the filter and the residual ratio are known.
    room = room_sim.Room(delay_ms=120)
    far, base = _scene(room, 6, seed=121, room_seed=121)
    mic, onset, _ = _with_user(room, far, base, int(0.3 * RATE), 0, 121)
    cold, _ = _run(far, mic)
    late = _latency(cold, onset)
    assert late is None or late > 500_000_000, "the scene no longer needs the warm start"
    warm, canceller = _run(far, mic, warm=_remember(room, 121))
    latency = _latency(warm, onset)
    assert latency is not None
    assert latency <= 500_000_000, latency
    assert canceller.delay_ns == 120_000_000


@pytest.mark.parametrize("delay_ms", [40, 300])
def test_a_warm_start_in_the_same_room_makes_no_false_barge_in(delay_ms: int) -> None:
    room = room_sim.Room(delay_ms=delay_ms)
    for seed in (delay_ms + 7, delay_ms + 8):
        far, mic = _scene(room, 4, seed=seed, room_seed=seed)
        runs, _ = _run(far, mic, warm=_remember(room, seed))
        assert runs == [], (seed, runs)


def test_warm_up_refuses_a_canceller_that_heard_audio_already() -> None:
    room = room_sim.Room(delay_ms=120)
    path = _remember(room, 5)
    canceller = EchoCanceller(AecConfig())
    canceller.process(AudioBlock(T0, RATE, np.zeros(640, np.float32)))
    with pytest.raises(ConfigError, match="heard audio already"):
        warm_up(path, T0 + S, canceller, None)


# ------------------------------------------------------------------------------------- recorder
def test_the_recorder_keeps_echo_only_audio_not_the_user() -> None:
    # The user talks over our speech from 5 s: the remembered stretch lies before or after them.
    room = room_sim.Room(delay_ms=120)
    far, base = _scene(room, 8, seed=31, room_seed=31)
    mic, onset, end = _with_user(room, far, base, 5 * RATE, 1, 31)
    recorder = EchoPathRecorder(AecConfig())
    runs, canceller = _run(far, mic, recorder=recorder)
    assert runs, "the user was not heard"
    path = recorder.snapshot(canceller)
    assert path is not None
    # The stretch holds what the detector judged echo only: a user's last word fading out under
    # our echo (-40 dB of its peak is the voiced end here) may be in it (measured: 70 ms).
    start_ns = path.end_ns - round(path.seconds * S)
    assert path.end_ns <= onset + 100_000_000 or start_ns >= end - 150_000_000, (
        start_ns,
        path.end_ns,
    )
    assert path.seconds >= 1.0
    assert path.delay_ns == 120_000_000


def test_a_robot_that_fell_silent_keeps_the_stretch_it_spoke_in() -> None:
    room = room_sim.Room(delay_ms=40)
    far, mic = _scene(room, 6, seed=41, room_seed=41)
    mic = np.concatenate([mic, room_sim.noise(10 * RATE, room, 3)])  # 10 s of silence after
    recorder = EchoPathRecorder(AecConfig())
    _run(far, mic, recorder=recorder)
    canceller = EchoCanceller(AecConfig())
    assert recorder.snapshot(canceller) is not None
    path = recorder.snapshot(canceller)
    assert path is not None
    played = path.ref[path.lead :].astype(np.float64)
    assert np.sqrt(np.mean(played**2)) > 300  # speech, not the silence after it


# ----------------------------------------------------------------------------------------- file
def _path() -> EchoPath:
    cfg = AecConfig()
    rng = np.random.default_rng(0)
    lead = cfg.sample_rate * (cfg.max_delay_ms + cfg.echo_tail_ms + 100) // 1000
    return EchoPath(
        sample_rate=cfg.sample_rate,
        frame_ms=cfg.frame_ms,
        filter_ms=cfg.filter_ms,
        delay_ns=120_000_000,
        align_ns=110_000_000,
        mic=rng.integers(-3000, 3000, 2 * RATE).astype(np.int16),
        ref=rng.integers(-3000, 3000, 2 * RATE + lead).astype(np.int16),
    )


def test_an_echo_path_file_reads_back_what_was_written(tmp_path: Path) -> None:
    path = _path()
    file = tmp_path / "sub" / "echo_path.npz"
    save_echo_path(path, file)
    back = load_echo_path(file, AecConfig())
    assert (back.delay_ns, back.align_ns) == (path.delay_ns, path.align_ns)
    assert np.array_equal(back.mic, path.mic)
    assert np.array_equal(back.ref, path.ref)
    assert [p.name for p in file.parent.iterdir()] == ["echo_path.npz"]  # no temporary left


def test_a_missing_echo_path_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_echo_path(tmp_path / "none.npz", AecConfig())


def _write(file: Path, **changes: object) -> None:
    path = _path()
    fields = {
        "version": np.int64(1),
        "sample_rate": np.int64(path.sample_rate),
        "frame_ms": np.int64(path.frame_ms),
        "filter_ms": np.int64(path.filter_ms),
        "delay_ns": np.int64(path.delay_ns),
        "align_ns": np.int64(path.align_ns),
        "mic": path.mic,
        "ref": path.ref,
    }
    fields.update(changes)
    np.savez(file, **{k: v for k, v in fields.items() if v is not None})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"filter_ms": np.int64(100)}, "recorded with aec.filter_ms = 100, now 200"),
        ({"version": np.int64(9)}, "version 9"),
        ({"ref": None}, r"missing \['ref'\]"),
        ({"mic": np.zeros(2 * RATE, np.float32)}, "mic must be 1-D int16"),
        ({"mic": np.zeros(2 * RATE + 7, np.int16)}, "whole 20 ms frames"),
        ({"ref": np.zeros(100, np.int16)}, "reference samples"),
        ({"delay_ns": np.int64(-5)}, "outside 0..aec.max_delay_ms"),
        ({"delay_ns": np.array([1, 2])}, "delay_ns must be an integer scalar"),
        ({"mic": np.array([object()], dtype=object)}, "not readable"),
    ],
)
def test_an_echo_path_file_that_does_not_fit_is_refused_with_the_reason(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    file = tmp_path / "echo_path.npz"
    _write(file, **changes)
    with pytest.raises(ConfigError, match=message):
        load_echo_path(file, AecConfig())


def test_a_file_that_is_not_an_npz_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "echo_path.npz"
    file.write_bytes(b"not a numpy file at all")
    with pytest.raises(ConfigError, match="not readable"):
        load_echo_path(file, AecConfig())


def test_echo_path_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="echo_path_seconds"):
        AecConfig(echo_path_seconds=0.5)
    with pytest.raises(ConfigError, match="echo_path_passes"):
        AecConfig(echo_path_passes=0)


# ------------------------------------------------------------------------------------- the flow
def test_the_flow_remembers_the_echo_path_at_stop_and_starts_warm_from_it(tmp_path: Path) -> None:
    from unit.core.test_bargein import _Loop, _robot_units

    file = tmp_path / "echo_path.npz"
    aec = {"echo_path_file": str(file)}
    first = _Loop(_robot_units(8), room_sim.Room(delay_ms=80), aec=aec)
    first.run(room_sim.noise(10 * RATE, room_sim.Room(), 4))
    first.flow.stop()
    assert file.exists(), first.flow.echo_path_status
    assert first.flow.echo_path_status["echo_path.saved"].endswith("delay 80 ms")
    second = _Loop(_robot_units(8), room_sim.Room(delay_ms=80), aec=aec)
    second.flow.load_echo_path()
    assert second.flow.echo_path_status["echo_path.start"].startswith("warm: ")
    second.run(room_sim.noise(RATE, room_sim.Room(), 5))
    assert second.flow.mic.warm_starts == 1
    assert second.flow.aec is not None
    assert second.flow.aec.delay_ns == 80_000_000


def test_a_flow_with_a_broken_echo_path_file_starts_cold_and_says_why(tmp_path: Path) -> None:
    from unit.core.test_bargein import _Loop, _robot_units

    file = tmp_path / "echo_path.npz"
    file.write_bytes(b"\x00" * 64)
    loop = _Loop(_robot_units(2), room_sim.Room(delay_ms=80), aec={"echo_path_file": str(file)})
    loop.flow.start()
    loop.flow.stop()
    assert loop.flow.echo_path_status["echo_path.start"].startswith("cold: refused: echo path")
    assert loop.flow.mic.warm_starts == 0
    missing = _Loop([], None, aec={"echo_path_file": str(tmp_path / "none.npz")})
    missing.flow.load_echo_path()
    assert missing.flow.echo_path_status["echo_path.start"] == "cold: no file yet"
