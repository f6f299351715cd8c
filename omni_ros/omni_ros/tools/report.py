"""Summaries and timeline plots of a replay, computed from the input bag and the OUTPUT bag.

Both replay modes (graph: a real node over DDS; direct: the core in process) write the same output
bag, so one code path turns it into ``summary.json`` and ``timeline.png``: what the robot heard and saw,
what it decided each unit, what it said, when it spoke unprompted, and how long each unit took.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.rosbag2 import Reader

from omni_ros.core.audio import decode_audio
from omni_ros.core.errors import DecodeError
from omni_ros.core.types import Counters
from omni_ros.tools.bagio import NS, InputBag, stamp_ns, to_raw_audio
from omni_ros.tools.typestore import omni_typestore

MODE_NAMES = {0: "LISTENING", 1: "SPEAKING", 2: "INTERRUPTED", 3: "PAUSED", 4: "ERROR"}


def _read_outputs(path: Path) -> dict[str, list[tuple[int, Any]]]:
    store = omni_typestore()
    out: dict[str, list[tuple[int, Any]]] = defaultdict(list)
    with Reader(path) as reader:
        for conn, log_ns, raw in reader.messages():
            out[
                conn.topic.rsplit("/", 1)[-1] if conn.topic != "/diagnostics" else "diagnostics"
            ].append((int(log_ns), store.deserialize_cdr(raw, conn.msgtype)))
    return out


def _mono(msg: Any) -> np.ndarray:
    """A (rosbags) AudioChunk as mono float32 through the core decoder; empty if undecodable
    (the node counted it as a decode error; a plot or a sum just leaves it out)."""
    try:
        return decode_audio(to_raw_audio(msg)).samples
    except DecodeError:
        return np.zeros(0, np.float32)


def summarize(
    input_bag: InputBag, outputs_path: Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything a robotics team wants to know about one replay, as plain JSON-able data."""
    out = _read_outputs(outputs_path)
    states = [m for _, m in out.get("state", [])]
    texts = [m for _, m in out.get("text", [])]
    speech = [m for _, m in out.get("speech", [])]
    proactive = [m for _, m in out.get("proactive", [])]
    compute = np.array([s.unit_compute_ms for s in states], dtype=np.float64)
    counters: dict[str, int] = {}
    if states:
        last = states[-1]
        for key in (
            "dropped_frames",
            "dropped_audio_samples",
            "late_messages",
            "gap_samples_filled",
        ):
            counters[key] = int(getattr(last, key))
    names = set(Counters().as_dict())
    for _, diag in out.get("diagnostics", [])[-1:]:
        for status in diag.status:
            for kv in status.values:
                if kv.key in names and kv.value.strip().lstrip("-").isdigit():
                    counters[kv.key] = max(counters.get(kv.key, 0), int(kv.value))
    turns: dict[int, dict[str, Any]] = {}
    for t in texts:
        turn = turns.setdefault(
            int(t.turn_id),
            {
                "turn_id": int(t.turn_id),
                "text": "",
                "proactive": bool(t.proactive),
                "start_s": None,
            },
        )
        turn["text"] += t.text
        if turn["start_s"] is None:
            turn["start_s"] = round((stamp_ns(t) - input_bag.start_ns) / NS, 3)
    speech_s = sum(len(_mono(m)) / m.sample_rate for m in speech)
    unit_s = 1.0
    if len(states) >= 2:
        unit_s = max(
            1e-3, (stamp_ns(states[-1]) - stamp_ns(states[0])) / NS / max(1, len(states) - 1)
        )
    modes: dict[str, int] = defaultdict(int)
    for s in states:
        modes[MODE_NAMES.get(int(s.mode), str(s.mode))] += 1
    summary: dict[str, Any] = {
        "input": {
            "bag": str(input_bag.path),
            "duration_s": round(input_bag.duration_ns / NS, 3),
            "messages": input_bag.message_count,
            "topics": input_bag.topics(),
        },
        "backend": states[-1].backend if states else None,
        "units": len(states),
        "unit_modes": dict(modes),
        "turns": len(turns),
        "turn_texts": sorted(turns.values(), key=lambda t: t["turn_id"]),
        "proactive_events": len(proactive),
        "proactive": [
            {
                "turn_id": int(p.turn_id),
                "kind": p.kind,
                "text": p.text,
                "confidence": round(float(p.confidence), 3),
                "trigger_s": round(
                    (p.trigger_stamp.sec * NS + p.trigger_stamp.nanosec - input_bag.start_ns) / NS,
                    3,
                ),
            }
            for p in proactive
        ],
        "speech_seconds": round(speech_s, 3),
        "speech_chunks": len(speech),
        "counters": counters,
        "unit_compute_ms": {
            "median": round(float(np.median(compute)), 3) if compute.size else None,
            "p95": round(float(np.percentile(compute, 95)), 3) if compute.size else None,
            "max": round(float(compute.max()), 3) if compute.size else None,
        },
        "real_time_factor": {
            "median": round(float(np.median(compute)) / (unit_s * 1000), 4)
            if compute.size
            else None,
            "max": round(float(compute.max()) / (unit_s * 1000), 4) if compute.size else None,
        },
        "outputs": {topic: len(msgs) for topic, msgs in sorted(out.items())},
    }
    if extra:
        summary.update(extra)
    return summary


