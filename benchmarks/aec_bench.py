"""Echo cancellation benchmark: ERLE, delay estimate, barge-in detection and cost per second of audio.

Runs the Speex canceller (omni_ros.core.aec) on the synthetic echo scenes of the unit tests
(omni_ros/test/unit/core/echo_scene.py: espeak-ng robot speech at 24 kHz, played back through a
delay + 60 ms decaying room FIR at -6 dB into a 16 kHz mic, the user talking over it for ~3 s) and
prints one row per scene plus a Markdown table for docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/aec_bench.py [--delays 40 80 120 300] [--seeds 0 1 2]

ERLE is 10 log10(E[mic^2] / E[out^2]) over the echo-only audio from 3 s (after convergence) to the
user's first word, and over the echo-only audio after the user stopped. "Echo-only time inside VAD
runs >= 400 ms" sums, over the seeds, the echo-only audio after 3 s and after the canceller reports
convergence (the flow suppresses barge-in on echo before that) covered by speech runs long enough to
trigger a barge-in while our speech plays (AecConfig.echo_min_speech_ms), on the raw mic and on the
cleaned signal: the time during which the robot would interrupt itself. "Cost" is the
canceller's own time (Speex + delay estimation), per second of 16 kHz audio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "omni_ros"), str(ROOT / "omni_ros" / "test")]

from omni_ros.core.aec import AecConfig, EchoCanceller  # noqa: E402
from omni_ros.core.types import AudioBlock, FloatArray  # noqa: E402
from omni_ros.core.vad import VoiceActivityDetector  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", type=int, nargs="+", default=[40, 80, 120, 300])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    need_ns = AecConfig().echo_min_speech_ms * 1_000_000
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


if __name__ == "__main__":
    main()
