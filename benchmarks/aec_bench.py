"""Echo cancellation and barge-in benchmark: ERLE, delay estimate, barge-in latency/success, false
barge-ins and cost per second of audio.

Two suites (``--suite erle|bargein|all``, default all):

**bargein** (omni_ros.core.bargein) runs canceller + detector offline, ROS-free, on the simulated room of
omni_ros/test/unit/core/duplex_scene.py (espeak-ng robot speech, played at known times = the reference;
echo delays 40-300 ms, -6 dB, 150 ms reverberation, loudspeaker soft clip, -60 dBFS noise; the user in
other espeak-ng voices at a user-to-echo RMS ratio ``--ser-db``). For every echo path it reports

* onset -> decision (median / p95 ms, capture time of the user's first voiced 10 ms to the end of the
  frame that decided; the flow adds its 60 ms reorder hold and the speaker its stop time) and success
  (decided within 500 ms of the onset) by phase of the robot's turn: ``start`` (0.3-2 s into the first
  turn after start: canceller fresh, delay unknown), ``turn`` (0.15-0.6 s into a later turn, after
  3 s of our speech and 1 s of silence: converged, the turn's first syllables), ``mid`` (4-8 s,
  converged), ``end`` (the last 0.5 s of an utterance), ``realign`` (0.1-0.8 s after the echo
  delay jumped by 100 ms and the canceller re-aligned), ``warm`` and ``moved`` (the ``start`` trials
  warmed by the echo path the last run remembered, omni_ros.core.echo_path: in the same room, and
  after the robot moved: other reflections, the same direct path; the new rule only);
* false barge-ins per minute on ``--echo-minutes`` of the robot's own echoed speech (no user);
* false barge-ins in ``--starts`` fresh starts per path (4 s scenes of the robot's first turn, no
  user): the long scene holds one start, and the first second after one is the detector's hardest;
* false barge-ins after the room changed (``--room-changes`` 12 s scenes per path and fade, no
  user): 6 s into the robot's speech a new set of reflections replaces the room's, at once or
  over 1 s (the robot moved; its direct path, fixed on its body, stays, so nothing re-aligns);
* false barge-ins in ``--warm-starts`` warm starts per path, same room and robot moved;
* CPU: canceller + detector time per second of audio.

``before`` is main's rule before this detector, re-enacted: WebRTC VAD runs on the cleaned signal,
400 ms of speech while our echo is possible and only once the canceller has converged (3 s of
reference after each filter reset), 180 ms otherwise; no coherence gate on the delay estimate.

Runs the Speex canceller (omni_ros.core.aec) on the synthetic echo scenes of the unit tests
(omni_ros/test/unit/core/echo_scene.py: espeak-ng robot speech at 24 kHz, played back through a
delay + 60 ms decaying room FIR at -6 dB into a 16 kHz mic, the user talking over it for ~3 s) and
prints one row per scene plus a Markdown table for docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/aec_bench.py [--suite bargein] [--echo-minutes 5] [--ser-db 0]
    .venv/bin/python benchmarks/aec_bench.py --suite erle [--delays 40 80 120 300] [--seeds 0 1 2]

**erle** (below) is the canceller alone on omni_ros/test/unit/core/echo_scene.py.

ERLE is 10 log10(E[mic^2] / E[out^2]) over the echo-only audio from 3 s (after convergence) to the
user's first word, and over the echo-only audio after the user stopped. "Echo-only time inside VAD
runs >= 400 ms" sums, over the seeds, the echo-only audio after 3 s and after the canceller reports
convergence (the flow suppresses barge-in on echo before that) covered by speech runs long enough to
trigger a barge-in while our speech plays (the old fixed 400 ms echo guard), on the raw mic and on the
cleaned signal: the time during which the robot would interrupt itself. "Cost" is the
canceller's own time (Speex + delay estimation), per second of 16 kHz audio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soxr

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "omni_ros"), str(ROOT / "omni_ros" / "test")]

from omni_ros.core.aec import AecConfig, EchoCanceller  # noqa: E402
from omni_ros.core.bargein import BargeInDetector  # noqa: E402
from omni_ros.core.clock import NS_PER_S  # noqa: E402
from omni_ros.core.echo_path import EchoPath, EchoPathRecorder, warm_up  # noqa: E402
from omni_ros.core.types import AudioBlock, FloatArray  # noqa: E402
from omni_ros.core.vad import VadConfig, VoiceActivityDetector  # noqa: E402
from unit.core import duplex_scene as room_sim  # noqa: E402
from unit.core.echo_scene import (  # noqa: E402
    MIC_RATE,
    OUT_RATE,
    T0_NS,
    EchoScene,
    erle_db,
    make_scene,
    stamp,
)


def cancel(scene: EchoScene, config: AecConfig) -> tuple[FloatArray, EchoCanceller, float, int]:
    """Returns cleaned audio, the canceller, seconds spent, and the sample where it converged."""
    canceller = EchoCanceller(config)
    for i in range(0, len(scene.far), OUT_RATE):
        canceller.push_reference(
            T0_NS + round(i * 1e9 / OUT_RATE), scene.far[i : i + OUT_RATE], OUT_RATE
        )
    out = []
    converged_at = -1
    elapsed = 0.0
    for i in range(0, len(scene.mic), 320):
        t0 = time.perf_counter()
        block = canceller.process(AudioBlock(stamp(i), MIC_RATE, scene.mic[i : i + 320]))
        elapsed += time.perf_counter() - t0
        out.append(block.samples)
        if converged_at < 0 and canceller.converged:
            converged_at = i + 320
    return np.concatenate(out), canceller, elapsed, converged_at


def speech_runs(signal: FloatArray) -> list[tuple[int, int]]:
    vad = VoiceActivityDetector()
    for i in range(0, len(signal), 320):
        vad.process(AudioBlock(stamp(i), MIC_RATE, signal[i : i + 320]))
    return list(vad.state.runs)


def barge_in_seconds(runs: list[tuple[int, int]], lo: int, hi: int, need_ns: int) -> float:
    """Seconds of ``[lo, hi)`` covered by speech runs long enough to trigger a barge-in."""
    total = 0
    for start, end in runs:
        if end - start >= need_ns:
            total += max(0, min(end, hi) - max(start, lo))
    return total / 1e9


def erle_main(args: argparse.Namespace) -> None:
    need_ns = 400_000_000  # the old fixed echo guard
    variants = {
        "default": AecConfig(),
        "no residual suppression": AecConfig(residual_suppression=False, denoise=False),
        "no delay estimation": AecConfig(estimate_delay=False),
    }
    rows = []
    for name, config in variants.items():
        for delay in args.delays:
            for seed in args.seeds:
                scene = make_scene(delay, seed=seed)
                out, canceller, elapsed, converged_at = cancel(scene, config)
                before = slice(3 * MIC_RATE, scene.user_start)
                after = slice(scene.user_end + MIC_RATE, scene.echo_end)
                # Runs that could barge in: from the moment the canceller reports convergence
                # (before that the flow suppresses barge-in while our speech echoes).
                lo = stamp(max(3 * MIC_RATE, converged_at))
                hi = stamp(scene.user_start) - 300_000_000
                raw_long = barge_in_seconds(speech_runs(scene.mic), lo, hi, need_ns)
                out_runs = speech_runs(out)
                out_long = barge_in_seconds(out_runs, lo, hi, need_ns)
                onsets = [s for s, _ in out_runs if abs(s - stamp(scene.user_start)) <= 300_000_000]
                rows.append(
                    {
                        "variant": name,
                        "delay_ms": delay,
                        "seed": seed,
                        "erle_before": erle_db(scene.mic[before], out[before]),
                        "erle_after": erle_db(scene.mic[after], out[after]),
                        "delay_est_ms": canceller.delay_ns / 1e6,
                        "raw_long": raw_long,
                        "out_long": out_long,
                        "user_onset_ms": (onsets[0] - stamp(scene.user_start)) / 1e6
                        if onsets
                        else None,
                        "ms_per_s": 1000 * elapsed / (len(scene.mic) / MIC_RATE),
                        "converged_s": converged_at / MIC_RATE,
                    }
                )
                r = rows[-1]
                print(
                    f"{name:24s} delay {delay:3d} ms seed {seed}: ERLE {r['erle_before']:5.1f} / "
                    f"{r['erle_after']:5.1f} dB, delay est {r['delay_est_ms']:6.1f} ms, long VAD runs "
                    f"raw {raw_long:.2f} s cleaned {out_long:.2f} s, user onset {r['user_onset_ms']} ms, "
                    f"{r['ms_per_s']:.1f} ms per s of audio, converged at {r['converged_s']:.2f} s"
                )
    print()
    print(
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}"
    )
    print()
    print(
        "| variant | delay | ERLE before user (median, min) | ERLE after user (median, min) | delay estimate error (max) | echo-only time inside VAD runs >= 400 ms, after convergence, all seeds: raw / cleaned | user onset found | converged after (max) | cost per s of audio (median) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in variants:
        for delay in args.delays:
            sel = [r for r in rows if r["variant"] == name and r["delay_ms"] == delay]
            eb = [r["erle_before"] for r in sel]
            ea = [r["erle_after"] for r in sel]
            err = max(abs(r["delay_est_ms"] - delay) for r in sel)
            found = sum(1 for r in sel if r["user_onset_ms"] is not None)
            print(
                f"| {name} | {delay} ms | {statistics.median(eb):.1f} dB, {min(eb):.1f} dB | "
                f"{statistics.median(ea):.1f} dB, {min(ea):.1f} dB | "
                f"{err:.1f} ms | {sum(r['raw_long'] for r in sel):.1f} s / {sum(r['out_long'] for r in sel):.1f} s | "
                f"{found}/{len(sel)} | {max(r['converged_s'] for r in sel):.2f} s | "
                f"{statistics.median(r['ms_per_s'] for r in sel):.1f} ms |"
            )


# ------------------------------------------------------------------------------- barge-in suite
BLOCK = 320  # 20 ms microphone chunks, as the mic node sends them


_VAD = [VadConfig()]  # the detector's VAD settings (--min-speech-ms changes them)


def _old_config() -> AecConfig:
    """The canceller as main had it before the detector: no coherence gate, 1 s first window."""
    return AecConfig(
        delay_min_coherence=0.0,
        delay_first_window_ms=1000,
        delay_first_min_coherence=2.0,  # never: two agreeing estimates were needed
        delay_update_ms=500,
    )


class OldRule:
    """main's _check_barge_in before this detector: WebRTC VAD runs, 400 ms echo guard, no
    barge-in while the canceller has not converged and our echo is possible."""

    def __init__(self) -> None:
        self.vad = VoiceActivityDetector(VadConfig())

    def step(self, cleaned: AudioBlock, canceller: EchoCanceller) -> tuple[int, int] | None:
        self.vad.process(cleaned)
        run = self.vad.active_run()
        if run is None:
            return None
        start, dur = run
        need = 180_000_000
        if canceller.reference_active(start, start + dur):
            if not canceller.converged:
                return None
            need = 400_000_000
        return run if dur >= need else None


class NewRule:
    def __init__(self, aec: AecConfig, vad: VadConfig) -> None:
        self.det = BargeInDetector(aec, vad)

    def step(self, cleaned: AudioBlock, canceller: EchoCanceller) -> tuple[int, int] | None:
        self.det.process(cleaned, canceller.last_mic, canceller)
        return self.det.active_run()


def _simulate(
    far: FloatArray,
    mic: FloatArray,
    rule_name: str,
    warm: EchoPath | None = None,
    recorder: EchoPathRecorder | None = None,
) -> tuple[list[tuple[int, int]], EchoCanceller, float, list[int]]:
    """Feed reference (at its play time, half a second ahead) and mic; returns every barge-in
    decision as (run start, decided at), the canceller, CPU seconds, and filter-reset times.
    ``warm``: a remembered echo path played through first (the new rule only); ``recorder``
    takes every block (the new rule only)."""
    aec = _old_config() if rule_name == "before" else AecConfig()
    canceller = EchoCanceller(aec)
    rule: OldRule | NewRule = OldRule() if rule_name == "before" else NewRule(aec, _VAD[0])
    if warm is not None and isinstance(rule, NewRule):
        warm_up(warm, T0_NS, canceller, rule.det, passes=aec.echo_path_passes)
    decisions: list[tuple[int, int]] = []
    resets: list[int] = []
    active = False
    pushed = 0
    half = room_sim.OUT_RATE // 2
    cpu = 0.0
    for i in range(0, len(mic), BLOCK):
        t_ns = stamp(i)
        while (
            pushed < len(far)
            and T0_NS + round(pushed * NS_PER_S / room_sim.OUT_RATE) < t_ns + NS_PER_S // 2
        ):
            canceller.push_reference(
                T0_NS + round(pushed * NS_PER_S / room_sim.OUT_RATE),
                far[pushed : pushed + half],
                room_sim.OUT_RATE,
            )
            pushed += half
        before = canceller.filter_resets
        t0 = time.perf_counter()
        cleaned = canceller.process(AudioBlock(t_ns, MIC_RATE, mic[i : i + BLOCK]))
        run = rule.step(cleaned, canceller) if len(cleaned.samples) else None
        cpu += time.perf_counter() - t0
        if recorder is not None and isinstance(rule, NewRule) and len(cleaned.samples):
            recorder.add(canceller, cleaned, rule.det.last_verdicts)
        if canceller.filter_resets != before:
            resets.append(t_ns)
        if run is not None and not active:
            decisions.append((run[0], cleaned.stamp_ns + cleaned.duration_ns))
        active = run is not None
    return decisions, canceller, cpu, resets


START_SCENE_S = 4.0  # a fresh start's scene: the robot's first turn, nobody else speaking
START_SEED = 1000  # its seeds (7 * j + delay) differ from the trials' (delay + 1, delay + 2)
ROOM_CHANGE_S = 6.0  # a room-change scene's reflections change this far into the robot's speech
ROOM_FADES_S = (0.0, 1.0)  # at once, and over a second
ROOM_SEED = 7000  # its seeds: 7 * j + delay
TURN_LEAD_S = 3.0  # a later turn follows this much of our speech and a second of silence
TURN_OFFSETS_S = (0.15, 0.3, 0.45, 0.6)  # the user's start into it
START_OFFSETS_S = (0.3, 0.6, 1.0, 1.5, 2.0)  # the user's start into the first turn
WARM_RECORD_S = 8.0  # the run before a warm start: this much of our speech, nobody else talking
WARM_PHASES = ("warm", "moved")
WARM_SEED = 2000  # its speech seed (and, for a robot that moved, its room's) is offset by this


_scene = room_sim.echo_scene  # our speech through the room (reflections from ``room_seed``)


def _remembered(room: room_sim.Room, room_seed: int, moved: bool) -> EchoPath | None:
    """What the last run remembered (omni_ros.core.echo_path): ``WARM_RECORD_S`` of other speech
    in the room of ``room_seed`` (``moved``: in a room with other reflections, the same direct
    path: the robot moved since)."""
    far, mic = _scene(
        room,
        WARM_RECORD_S,
        seed=room_seed + WARM_SEED,
        room_seed=room_seed + (WARM_SEED if moved else 0),
    )
    recorder = EchoPathRecorder(AecConfig())
    _d, canceller, _cpu, _r = _simulate(far, mic, "after", recorder=recorder)
    return recorder.snapshot(canceller)


def _warm_starts(room: room_sim.Room, delay: int, starts: int, moved: bool) -> tuple[int, int]:
    """:func:`_false_counts` of ``starts`` fresh starts (the ``--starts`` scenes) warmed by
    what the last run remembered."""
    per_scene = []
    for j in range(starts):
        seed = START_SEED + 7 * j + delay
        path = _remembered(room, seed, moved)
        per_scene.append(_simulate(*_scene(room, START_SCENE_S, seed=seed), "after", warm=path)[0])
    return _false_counts(per_scene)


def _echo_level(room: room_sim.Room, far: FloatArray, seed: int, n: int) -> float:
    echo = room_sim.echo_of(far, room, seed=seed, length=n)
    return room_sim.rms(echo[np.abs(echo) > 0.03 * np.abs(echo).max()])


def _with_user(mic: FloatArray, at: int, k: int, level: float) -> tuple[FloatArray, int, int]:
    user = room_sim.user_line(k)
    user = user * (level / room_sim.rms(user[np.abs(user) > 0.03 * np.abs(user).max()]))
    out = mic.copy()
    m = min(len(user), len(out) - at)
    out[at : at + m] += user[:m]
    return out, at + room_sim.voiced_start(user), at + m


def _utterance_ends(far: FloatArray) -> list[int]:
    """Mic sample indices where one of the robot's utterances ends (>= 300 ms of silence after)."""
    far16 = np.abs(soxr.resample(far, room_sim.OUT_RATE, MIC_RATE))
    win = MIC_RATE // 100
    n = len(far16) // win
    loud = far16[: n * win].reshape(n, win).max(axis=1) > 0.01
    ends = []
    for j in range(1, n - 30):
        if loud[j - 1] and not loud[j : j + 30].any():
            ends.append(j * win)
    return ends


