"""Per-unit round trip of the ``vllm_omni`` client against the loopback vllm-omni double (no model).

Runs ``--units`` units (1 s of 16 kHz audio + one 640x480 camera frame each; every fourth unit is
loud enough that the double's model starts a two-unit turn) through ``prefill`` + ``generate`` on
127.0.0.1 and reports median / p95 / max per unit, split into listen and speaking units. This is the
protocol overhead the client adds (JSON, base64, JPEG, the socket, the double's bookkeeping); a real
server adds its model time on top.

Example::

    .venv/bin/python benchmarks/vllm_omni_bench.py --units 60
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1] / "omni_ros"
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "test"))

from omni_ros.backends.vllm_omni import VllmOmniBackend, VllmOmniConfig  # noqa: E402
from omni_ros.core.clock import NS_PER_S  # noqa: E402
from omni_ros.core.types import Unit, VideoFrame  # noqa: E402
from unit.backends.loopback_vllm_server import LoopbackVllmServer  # noqa: E402


def make_unit(backend: VllmOmniBackend, index: int, loud: bool) -> Unit:
    first = index == 0
    start_ns = 0 if first else backend.first_unit_ns + (index - 1) * backend.unit_ns
    end_ns = start_ns + (backend.first_unit_ns if first else backend.unit_ns)
    n = (end_ns - start_ns) * backend.input_sample_rate // NS_PER_S
    rng = np.random.default_rng(index)
    level = 0.2 if loud else 1e-4
    audio = (level * rng.standard_normal(n)).clip(-1, 1).astype(np.float32)
    frame = VideoFrame(start_ns, rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8))
    return Unit(index, start_ns, end_ns, audio, backend.input_sample_rate, frames=(frame,))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=60)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    server = LoopbackVllmServer(continuation_period_s=30.0).start()
    backend = VllmOmniBackend(
        VllmOmniConfig(urls=(server.url,), heartbeat_interval_s=0.0, unit_timeout_s=10.0)
    )
    try:
        backend.prepare("Benchmark.", ref_voice=np.zeros(16000, np.float32) + 0.01)
        listen_ms: list[float] = []
        speak_ms: list[float] = []
        for index in range(args.units):
            unit = make_unit(backend, index, loud=index % 4 == 0)
            t0 = time.perf_counter()
            backend.prefill(unit)
            result = backend.generate()
            elapsed = (time.perf_counter() - t0) * 1e3
            (listen_ms if result.is_listen else speak_ms).append(elapsed)
    finally:
        backend.close()
        server.stop()

    def summary(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        return {
            "n": len(values),
            "median_ms": round(statistics.median(values), 2),
            "p95_ms": round(p95, 2),
            "max_ms": round(max(values), 2),
        }

    report = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "all": summary(listen_ms + speak_ms),
        "listen": summary(listen_ms),
        "speak": summary(speak_ms),
    }
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
