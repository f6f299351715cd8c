"""How long huge camera frames hold omni_flow_node's executor (issue 16).

Runs the real node (test backend double, so only the ROS side is measured) and a camera process
publishing ``--side`` x ``--side`` rgb8 frames (4624: 64 MB, refused by the 3840x2160 limit) at
``--fps``, both with the shipped Fast DDS profile. Meanwhile a probe calls the node's lifecycle
``get_state`` back to back; an answer takes as long as the executor is busy with something else.
Prints the get_state latencies (median, p95, max), the CPU time of the node's executor thread
(its main thread) over the run, and what the node counted.

    python benchmarks/big_image_bench.py [--side 4624] [--fps 2] [--count 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _camera_node import camera_node, start_camera
from flow_harness import diag_values, wait_for


def main_thread_cpu_s(pid: int) -> float:
    """CPU time (user + system) of a process's main thread, the one that spins its executor."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4624)
    parser.add_argument("--fps", type=int, default=2)
    parser.add_argument("--count", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        control = Path(tmp) / "control"
        control.mkdir()
        params = {"backend": "faulty_double", "faulty_double.control_dir": str(control),
                  "diagnostics.period_s": 0.5}  # fmt: skip
        with camera_node(params, Path(tmp)) as (proc, probe):
            from lifecycle_msgs.srv import GetState

            client = probe.node.create_client(
                GetState, f"{proc.namespace}/omni_flow_node/get_state"
            )
            probe.call(client, GetState.Request(), proc, timeout_s=60)
            wait_for(lambda: probe.count("diag") > 0, 60, "diagnostics", proc)
            sender = start_camera(proc, args.side, args.side, args.fps, args.count)
            latencies: list[float] = []
            cpu_before = main_thread_cpu_s(proc.proc.pid)
            while sender.poll() is None:
                started = time.monotonic()
                future = client.call_async(GetState.Request())
                wait_for(future.done, 30, "get_state", proc)
                latencies.append((time.monotonic() - started) * 1000)
                time.sleep(0.02)
            time.sleep(1.5)  # the last diagnostics
            cpu = main_thread_cpu_s(proc.proc.pid) - cpu_before
            values = next((v for v in map(diag_values, reversed(probe.snapshot("diag"))) if v), {})
            proc.interrupt_and_wait()
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    print(
        f"frames {args.side}x{args.side} rgb8 ({args.side * args.side * 3 / 1e6:.1f} MB) x "
        f"{args.count} at {args.fps} fps: get_state n={len(latencies)} median "
        f"{statistics.median(latencies):.1f} ms, p95 {p95:.1f} ms, max {latencies[-1]:.1f} ms; "
        f"the node's executor thread used {cpu * 1000:.0f} ms of CPU meanwhile; "
        f"node counted oversize_images={values.get('oversize_images', '-')}, "
        f"decode_errors={values.get('decode_errors', '-')}, "
        f"dropped_frames={values.get('dropped_frames', '-')}"
    )


if __name__ == "__main__":
    main()