def write_summary(summary: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def plot_timeline(input_bag: InputBag, outputs_path: Path, png: Path) -> None:
    """Input audio, frames, per-unit listen/speak, output speech, proactive markers, latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = input_bag.start_ns
    audio_t: list[np.ndarray] = []
    audio_v: list[np.ndarray] = []
    frame_t: list[float] = []
    for m in input_bag:
        if m.role == "mic":
            pcm = _mono(m.msg)
            step = max(1, int(m.msg.sample_rate) // 200)
            if len(pcm) < step:
                continue
            env = np.abs(pcm[: len(pcm) // step * step]).reshape(-1, step).max(axis=1)
            rate = int(m.msg.sample_rate)
            audio_t.append((stamp_ns(m.msg) - t0) / NS + np.arange(len(env)) * step / rate)
            audio_v.append(env)
        elif m.role in ("camera", "camera_compressed"):
            frame_t.append((stamp_ns(m.msg) - t0) / NS)
    out = _read_outputs(outputs_path)
    fig, axes = plt.subplots(
        6,
        1,
        figsize=(14, 10),
        sharex=True,
        gridspec_kw={"height_ratios": [2, 0.6, 0.8, 2, 0.6, 1.4]},
    )
    ax_in, ax_fr, ax_mode, ax_out, ax_pro, ax_lat = axes
    if audio_t:
        order = np.argsort(np.concatenate(audio_t))
        ax_in.plot(
            np.concatenate(audio_t)[order], np.concatenate(audio_v)[order], lw=0.6, color="tab:blue"
        )
    ax_in.set_ylabel("mic |x|")
    ax_fr.vlines(frame_t, 0, 1, color="tab:gray", lw=0.6)
    ax_fr.set_yticks([])
    ax_fr.set_ylabel("frames")
    # Per unit: red = the model spoke in it (an OmniText of that unit), green = it listened;
    # orange / black overlays mark units that ended INTERRUPTED or in ERROR.
    states = [m for _, m in out.get("state", [])]
    spoke = {int(t.unit_index) for _, t in out.get("text", []) if t.text}
    for k, s in enumerate(states):
        end = (stamp_ns(s) - t0) / NS  # OmniState is stamped at the end of its unit
        start = (stamp_ns(states[k - 1]) - t0) / NS if k > 0 else end - 1.0
        colour = "tab:red" if int(s.unit_index) in spoke else "tab:green"
        if int(s.mode) in (2, 4):
            colour = "tab:orange" if int(s.mode) == 2 else "black"
        ax_mode.axvspan(start, end, color=colour, alpha=0.6, lw=0)
    ax_mode.set_yticks([])
    ax_mode.set_ylabel("unit\n(green listen,\nred speak)")
    for m in (msg for _, msg in out.get("speech", [])):
        pcm = _mono(m)
        step = max(1, m.sample_rate // 200)
        if len(pcm) >= step:
            env = np.abs(pcm[: len(pcm) // step * step]).reshape(-1, step).max(axis=1)
            ax_out.plot(
                (stamp_ns(m) - t0) / NS + np.arange(len(env)) * step / m.sample_rate,
                env,
                lw=0.6,
                color="tab:red",
            )
    ax_out.set_ylabel("speech |y|")
    for m in (msg for _, msg in out.get("proactive", [])):
        trig = (m.trigger_stamp.sec * NS + m.trigger_stamp.nanosec - t0) / NS
        ax_pro.axvline(trig, color="tab:purple")
        ax_pro.text(trig, 0.5, f" {m.kind}", va="center", fontsize=8)
    ax_pro.set_yticks([])
    ax_pro.set_ylabel("proactive")
    if states:
        ax_lat.plot(
            [(stamp_ns(s) - t0) / NS for s in states],
            [s.unit_compute_ms for s in states],
            marker=".",
            lw=0.8,
        )
    ax_lat.set_ylabel("unit compute\n[ms]")
    ax_lat.set_xlabel("bag time [s]")
    backend = states[-1].backend if states else "?"
    fig.suptitle(f"omni_ros replay of {input_bag.path.name} (backend: {backend})")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
