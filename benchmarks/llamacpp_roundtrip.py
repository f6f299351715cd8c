"""Per-unit round trip of the ``llamacpp_omni`` client against its loopback server doubles (no model).

Runs ``--units`` units (1 s of speech-like audio + one 640x480 frame each) through prefill + generate
against ``LoopbackLlamaServer`` (test/unit/backends/loopback_llama_server.py) on 127.0.0.1, for
``llama-omni-server`` over WebSocket and HTTP and ``llama-server`` over HTTP. The double answers at
once, so the figures are what the client and the protocol add per unit. Units are paced
``--pace-s`` apart (real units are 1 s apart; speech arrives asynchronously in between). Units split
by what they returned: listen, speak (text), tail (the turn's late speech, which waits up to
``audio_wait_s`` for the final window) and idle (WebSocket: no event, waits ``unit_quiet_s``).

Example::

    .venv/bin/python benchmarks/llamacpp_roundtrip.py --units 60 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "omni_ros"))
sys.path.insert(0, str(ROOT / "omni_ros" / "test"))

from omni_ros.backends.llamacpp_omni import LlamaCppOmniBackend, LlamaCppOmniConfig  # noqa: E402
from unit.backends.contract import make_unit  # noqa: E402
from unit.backends.loopback_llama_server import (  # noqa: E402
    LLAMA_OMNI_SERVER,
    LLAMA_SERVER,
    LoopbackLlamaServer,
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_case(
    generation: str, transport: str, units: int, pace_s: float, work: Path
) -> dict[str, Any]:
    model_dir = work / "gguf"  # the layout llama-server's omni_init checks for (empty files)
    for role in ("audio", "tts", "vision"):
        (model_dir / role).mkdir(parents=True, exist_ok=True)
        (model_dir / role / f"MiniCPM-o-4_5-{role}-F16.gguf").write_bytes(b"GGUF")
    server = LoopbackLlamaServer(tts_delay_s=0.02, generation=generation, teardown_s=0.05).start()
    settings: dict[str, Any] = {"url": server.url, "transport": transport, "server": generation}
    if transport == "http":
        settings.update(work_dir=str(work / f"shared_{generation}"), model_dir=str(model_dir))
    backend = LlamaCppOmniBackend(LlamaCppOmniConfig.from_mapping(settings))
    by_kind: dict[str, list[float]] = {"listen": [], "speak": [], "tail": [], "idle": []}
    try:
        backend.prepare("Streaming Omni Conversation.")
        for index in range(units):
            # Speech every 6th unit starts a two-unit turn; every 11th unit idles (WS: no event).
            if index % 11 == 5:
                server.unit_script = ["idle"]
            unit = make_unit(backend, index, speech=index % 6 == 0, frames=1)
            idle_before = backend.metrics()["idle_units"]
            t0 = time.perf_counter()
            backend.prefill(unit)
            result = backend.generate()
            ms = (time.perf_counter() - t0) * 1e3
            if backend.metrics()["idle_units"] != idle_before:
                kind = "idle"
            elif result.is_listen:
                kind = "listen"
            else:
                kind = "speak" if result.text else "tail"
            by_kind[kind].append(ms)
            time.sleep(max(pace_s - ms / 1e3, 0.0))
    finally:
        backend.close()
        server.stop()
    out: dict[str, Any] = {"generation": generation, "transport": transport}
    answered = by_kind["listen"] + by_kind["speak"]
    out["answered_median_ms"] = round(statistics.median(answered), 2)
    out["answered_p95_ms"] = round(percentile(answered, 95), 2)
    for kind, values in by_kind.items():
        if values:
            out[f"{kind}_n"] = len(values)
            out[f"{kind}_median_ms"] = round(statistics.median(values), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, default=60)
    parser.add_argument("--pace-s", type=float, default=0.2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for generation, transport in (
            (LLAMA_OMNI_SERVER, "websocket"),
            (LLAMA_OMNI_SERVER, "http"),
            (LLAMA_SERVER, "http"),
        ):
            rows.append(run_case(generation, transport, args.units, args.pace_s, Path(tmp)))
    report = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "rows": rows}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
