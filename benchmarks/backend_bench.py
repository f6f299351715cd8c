"""Per-unit compute of the ``reference`` backend (tiny on this CPU, full on a CUDA GPU).

Runs a session of ``--units`` units (one frame + 1 s of speech-like audio each) through
prefill + generate with a forced listen/speak schedule, so listen and speak units are both measured
whatever the random weights would choose. Reports median / p95 / max per-unit compute, the
real-time factor (compute / unit length: < 1 keeps up with the 1 Hz Omni-Flow clock) and per-stage
medians, split by listen vs speak units.

Examples::

    .venv/bin/python benchmarks/backend_bench.py                       # tiny, CPU
    .venv/bin/python benchmarks/backend_bench.py --threads 1 --json out.json
    python benchmarks/backend_bench.py --size full --device cuda --dtype bfloat16

The ``full`` size needs a GPU with ~25 GB free (bf16 weights ~19 GB + caches); it is built with
random weights directly on the GPU (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "omni_ros"))

import torch
from omni_ros.backends.reference import ReferenceBackend, ReferenceConfig
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.types import Unit, VideoFrame


def synth_unit(backend: ReferenceBackend, index: int, frames: int) -> Unit:
    """Unit ``index`` of a synthetic stream: voiced audio at the right length + VGA frames."""
    rate = backend.input_sample_rate
    if index == 0:
        start_ns, end_ns = 0, backend.first_unit_ns
    else:
        start_ns = backend.first_unit_ns + (index - 1) * backend.unit_ns
        end_ns = start_ns + backend.unit_ns
    n = (end_ns - start_ns) * rate // NS_PER_S
    rng = np.random.default_rng(index)
    t = np.arange(n) / rate + start_ns / NS_PER_S
    voiced = sum(np.sin(2 * np.pi * 150.0 * k * t) / k for k in range(1, 5))
    audio = (0.2 * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) * voiced).astype(np.float32)
    audio += 0.005 * rng.standard_normal(n).astype(np.float32)
    video = tuple(
        VideoFrame(
            stamp_ns=start_ns + k * (end_ns - start_ns) // max(frames, 1),
            rgb=rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8),
        )
        for k in range(frames)
    )
    return Unit(index, start_ns, end_ns, np.clip(audio, -1, 1), rate, frames=video)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({cpu}), no GPU used"


def bench(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ReferenceConfig.from_mapping(
        {
            "size": args.size,
            "device": args.device,
            "dtype": args.dtype,
            "seed": args.seed,
            "speak_schedule": args.schedule,
            "max_speak_tokens_per_unit": args.speak_tokens,
        }
    )
    backend = ReferenceBackend(config)
    t0 = time.perf_counter()
    backend.prepare("Streaming Omni Conversation.")
    build_s = time.perf_counter() - t0

    listen_ms: list[float] = []
    speak_ms: list[float] = []
    stages: dict[str, list[float]] = {}
    audio_s = 0.0
    units = [synth_unit(backend, i, args.frames) for i in range(args.warmup + args.units)]
    for i, unit in enumerate(units):
        t0 = time.perf_counter()
        backend.prefill(unit)
        result = backend.generate()
        elapsed_ms = (time.perf_counter() - t0) * 1e3
        if i < args.warmup:
            continue
        (listen_ms if result.is_listen else speak_ms).append(elapsed_ms)
        for stage, value in result.timings_ms.items():
            stages.setdefault(stage, []).append(value)
        if result.audio is not None:
            audio_s += result.audio.size / backend.output_sample_rate
    all_ms = listen_ms + speak_ms
    unit_ms = backend.unit_ns / 1e6
    report: dict[str, Any] = {
        "backend": "reference",
        "size": args.size,
        "device": args.device,
        "dtype": args.dtype,
        "machine": machine_name(args.device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "units": len(all_ms),
        "warmup_units": args.warmup,
        "schedule": config.speak_schedule,
        "frames_per_unit": args.frames,
        "max_speak_tokens_per_unit": args.speak_tokens,
        "build_and_prepare_s": round(build_s, 3),
        "median_ms": round(statistics.median(all_ms), 2),
        "p95_ms": round(percentile(all_ms, 95), 2),
        "max_ms": round(max(all_ms), 2),
        "rtf_median": round(statistics.median(all_ms) / unit_ms, 4),
        "rtf_p95": round(percentile(all_ms, 95) / unit_ms, 4),
        "listen_median_ms": round(statistics.median(listen_ms), 2) if listen_ms else None,
        "speak_median_ms": round(statistics.median(speak_ms), 2) if speak_ms else None,
        "speak_p95_ms": round(percentile(speak_ms, 95), 2) if speak_ms else None,
        "speech_out_s": round(audio_s, 2),
        "stage_median_ms": {k: round(statistics.median(v), 2) for k, v in stages.items()},
        "kv_cache_tokens_end": backend.kv_cache_tokens,
    }
    if args.device.startswith("cuda"):
        report["cuda_max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    backend.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--dtype", default=None, help="float32 (cpu default) or bfloat16 (cuda default)"
    )
    parser.add_argument("--units", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--schedule", default="LLSSSE", help="L listen, S speak, E speak + end turn"
    )
    parser.add_argument("--frames", type=int, default=1, help="camera frames per unit")
    parser.add_argument(
        "--speak-tokens", type=int, default=None, help="text tokens per speaking unit"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.speak_tokens is None:
        args.speak_tokens = 8 if args.size == "tiny" else 20  # MiniCPM-o decodes up to 20 per unit
    if args.size == "full" and not args.device.startswith("cuda"):
        parser.error("--size full is for GPUs: add --device cuda (it needs ~25 GB of GPU memory)")
    report = bench(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
