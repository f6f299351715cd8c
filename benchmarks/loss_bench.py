"""Where microphone audio goes on a busy machine (issue 15): the real omni_flow_node on the
system clock, a live 50 ms microphone (``flow_harness.RealTimeMic``, in this process) and
``--hogs`` CPU-bound processes for ``--seconds``; the node runs ``--node-nice`` (the hogs at
``--hog-nice``), so the node's threads are the ones starved.

Prints what was sent (and how late the publisher itself was), what the node received, used and
dropped by cause (its last ``/diagnostics``), and whether it all adds up: samples sent after the
node's first = ``audio_samples_in``, ``in = used + dropped + held`` (held: at most the echo
canceller's unfinished 20 ms frame).

    python benchmarks/loss_bench.py [--seconds 60] [--hogs 3] [--node-nice 10] [--hog-nice 5]
        [--backend speak_until_interrupted_double | reference]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "omni_ros" / "test" / "ros")]

from flow_harness import (  # noqa: E402
    CHUNK_NS,
    CHUNK_SAMPLES,
    NS_PER_S,
    NodeProcess,
    RealTimeMic,
    diag_values,
    running,
    wait_for,
)

HOG = "import os, sys; os.nice(int(sys.argv[1]))\nwhile True: pass"


def latest(probe: object) -> dict[str, int]:
    for msg in reversed(probe.snapshot("diag")):  # type: ignore[attr-defined]
        values = diag_values(msg)
        if values and "audio_samples_in" in values:
            return {k: int(v) for k, v in values.items() if v.isdigit()}
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--hogs", type=int, default=3)
    parser.add_argument("--node-nice", type=int, default=10)
    parser.add_argument("--hog-nice", type=int, default=5)
    parser.add_argument("--backend", default="speak_until_interrupted_double")
    args = parser.parse_args()
    params: dict[str, object] = {"backend": args.backend, "diagnostics.period_s": 0.5}
    if args.backend == "reference":
        params["reference.size"] = "tiny"
    with tempfile.TemporaryDirectory() as tmp:
        proc = NodeProcess.with_doubles(params, Path(tmp) / "node.log")
        os.setpriority(os.PRIO_PROCESS, proc.proc.pid, args.node_nice)
        with running(proc) as probe:
            wait_for(lambda: probe.mic_pub.get_subscription_count() > 0, 120, "mic sub", proc)
            mic = RealTimeMic(probe)
            mic.start()
            wait_for(lambda: probe.count("state") >= 2, 120, "two units", proc)
            base = latest(probe)
            hogs = [
                subprocess.Popen([sys.executable, "-c", HOG, str(args.hog_nice)])
                for _ in range(args.hogs)
            ]
            t0 = time.monotonic()
            try:
                time.sleep(args.seconds)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
            loaded_s = time.monotonic() - t0
            time.sleep(3)  # the machine free again: the node catches up
            during = latest(probe)
            mic.stop()
            first = next(s for s in probe.snapshot("state") if s.unit_index == 0)
            origin_ns = first.header.stamp.sec * NS_PER_S + first.header.stamp.nanosec
            origin_ns -= NS_PER_S  # its end: unit 0 of the doubles is 1 s long
            sent = mic.sent_samples - (origin_ns - mic.start_ns) // CHUNK_NS * CHUNK_SAMPLES

            def settled() -> bool:
                v = latest(probe)
                held = v.get("audio_samples_in", -1) - v.get("audio_samples_used", 0)
                return (
                    v.get("audio_samples_in", -1) == sent
                    and 0 <= held - v.get("dropped_audio_samples", 0) < 320
                )

            try:
                wait_for(settled, 20, "the counters to settle")
                settle = "adds up"
            except AssertionError:
                settle = "DOES NOT ADD UP"
            v = latest(probe)
        late_pub = sum(d > 200_000_000 for d in mic.delays_ns)
        print(f"{args.hogs} hogs (nice {args.hog_nice}) for {loaded_s:.0f} s, node nice "
              f"{args.node_nice}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        print(f"publisher: {len(mic.delays_ns)} chunks, {late_pub} published > 200 ms after "
              f"capture, worst {max(mic.delays_ns) / 1e6:.0f} ms")  # fmt: skip
        drops = {k[14:]: v[k] for k in v if k.startswith("audio_dropped_") and v[k]}
        gaps = {k[11:]: during[k] - base.get(k, 0) for k in during if k.startswith("gap_filled_")}
        print(f"sent after the node's first chunk {sent}, audio_samples_in "
              f"{v['audio_samples_in']}, used {v['audio_samples_used']}, dropped "
              f"{v['dropped_audio_samples']} {drops}, held "
              f"{v['audio_samples_in'] - v['audio_samples_used'] - v['dropped_audio_samples']}: "
              f"{settle}")  # fmt: skip
        print(f"gaps filled while loaded (+3 s) {gaps}")
        print(f"units_dropped_overrun {v['units_dropped_overrun']}, late_messages "
              f"{v['late_messages']}")  # fmt: skip


if __name__ == "__main__":
    main()