def _trial(
    room: room_sim.Room,
    far: FloatArray,
    base: FloatArray,
    at: int,
    k: int,
    ser_db: float,
    rule: str,
    seed: int,
    warm: EchoPath | None = None,
) -> float | None:
    level = _echo_level(room, far, seed, len(base)) * 10 ** (ser_db / 20)
    mic, onset, _end = _with_user(base, at, k, level)
    decisions, _c, _cpu, _r = _simulate(far, mic, rule, warm=warm)
    onset_ns = stamp(onset)
    for _start, decided in decisions:
        if decided >= onset_ns:
            return (decided - onset_ns) / 1e6
    return None


def _false_counts(per_scene: list[list[tuple[int, int]]]) -> tuple[int, int]:
    """(false barge-ins, scenes with one) from each scene's decisions."""
    return sum(len(d) for d in per_scene), sum(1 for d in per_scene if d)


def _room_changes(delay: int, scenes: int, rule: str) -> dict[float, tuple[int, int]]:
    """Per fade: :func:`_false_counts` of the decisions after the change in ``scenes`` 12 s
    scenes whose reflections change at ``ROOM_CHANGE_S``."""
    change_ns = stamp(int(ROOM_CHANGE_S * MIC_RATE))
    out = {}
    for fade in ROOM_FADES_S:
        room = room_sim.Room(
            delay_ms=delay, reflections_change_at_s=ROOM_CHANGE_S, reflections_fade_s=fade
        )
        after = [
            [
                (s, d)
                for s, d in _simulate(*_scene(room, 12, seed=ROOM_SEED + 7 * j + delay), rule)[0]
                if d >= change_ns
            ]
            for j in range(scenes)
        ]
        out[fade] = _false_counts(after)
    return out


