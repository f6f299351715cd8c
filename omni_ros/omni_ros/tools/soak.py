"""``make soak``: hours of robot time through OmniFlow + a real backend, checking for leaks and for
counters that disagree with the input.

Direct mode (default one hour of robot time): the core loop in this process on a ManualClock that
runs as fast as the backend allows (an accelerated clock), fed a repeating 60 s scene: speech,
silence, speech over the robot's own turn (barge-in candidates), camera frames at 5 fps, and every
``--jump-every-min`` minutes a clock jump back to the start (a looping bag). Sampled every
simulated minute: RSS, threads, open fds. At the end:

* RSS slope (MB per hour of robot time, least squares after the first 10 % warm-up);
* threads and fds at start and end (must be equal);
* every input sample accounted for by cause (``OmniFlow.audio_accounting()``): fed = used +
  dropped (the sum of ``audio_dropped_<cause>``) + still held, exactly; used = what reached the
  backend (not gap fill); the gap fills by cause add up to ``gap_samples_filled``; no decode
  error, no backend error, no future stamp, no overrun. (Graph mode: the causes add up, and
  fed = in units + dropped within the tail still buffered.)

Graph mode (``--graph-min``): the same scene as a bag, replayed in a loop through the real
``omni_flow_node`` process (``omni-ros replay --mode graph``), the node's RSS / threads / fds read
from /proc while it runs.

Output: one JSON report (``--out``) and a summary on stdout. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omni_ros.core.clock import NS_PER_S

MIC_RATE = 16_000
CHUNK_MS = 20
FLUSH_S = 5


@dataclass
class Sample:
    robot_s: float
    wall_s: float
    rss_mb: float
    threads: int
    fds: int


@dataclass
class Tally:
    """What the soak fed in (to check the counters against)."""

    audio_samples: int = 0
    chunks: int = 0
    frames: int = 0
    jumps: int = 0
    states: int = 0
    units: int = 0
    unit_samples: int = 0
    unit_gap_samples: int = 0
    speech_events: int = 0
    samples: list[Sample] = field(default_factory=list)


def proc_stats(pid: int | str = "self") -> tuple[float, int, int]:
    """(RSS MB, threads, open fds) of a process from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_mb = int(fields["VmRSS"].split()[0]) / 1024
    return rss_mb, int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd"))


