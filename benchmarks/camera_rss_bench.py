"""omni_flow_node's memory while a camera publishes 1920x1080 rgb8 at 60 fps (issue 16).

Runs the real node (``--backend faulty_double``: a test double that answers every unit at once,
so only input handling is measured; ``--backend reference`` for the reference model) and a camera
process publishing ``--width`` x ``--height`` rgb8 at ``--fps`` for ``--seconds``, both with the
shipped Fast DDS profile (config/fastdds_camera.xml). Samples the node's RSS from /proc every
second and prints it before the camera starts, its maximum, and at the end.

    python benchmarks/camera_rss_bench.py [--seconds 60] [--fps 60] [--width 1920 --height 1080]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _camera_node import camera_node, start_camera
from flow_harness import wait_for


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--fps", type=int, default=60)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--backend", default="faulty_double")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        control = Path(tmp) / "control"
        control.mkdir()
        params: dict[str, object] = {"backend": args.backend, "diagnostics.period_s": 1.0}
        if args.backend == "faulty_double":
            params["faulty_double.control_dir"] = str(control)
        if args.backend == "reference":
            params["reference.size"] = "tiny"
        with camera_node(params, Path(tmp)) as (proc, probe):
            wait_for(lambda: probe.count("diag") > 0, 120, "diagnostics", proc)
            time.sleep(2.0)
            pid = proc.proc.pid
            before = rss_mb(pid)
            count = args.fps * args.seconds
            started = time.monotonic()
            sender = start_camera(proc, args.width, args.height, args.fps, count)
            samples: list[float] = []
            while sender.poll() is None:
                samples.append(rss_mb(pid))
                time.sleep(1.0)
            elapsed = time.monotonic() - started
            after = rss_mb(pid)
            states = probe.count("state")
            proc.interrupt_and_wait()
    print(
        f"{args.width}x{args.height} rgb8, {count} frames asked at {args.fps} fps, sent in "
        f"{elapsed:.0f} s ({count / max(elapsed, 1e-9):.0f} fps achieved), backend {args.backend}: "
        f"node RSS {before:.0f} MB before, max {max(samples, default=after):.0f} MB, "
        f"{after:.0f} MB at the end; {states} OmniState messages"
    )


if __name__ == "__main__":
    main()