def bargein_main(args: argparse.Namespace) -> None:
    delays = args.delays or [40, 120, 200, 300]
    print(
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}"
    )
    rows = []
    for delay in delays:
        room = room_sim.Room(delay_ms=delay)
        for rule in args.rules:
            # False barge-ins on the robot's own echo, and CPU.
            far, mic = _scene(room, args.echo_minutes * 60, seed=delay)
            decisions, canceller, cpu, _ = _simulate(far, mic, rule)
            minutes = len(mic) / MIC_RATE / 60
            row = {
                "delay": delay,
                "rule": rule,
                "false": len(decisions),
                "minutes": minutes,
                "cpu_ms_per_s": 1000 * cpu / (len(mic) / MIC_RATE),
                "delay_est": canceller.delay_ns / 1e6,
            }
            # False barge-ins in the first seconds after start: each fresh canceller hears the
            # robot's first turn once, so the long scene above holds only one start.
            starts = [
                _simulate(*_scene(room, START_SCENE_S, seed=START_SEED + 7 * j + delay), rule)[0]
                for j in range(args.starts)
            ]
            row["start_false"], row["start_false_scenes"] = _false_counts(starts)
            if rule == "after":
                row["warm_false"] = _warm_starts(room, delay, args.warm_starts, moved=False)
                row["moved_false"] = _warm_starts(room, delay, args.warm_starts, moved=True)
            row["room_false"] = _room_changes(delay, args.room_changes, rule)
            for ser in [] if args.no_trials else args.ser_db:
                lat: dict[str, list[float | None]] = {}
                # start: a fresh canceller, the user 0.3-2 s into the first turn.
                far_s, base_s = _scene(room, 12, seed=delay + 1)
                lat["start"] = [
                    _trial(room, far_s, base_s, int(off * MIC_RATE), k, ser, rule, delay + 1)
                    for k, off in enumerate(START_OFFSETS_S)
                ]
                # warm / moved: the same starts, warmed by the echo path the last run
                # remembered (aec.echo_path_file), in the same room or after the robot moved.
                for phase, moved in (("warm", False), ("moved", True)):
                    path = _remembered(room, delay + 1, moved) if rule == "after" else None
                    if path is None:
                        continue
                    lat[phase] = [
                        _trial(
                            room, far_s, base_s, int(off * MIC_RATE), k, ser, rule, delay + 1, path
                        )
                        for k, off in enumerate(START_OFFSETS_S)
                    ]
                # turn: the user 0.15-0.6 s into a later turn (3 s of our speech, 1 s of silence,
                # then the turn): the filter converged, the turn's first syllables on top of it.
                far_t, base_t, lead = room_sim.later_turn(room, seed=delay + 3, lead_s=TURN_LEAD_S)
                lat["turn"] = [
                    _trial(room, far_t, base_t, lead + int(off * MIC_RATE), k, ser, rule, delay + 3)
                    for k, off in enumerate(TURN_OFFSETS_S, start=3)
                ]
                lat["mid"] = [
                    _trial(room, far_s, base_s, int(off * MIC_RATE), k, ser, rule, delay + 1)
                    for k, off in enumerate([4.0, 5.5, 7.0])
                ]
                ends = [e for e in _utterance_ends(far_s) if 4 * MIC_RATE < e < 11 * MIC_RATE]
                lat["end"] = [
                    _trial(room, far_s, base_s, e - MIC_RATE // 2, k, ser, rule, delay + 1)
                    for k, e in enumerate(ends[:3])
                ]
                # realign: the delay jumps by 100 ms at 5 s; the user starts after the re-alignment.
                jumped = room_sim.Room(
                    delay_ms=delay,
                    delay_jump_at_s=5.0,
                    jump_to_ms=delay + 100 if delay <= 200 else delay - 100,
                )
                far_j, base_j = _scene(jumped, 12, seed=delay + 2)
                jump_decisions, _c, _cpu, resets = _simulate(far_j, base_j, rule)
                # Barge-ins on the robot's own echo alone in the delay-jump scene: the jump
                # itself (the filter suddenly wrong) can look like the user until re-aligned.
                row["jump_false"] = len(jump_decisions)
                after = [t for t in resets if t >= stamp(5 * MIC_RATE)]
                lat["realign"] = []
                if after:
                    t_re = round((after[0] - T0_NS) * MIC_RATE / NS_PER_S)
                    lat["realign"] = [
                        _trial(
                            jumped,
                            far_j,
                            base_j,
                            t_re + int(off * MIC_RATE),
                            k,
                            ser,
                            rule,
                            delay + 2,
                        )
                        for k, off in enumerate([0.1, 0.4, 0.8])
                    ]
                row[f"ser{ser:g}"] = lat
            rows.append(row)
            print(row, flush=True)
    print()
    print(
        "| echo path | rule | SER | phase | success (<= 500 ms) | onset -> decision median / p95 |"
    )
    print("|---|---|---|---|---|---|")
    sers = [] if args.no_trials else args.ser_db
    for row in rows:
        for ser in sers:
            for phase, lats in row[f"ser{ser:g}"].items():
                ok = [x for x in lats if x is not None and x <= 500]
                med = f"{statistics.median(ok):.0f}" if ok else "-"
                p95 = f"{np.quantile(ok, 0.95):.0f}" if ok else "-"
                print(
                    f"| {row['delay']} ms | {row['rule']} | {ser:+g} dB | {phase} | "
                    f"{len(ok)}/{len(lats)} | {med} / {p95} ms |"
                )
    print()
    print(
        "| echo path | rule | echo-only audio | false barge-ins (per minute) | CPU per s of audio "
        "| false barge-ins in the 12 s delay-jump scene (no user) "
        f"| false barge-ins in {args.starts} fresh starts ({START_SCENE_S:g} s each, no user) "
        + "".join(
            f"| after the room changed ({'at once' if f == 0 else f'over {f:g} s'}, "
            f"{args.room_changes} scenes) "
            for f in ROOM_FADES_S
        )
        + f"| in {args.warm_starts} warm starts, same room | in {args.warm_starts} warm starts, "
        "robot moved |"
    )
    print("|---|---|---|---|---|---|---|" + "---|" * (len(ROOM_FADES_S) + 2))
    for row in rows:
        print(
            f"| {row['delay']} ms | {row['rule']} | {row['minutes']:.1f} min | {row['false']} "
            f"({row['false'] / row['minutes']:.2f}) | {row['cpu_ms_per_s']:.1f} ms "
            f"| {row.get('jump_false', '-')} "
            f"| {row['start_false']} (in {row['start_false_scenes']} starts) "
            + "".join(
                f"| {n} (in {k} scenes) " for n, k in (row["room_false"][f] for f in ROOM_FADES_S)
            )
            + "".join(
                f"| {row[key][0]} (in {row[key][1]} starts) " if key in row else "| - "
                for key in ("warm_false", "moved_false")
            )
            + "|"
        )
    # Pooled over paths, for the summary line.
    for rule in args.rules:
        for ser in sers:
            pooled = [
                x
                for row in rows
                if row["rule"] == rule
                for phase, lats in row[f"ser{ser:g}"].items()
                if phase not in WARM_PHASES  # the cold phases, comparable across rules
                for x in lats
            ]
            ok = [x for x in pooled if x is not None and x <= 500]
            if ok:
                print(
                    f"{rule}, SER {ser:+g} dB, all phases and paths: success {len(ok)}/{len(pooled)}, "
                    f"median {statistics.median(ok):.0f} ms, p95 {np.quantile(ok, 0.95):.0f} ms"
                )
            else:
                print(f"{rule}, SER {ser:+g} dB: success 0/{len(pooled)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["erle", "bargein", "all"], default="all")
    parser.add_argument("--delays", type=int, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--echo-minutes", type=float, default=5.0)
    parser.add_argument("--ser-db", type=float, nargs="+", default=[0.0, 6.0])
    parser.add_argument("--rules", nargs="+", default=["before", "after"])
    parser.add_argument(
        "--min-speech-ms", type=int, default=None, help="vad.barge_in_min_speech_ms to use"
    )
    parser.add_argument("--no-trials", action="store_true", help="false barge-ins and CPU only")
    parser.add_argument(
        "--warm-starts",
        type=int,
        default=20,
        help="warm starts per echo path (same room, and robot moved) whose false barge-ins are counted",
    )
    parser.add_argument(
        "--starts",
        type=int,
        default=25,
        help="fresh starts per echo path whose false barge-ins are counted (0: none)",
    )
    parser.add_argument(
        "--room-changes",
        type=int,
        default=5,
        help="room-change scenes per echo path and fade whose false barge-ins are counted",
    )
    args = parser.parse_args()
    if args.min_speech_ms is not None:
        _VAD[0] = VadConfig(barge_in_min_speech_ms=args.min_speech_ms)
    if args.suite in ("bargein", "all"):
        bargein_main(args)
    if args.suite in ("erle", "all"):
        args.delays = args.delays or [40, 80, 120, 300]
        erle_main(args)


if __name__ == "__main__":
    main()