def slope_mb_per_h(samples: list[Sample]) -> float:
    """Least-squares RSS slope over robot time, after a 10 % warm-up."""
    kept = samples[len(samples) // 10 :]
    if len(kept) < 3:
        return float("nan")
    hours = np.array([s.robot_s / 3600 for s in kept])
    rss = np.array([s.rss_mb for s in kept])
    return float(np.polyfit(hours, rss, 1)[0])


def scene_audio(seconds: int = 60) -> np.ndarray:
    """The repeating minute: noise, two spoken questions, a long silence, speech at 30 s (over
    the robot's reply: a barge-in candidate). espeak-ng speech where installed, else bursts."""
    rng = np.random.default_rng(0)
    signal = rng.normal(0.0, 1e-3, seconds * MIC_RATE).astype(np.float32)
    try:
        from omni_ros.tools.synth import speak

        lines = [(2, "Hello robot, what do you see?"), (12, "Tell me a story."),
                 (30, "Stop, wait a moment."), (45, "Thank you.")]  # fmt: skip
        for at_s, text in lines:
            speech = speak(text, MIC_RATE) * 0.5
            start = at_s * MIC_RATE
            signal[start : start + len(speech)] += speech[: len(signal) - start]
    except Exception:  # no espeak-ng: amplitude-modulated noise bursts stand in for speech
        for at_s in (2, 12, 30, 45):
            n = 2 * MIC_RATE
            envelope = 0.5 * (1 + np.sin(np.arange(n) * 2 * np.pi * 4 / MIC_RATE))
            signal[at_s * MIC_RATE : at_s * MIC_RATE + n] += (
                0.2 * envelope * rng.normal(0, 1, n)
            ).astype(np.float32)
    return np.clip(signal, -1, 1)


def run_direct(robot_s: float, jump_every_s: float, params: dict[str, Any]) -> dict[str, Any]:
    from omni_ros.backends.base import create_backend
    from omni_ros.core.clock import ManualClock
    from omni_ros.core.flow import FlowConfig, OmniFlow
    from omni_ros.core.types import RawAudio, RawImage, SpeechOut, StateOut

    tally = Tally()
    backend = create_backend("reference", params)
    getattr(backend, "model", None)
    start_ns = 1_700_000_000 * NS_PER_S
    clock = ManualClock(start_ns)

    def emit(event: Any) -> None:
        if isinstance(event, StateOut):
            tally.states += 1
        elif isinstance(event, SpeechOut):
            tally.speech_events += 1

    prefill = backend.prefill

    def counting_prefill(unit: Any) -> None:  # what reached the backend, to check the counters
        tally.units += 1
        tally.unit_samples += len(unit.audio)
        tally.unit_gap_samples += int(unit.gap_samples)
        prefill(unit)

    backend.prefill = counting_prefill  # type: ignore[method-assign]
    config = FlowConfig()
    flow = OmniFlow(config, backend, clock, emit)
    audio = scene_audio()
    pcm = (audio * 32767).astype("<i2").tobytes()
    chunk_samples = MIC_RATE * CHUNK_MS // 1000
    frame = RawImage(0, "rgb8", bytes(320 * 240 * 3), 320, 240, 320 * 3)
    wall0 = time.monotonic()
    t_s = 0.0  # robot time since the (current) pass started
    total_s = 0.0
    next_sample_s = 0.0
    pass_origin_ns = start_ns
    while total_s < robot_s:
        if jump_every_s and t_s >= jump_every_s:  # a looping bag: back to the start
            t_s, tally.jumps = 0.0, tally.jumps + 1
        stamp = pass_origin_ns + round(t_s * NS_PER_S)
        offset = round(t_s * MIC_RATE) % len(audio)
        data = pcm[2 * offset : 2 * (offset + chunk_samples)]
        if len(data) < 2 * chunk_samples:
            data += pcm[: 2 * chunk_samples - len(data)]
        flow.push_audio(RawAudio(stamp, MIC_RATE, 1, "S16LE", data))
        tally.audio_samples += chunk_samples
        tally.chunks += 1
        if round(t_s * 1000) % 200 == 0:  # 5 fps
            flow.push_image(RawImage(stamp, "rgb8", frame.data, 320, 240, 960))
            tally.frames += 1
        t_s += CHUNK_MS / 1000
        total_s += CHUNK_MS / 1000
        clock.set_ns(pass_origin_ns + round(t_s * NS_PER_S))
        flow.run_until_idle(clock.now_ns())
        if total_s >= next_sample_s:
            rss, threads, fds = proc_stats()
            tally.samples.append(Sample(total_s, time.monotonic() - wall0, rss, threads, fds))
            next_sample_s += 60.0
    # Let the last units close, then stop.
    for _ in range(FLUSH_S):
        clock.set_ns(clock.now_ns() + NS_PER_S)
        flow.run_until_idle(clock.now_ns())
    counters = flow.counters.as_dict()
    accounting = flow.audio_accounting()
    flow.close()
    backend.close()
    rss, threads, fds = proc_stats()
    tally.samples.append(Sample(total_s, time.monotonic() - wall0, rss, threads, fds))
    return report("direct", tally, counters, robot_s, accounting)


def check_accounting(
    tally: Tally, counters: dict[str, int], accounting: dict[str, int] | None
) -> list[str]:
    """The per-cause audio accounting (docs/RELIABILITY.md): the causes add up to the totals,
    and (direct mode, where the flow is at hand) every sample fed is used, dropped for a cause
    or still held, and what the flow counts as used is what reached the backend."""
    problems = []
    causes = {k: v for k, v in counters.items() if k.startswith("audio_dropped_")}
    if causes and sum(causes.values()) != counters.get("dropped_audio_samples", 0):
        problems.append(f"drops by cause {sum(causes.values())} != dropped_audio_samples")
    gaps = {k: v for k, v in counters.items() if k.startswith("gap_filled_")}
    if gaps and sum(gaps.values()) != counters.get("gap_samples_filled", 0):
        problems.append(f"gap fills by cause {sum(gaps.values())} != gap_samples_filled")
    if accounting is None:
        return problems
    if accounting["in"] != tally.audio_samples:
        problems.append(f"audio_samples_in {accounting['in']} != {tally.audio_samples} fed")
    total = accounting["used"] + accounting["dropped"] + accounting["held"]
    if total != accounting["in"]:
        problems.append(f"used + dropped + held = {total} != in = {accounting['in']}")
    if accounting["used"] != tally.unit_samples - tally.unit_gap_samples:
        problems.append(f"audio_samples_used {accounting['used']} != what reached the backend")
    return problems


def report(
    mode: str,
    tally: Tally,
    counters: dict[str, int],
    robot_s: float,
    accounting: dict[str, int] | None = None,
) -> dict[str, Any]:
    # Threads and fds are compared from the end of the warm-up (the first 10 %, where a graph-mode
    # node is still loading its model and creating its DDS entities).
    first, last = tally.samples[len(tally.samples) // 10], tally.samples[-1]
    problems = []
    for key in ("decode_errors", "backend_errors", "backend_timeouts", "future_messages",
                "nonfinite_samples", "units_dropped_overrun"):  # fmt: skip
        if counters.get(key, 0):
            problems.append(f"{key} = {counters[key]}")
    if counters.get("clock_jumps", 0) != tally.jumps:
        problems.append(f"clock_jumps {counters.get('clock_jumps')} != {tally.jumps} jumps fed")
    # One unit per second of robot time (MiniCPM-o 4.5's 1 s units), plus the 5 s of clock the end
    # runs on to close the last ones.
    expected_units = robot_s + FLUSH_S
    if tally.units and not 0.9 * expected_units <= tally.units <= 1.0 * expected_units:
        problems.append(f"{tally.units} units for {robot_s:.0f} s of input")
    if tally.unit_samples and accounting is None:
        # Graph mode (counters from OmniState / diagnostics only): every sample fed is in a
        # unit (not as gap fill) or counted as dropped, but for the tail still buffered.
        accounted = tally.unit_samples - tally.unit_gap_samples
        accounted += counters.get("dropped_audio_samples", 0)
        unaccounted = tally.audio_samples - accounted
        tally_note = f"{unaccounted} of {tally.audio_samples} samples unaccounted"
        if not 0 <= unaccounted <= (3 + 2 * tally.jumps) * MIC_RATE:
            problems.append(tally_note)
    problems += check_accounting(tally, counters, accounting)
    if max(s.threads for s in tally.samples[len(tally.samples) // 10 :]) > first.threads + 1:
        problems.append("thread count grew")
    if last.fds > first.fds + 2:
        problems.append("fd count grew")
    return {
        "mode": mode,
        "robot_time_s": round(robot_s, 1),
        "wall_time_s": round(last.wall_s, 1),
        "acceleration": round(robot_s / max(last.wall_s, 1e-9), 2),
        "rss_first_sample_mb": round(tally.samples[0].rss_mb, 1),
        "rss_start_mb": round(first.rss_mb, 1),
        "rss_end_mb": round(last.rss_mb, 1),
        "rss_slope_mb_per_h": round(slope_mb_per_h(tally.samples), 2),
        "threads_start_end": [first.threads, last.threads],
        "fds_start_end": [first.fds, last.fds],
        "fed": {
            "audio_samples": tally.audio_samples,
            "chunks": tally.chunks,
            "frames": tally.frames,
            "clock_jumps": tally.jumps,
        },
        "units": tally.units,
        "omni_state_messages": tally.states,
        "samples_in_units_not_gap": tally.unit_samples - tally.unit_gap_samples,
        "audio_accounting": accounting,
        "counters": counters,
        "problems": problems,
        "samples": [vars(s) for s in tally.samples],
    }


def run_graph(minutes: float, out_dir: Path) -> dict[str, Any]:
    """The same scene as a looping bag through the real node process (``omni-ros replay``)."""
    import subprocess

    from omni_ros.tools.synth import SynthConfig, write_bag

    bag = out_dir / "soak_bag"
    if not bag.exists():
        write_bag(bag, SynthConfig(duration_s=60.0))
    loops = max(1, int(minutes))
    out = out_dir / "graph_out"
    cmd = ["omni-ros", "replay", str(bag), "--out", str(out), "--mode", "graph", "--quiet",
           "--loop", str(loops)]  # fmt: skip
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tally = Tally()
    wall0 = time.monotonic()
    log_path = out_dir / "replay.log"
    log = log_path.open("w")
    replay = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    node_pid: int | None = None
    while replay.poll() is None:
        time.sleep(10)
        if node_pid is None:
            found = subprocess.run(["pgrep", "-P", str(replay.pid)], capture_output=True,
                                   text=True, check=False).stdout.split()  # fmt: skip
            node_pid = int(found[0]) if found else None
        if node_pid is not None:
            try:
                rss, threads, fds = proc_stats(node_pid)
            except (FileNotFoundError, ProcessLookupError, KeyError):
                continue  # the node has exited (a zombie has no VmRSS) or is exiting
            elapsed = time.monotonic() - wall0
            tally.samples.append(Sample(elapsed, elapsed, rss, threads, fds))
    log.close()
    output = log_path.read_text(errors="replace")
    if not tally.samples:
        return {"mode": "graph", "problems": ["no sample of the node process"], "log": output}
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    tally.jumps = loops - 1  # the bag loops: the clock jumps back at every new pass
    result = report("graph", tally, summary.get("counters", {}), tally.samples[-1].robot_s)
    result["units"] = summary.get("units")
    result["problems"] = [
        p for p in result["problems"] if "units for" not in p and "clock_jumps" not in p
    ]
    result["replay_exit"] = replay.returncode
    result["replay_tail"] = output[-2000:]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--robot-hours", type=float, default=1.0, help="direct mode robot time")
    parser.add_argument("--jump-every-min", type=float, default=20.0, help="looping-bag jumps")
    parser.add_argument(
        "--graph-min", type=float, default=10.0, help="graph mode minutes (0: skip)"
    )
    parser.add_argument("--out", default="soak_out", help="report folder (git-ignored)")
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"size": "tiny", "num_threads": 1, "speak_schedule": "LLSSSELLLL"}
    results = []
    if args.robot_hours > 0:
        results.append(run_direct(args.robot_hours * 3600, args.jump_every_min * 60, params))
    if args.graph_min > 0:
        results.append(run_graph(args.graph_min, out_dir))
    (out_dir / "soak.json").write_text(json.dumps(results, indent=2))
    for r in results:
        keys = ("mode", "robot_time_s", "wall_time_s", "rss_start_mb", "rss_end_mb",
                "rss_slope_mb_per_h", "threads_start_end", "fds_start_end", "units", "problems")  # fmt: skip
        print(json.dumps({k: r.get(k) for k in keys}))
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
