"""Benchmark: the Omni-Flow core's assembly + conversion cost per 1 s unit (no model, no ROS).

Per unit it does what the node does with one second of input: 50 x 20 ms chunks of 16 kHz mono
S16LE audio (decode_audio + Timeline.push_audio each), 30 x 1280x720 rgb8 frames at 30 fps
(decode_image + Timeline.push_frame each), then Timeline.poll, which assembles the unit's audio and
resizes the frame chosen by the "last" policy to 448x448 (letterbox). Message payloads are built
before timing starts (they arrive from DDS already as bytes).

Run: ``.venv/bin/python benchmarks/core_bench.py [--units 300] [--lazy]``. ``--lazy`` pushes raw
images and lets the timeline decode only the chosen frame.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "omni_ros"))

from omni_ros.core.audio import decode_audio
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.images import decode_image
from omni_ros.core.timeline import Timeline, TimelineConfig
from omni_ros.core.types import Counters, RawAudio, RawImage

RATE = 16_000
WIDTH, HEIGHT = 1280, 720
FPS = 30


def run(
    units: int, lazy: bool, warmup: int = 5, resize_filter: str = "box", rate: int = RATE
) -> dict[str, list[float]]:
    """Per-unit wall times in milliseconds (after ``warmup`` untimed units): the total and its
    three stages (audio decode + push, image decode + push, poll = assembly + frame resize)."""
    rng = np.random.default_rng(0)
    pcm = [
        (rng.standard_normal(rate // 50) * 3000).astype("<i2").tobytes() for _ in range(50)
    ]  # distinct payloads
    images = [rng.integers(0, 256, WIDTH * HEIGHT * 3, dtype=np.uint8).tobytes() for _ in range(4)]
    config = TimelineConfig(
        first_unit_ns=NS_PER_S,
        frame_size=448,
        resize_policy="letterbox",
        resize_filter=resize_filter,
    )
    counters = Counters()
    timeline = Timeline(config, counters)
    origin = 1_700_000_000 * NS_PER_S
    timeline.start(origin)
    timeline.poll(origin)
    times: dict[str, list[float]] = {"total": [], "audio": [], "frames": [], "poll": []}
    for k in range(units + warmup):
        unit_start = origin + k * NS_PER_S
        begin = time.perf_counter_ns()
        for i in range(50):
            raw = RawAudio(unit_start + i * 20_000_000, rate, 1, "S16LE", pcm[i])
            timeline.push_audio(decode_audio(raw, counters))
        after_audio = time.perf_counter_ns()
        for i in range(FPS):
            image = RawImage(
                unit_start + i * NS_PER_S // FPS, "rgb8", images[i % 4], WIDTH, HEIGHT, WIDTH * 3
            )
            timeline.push_frame(image if lazy else decode_image(image))
        after_frames = time.perf_counter_ns()
        # +30 ms: a resampled unit also waits for the resampler's right-hand context.
        produced = timeline.poll(unit_start + NS_PER_S + config.watermark_ns + 30_000_000)
        end = time.perf_counter_ns()
        assert len(produced) == 1
        assert produced[0].frames[0].rgb.shape == (448, 448, 3)
        assert len(produced[0].audio) == RATE
        assert produced[0].gap_samples == 0
        if k >= warmup:
            times["total"].append((end - begin) / 1e6)
            times["audio"].append((after_audio - begin) / 1e6)
            times["frames"].append((after_frames - after_audio) / 1e6)
            times["poll"].append((end - after_frames) / 1e6)
    assert counters.dropped_audio_samples == 0
    assert counters.dropped_frames == 0
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=300)
    parser.add_argument("--lazy", action="store_true", help="push raw images, decode lazily")
    parser.add_argument("--filter", default="box", choices=["box", "bilinear"])
    parser.add_argument(
        "--rate", type=int, default=RATE, help="microphone rate (resampled to 16 kHz if not 16k)"
    )
    args = parser.parse_args()
    times = run(args.units, args.lazy, resize_filter=args.filter, rate=args.rate)
    print(
        f"core per 1 s unit ({'lazy' if args.lazy else 'eager'} image decode, {args.filter} "
        f"resize, {args.rate} Hz mic), {args.units} units, {platform.machine()} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    print(f"median {statistics.median(times['total']):.3f} ms")
    print(f"p95 {p95(times['total']):.3f} ms")
    for stage in ("audio", "frames", "poll"):
        print(
            f"  {stage:<6} median {statistics.median(times[stage]):.3f} ms, "
            f"p95 {p95(times[stage]):.3f} ms"
        )


def p95(values: list[float]) -> float:
    """95th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


if __name__ == "__main__":
    main()
