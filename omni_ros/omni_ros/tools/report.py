"""Summaries and timeline plots of a replay, computed from the input bag and the OUTPUT bag.

Both replay modes (graph: a real node over DDS; direct: the core in process) write the same output
bag, so one code path turns it into ``summary.json`` and ``timeline.png``: what the robot heard and saw,
what it decided each unit, what it said, when the user barged in and what was cut, when it spoke
unprompted, and how long each unit took.

Conventions (all of them tested):

- Times are seconds on the bag axis from its *origin*: the earlier of the bag's first log time and
  the first input stamp (a microphone chunk is stamped at its first sample, before it is logged),
  so no time is negative.
- A unit is counted once: the flow publishes an extra ``OmniState`` at a flush (it repeats the last
  unit's index), which is a flush event, not a unit.
- ``unit_modes`` says what each unit did: ``SPEAKING`` for every unit that produced speech (the last
  unit of a turn included, whose own ``OmniState`` already reads LISTENING), else the mode its
  ``OmniState`` reported. The raw per-unit states are in ``state_modes``.
- Flushes come from ``omni/speech_flush`` when the bag has it, else from those extra states.
- ``gap_samples_filled`` leaves out the zero padding of the last unit past the end of the input
  audio (``tail_padding_samples``): a clean bag has no gap.
- ``speaker`` (with ``speaker/playback`` in the outputs: ``replay --with-speaker``, ``make demo``):
  what ``speaker_node`` reported it played, per chunk when it was heard, and how many were late;
  the timeline draws it under the scheduled speech.
- User speech segments are the core's VAD run on the input microphone, on the capture clock (the
  node's own decisions, ``omni/user_speaking``, come later by the VAD's debounce and hangover; they
  are reported and drawn beside them when the bag has them). A bag recorded on a robot has the
  robot's echo in its microphone, which this offline VAD hears too (the node cancels it first).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.rosbag2 import Reader

from omni_ros.core.audio import decode_audio
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import DecodeError
from omni_ros.core.types import AudioBlock, Counters
from omni_ros.tools.bagio import InputBag, stamp_ns, to_raw_audio
from omni_ros.tools.typestore import omni_typestore

MODE_NAMES = {0: "LISTENING", 1: "SPEAKING", 2: "INTERRUPTED", 3: "PAUSED", 4: "ERROR"}
MODE_COLOURS = {
    "LISTENING": "tab:green",
    "SPEAKING": "tab:red",
    "INTERRUPTED": "tab:orange",
    "PAUSED": "tab:gray",
    "ERROR": "black",
}
FLUSH_REASONS = {0: "barge_in", 1: "interrupt", 2: "reset", 3: "error", 4: "stop"}
#: Rate the timeline counts samples at: every backend takes 16 kHz input (Backend.input_sample_rate).
TIMELINE_RATE = 16_000
#: A response is the first speech scheduled within this long after the user stopped talking.
RESPONSE_WINDOW_NS = 5 * NS_PER_S


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


def _time_ns(t: Any) -> int:
    return int(t.sec) * NS_PER_S + int(t.nanosec)


@dataclass
class Flush:
    """One cancelled span of speech, on the bag clock (ns)."""

    onset_ns: int  # barge-in: when the user's speech began; else when it was decided
    decided_ns: int
    dropped_from_ns: int
    dropped_until_ns: int
    reason: str
    turn_id: int | None


@dataclass
class Conversation:
    """What a replay's outputs say about the conversation (bag clock, ns)."""

    origin_ns: int
    mic_end_ns: int
    mic: list[tuple[int, int, np.ndarray]]  # (stamp, rate, mono samples) per mic chunk
    frames_ns: list[int]
    units: list[tuple[int, Any]]  # (log, OmniState): one per unit, first state of each index
    spoke: set[int]
    speech: list[tuple[int, Any]]  # (log, AudioChunk)
    flushes: list[Flush]
    user_segments: list[tuple[int, int]]
    published_user: list[tuple[int, int]] = field(default_factory=list)
    out: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)

    def s(self, ns: int) -> float:
        """Seconds on the bag axis."""
        return round((ns - self.origin_ns) / NS_PER_S, 3)

    def cancelled(self, msg: Any) -> bool:
        """Whether a speech chunk lies in a flushed span (a player must not play it)."""
        start = stamp_ns(msg)
        turn = getattr(msg, "turn_id", None)
        for f in self.flushes:
            inside = f.dropped_from_ns <= start < max(f.dropped_until_ns, f.dropped_from_ns + 1)
            if inside and (turn is None or f.turn_id is None or int(turn) <= f.turn_id):
                return True
        return False


def _published_user_speaking(out: dict[str, list[tuple[int, Any]]]) -> list[tuple[int, int]]:
    """(start, end) of each stretch the node published ``omni/user_speaking`` true (log times:
    when the node decided, so they lag the speech by the VAD's debounce and hangover)."""
    segments: list[tuple[int, int]] = []
    start: int | None = None
    for log, msg in out.get("user_speaking", []):
        if msg.data and start is None:
            start = log
        elif not msg.data and start is not None:
            segments.append((start, log))
            start = None
    if start is not None:
        segments.append((start, out["user_speaking"][-1][0]))
    return segments


def _user_segments(mic: list[tuple[int, int, np.ndarray]]) -> list[tuple[int, int]]:
    """(start, end) of each stretch of user speech on the capture clock: the core's VAD (the one
    the node runs, same settings) over the input microphone. Stamped at the speech itself, not at
    the decision, so response latencies are measured from when the user really stopped."""
    from omni_ros.core.audio import StreamResampler
    from omni_ros.core.vad import VadEventKind, VoiceActivityDetector

    vad = VoiceActivityDetector()
    open_ns: int | None = None
    segments = []
    resamplers: dict[int, StreamResampler] = {}
    for stamp, rate, samples in sorted(mic, key=lambda m: m[0]):
        if rate != TIMELINE_RATE:
            rs = resamplers.setdefault(rate, StreamResampler(rate, TIMELINE_RATE))
            samples = rs.process(samples)
        if not len(samples):
            continue
        for event in vad.process(AudioBlock(stamp, TIMELINE_RATE, samples)):
            if event.kind is VadEventKind.ONSET:
                open_ns = event.stamp_ns
            elif open_ns is not None:
                segments.append((open_ns, event.stamp_ns))
                open_ns = None
    if open_ns is not None and mic:
        segments.append((open_ns, max(s + len(x) * NS_PER_S // r for s, r, x in mic)))
    return segments


def _classified_states(out: dict[str, list[tuple[int, Any]]]) -> list[tuple[int, Any, bool]]:
    """(log, OmniState, is_extra) in log order. The flow's extra state at a flush repeats the index
    of the unit reported just before it, stamped at the flush instead of the unit's end. Indices
    restart at 0 after a clock jump (a looping bag), so a repeated index further back is a new
    unit; and a replayed pass logs its units at the same bag times as the first, so the same
    index with the same stamp is the next pass's unit, not a flush."""
    classified = []
    previous: tuple[int, int] | None = None
    for log, state in out.get("state", []):
        key = (int(state.unit_index), stamp_ns(state))
        extra = previous is not None and key[0] == previous[0] and key[1] != previous[1]
        classified.append((log, state, extra))
        if not extra:
            previous = key
    return classified


def _flushes(out: dict[str, list[tuple[int, Any]]], speech: list[tuple[int, Any]]) -> list[Flush]:
    if out.get("speech_flush"):
        return [
            Flush(
                onset_ns=_time_ns(m.onset),
                decided_ns=stamp_ns(m),
                dropped_from_ns=_time_ns(m.dropped_from),
                dropped_until_ns=_time_ns(m.dropped_until),
                reason=FLUSH_REASONS.get(int(m.reason), str(m.reason)),
                turn_id=int(m.turn_id),
            )
            for _, m in out["speech_flush"]
        ]
    # No flush topic (older node): the flow's extra OmniState at a flush, stamped at the flush's
    # own stamp and logged when it was decided; the span ends where scheduled speech ended.
    flushes: list[Flush] = []
    for log, state, extra in _classified_states(out):
        if extra:
            onset = stamp_ns(state)
            ends = [
                stamp_ns(m) + len(_mono(m)) * NS_PER_S // max(1, int(m.sample_rate))
                for slog, m in speech
                if slog <= log
            ]
            until = max([onset, *ends])
            flushes.append(Flush(onset, log, onset, until, "flush", None))
    return flushes


def analyse(input_bag: InputBag, outputs_path: Path) -> Conversation:
    """Read both bags once and derive units, flushes, speech and user speech on the bag axis."""
    out = _read_outputs(outputs_path)
    mic: list[tuple[int, int, np.ndarray]] = []
    frames: list[int] = []
    first_stamp = input_bag.start_ns
    for m in input_bag:
        if m.role == "mic":
            pcm = _mono(m.msg)
            mic.append((stamp_ns(m.msg), int(m.msg.sample_rate), pcm))
            first_stamp = min(first_stamp, stamp_ns(m.msg))
        elif m.role in ("camera", "camera_compressed"):
            frames.append(stamp_ns(m.msg))
            first_stamp = min(first_stamp, stamp_ns(m.msg))
    origin = min(input_bag.start_ns, first_stamp)
    mic_end = max((s + len(x) * NS_PER_S // r for s, r, x in mic if r > 0), default=origin)
    units = [(log, st) for log, st, extra in _classified_states(out) if not extra]
    speech = sorted(out.get("speech", []), key=lambda e: e[0])
    # Speech is published right before its unit's OmniState: each chunk belongs to the unit whose
    # state was logged nearest to it (the neighbours are a unit length away).
    spoke = {int(t.unit_index) for _, t in out.get("text", []) if t.text}
    if units:
        logs = np.array([log for log, _ in units], dtype=np.int64)
        for log, _msg in speech:
            k = int(np.argmin(np.abs(logs - log)))
            spoke.add(int(units[k][1].unit_index))
    return Conversation(
        origin_ns=origin,
        mic_end_ns=mic_end,
        mic=mic,
        frames_ns=frames,
        units=units,
        spoke=spoke,
        speech=speech,
        flushes=_flushes(out, speech),
        user_segments=_user_segments(mic),
        published_user=_published_user_speaking(out),
        out=out,
    )


def _playback(conv: Conversation) -> list[dict[str, Any]]:
    """What ``speaker_node`` reported it played (``speaker/playback``), one entry per chunk:
    when it was heard from, how many seconds of it (a cut chunk up to the cut), late, cut."""
    chunks: dict[tuple[int, int], dict[str, Any]] = {}
    for _log, r in conv.out.get("playback", []):
        key = (int(r.turn_id), _time_ns(r.scheduled))
        rate = max(1, int(r.sample_rate))
        entry = chunks.setdefault(
            key,
            {
                "heard_ns": stamp_ns(r),
                "scheduled_ns": key[1],
                "turn_id": key[0],
                "late": bool(r.late),
                "cut": False,
                "seconds": int(r.samples) / rate,
            },
        )
        if bool(r.cut):  # the second report of a chunk a flush stopped: heard up to here
            entry["cut"] = True
            entry["seconds"] = int(r.samples) / rate
    return sorted(chunks.values(), key=lambda c: c["heard_ns"])


def _responses(conv: Conversation) -> list[dict[str, Any]]:
    """Per end of user speech: how long until the first speech sample was scheduled to play."""
    events = []
    starts = sorted(stamp_ns(m) for _, m in conv.speech if not conv.cancelled(m))
    for k, (seg_start, seg_end) in enumerate(conv.user_segments):
        nxt = conv.user_segments[k + 1][0] if k + 1 < len(conv.user_segments) else None
        after = [t for t in starts if seg_end <= t < seg_end + RESPONSE_WINDOW_NS]
        if nxt is not None:
            after = [t for t in after if t < nxt]
        if after:
            events.append(
                {
                    "user_speech_s": [conv.s(seg_start), conv.s(seg_end)],
                    "speech_at_s": conv.s(after[0]),
                    "latency_ms": round((after[0] - seg_end) / 1e6, 1),
                }
            )
    return events


def _flush_events(conv: Conversation) -> list[dict[str, Any]]:
    events = []
    for f in conv.flushes:
        user = [
            s for s, e in conv.user_segments if s <= f.decided_ns and e >= f.onset_ns - NS_PER_S
        ]
        event: dict[str, Any] = {
            "reason": f.reason,
            "onset_s": conv.s(f.onset_ns),
            "decided_s": conv.s(f.decided_ns),
            "latency_ms": round((f.decided_ns - f.onset_ns) / 1e6, 1),
            "dropped_s": [conv.s(f.dropped_from_ns), conv.s(f.dropped_until_ns)],
        }
        if user:
            event["user_onset_s"] = conv.s(user[-1])
            event["latency_from_user_onset_ms"] = round((f.decided_ns - user[-1]) / 1e6, 1)
        if f.turn_id is not None:
            event["turn_id"] = f.turn_id
        events.append(event)
    return events


def summarize(
    input_bag: InputBag, outputs_path: Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything a robotics team wants to know about one replay, as plain JSON-able data."""
    conv = analyse(input_bag, outputs_path)
    out = conv.out
    unit_states = [m for _, m in conv.units]
    texts = [m for _, m in out.get("text", [])]
    proactive = [m for _, m in out.get("proactive", [])]
    compute = np.array([s.unit_compute_ms for s in unit_states], dtype=np.float64)
    counters: dict[str, int] = {}
    states = [m for _, m in out.get("state", [])]
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
    # The last unit reaches past the end of the input audio; its zero padding is not a gap.
    last_end = max((stamp_ns(s) for s in unit_states), default=conv.mic_end_ns)
    tail = max(0, (last_end - conv.mic_end_ns) * TIMELINE_RATE // NS_PER_S)
    if "gap_samples_filled" in counters:
        tail = min(tail, counters["gap_samples_filled"])
        counters["gap_samples_filled"] -= tail
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
            turn["start_s"] = conv.s(stamp_ns(t))
    speech_s = sum(len(_mono(m)) / m.sample_rate for _, m in conv.speech)
    cancelled_s = sum(len(_mono(m)) / m.sample_rate for _, m in conv.speech if conv.cancelled(m))
    unit_s = 1.0
    if len(unit_states) >= 2:
        unit_s = max(
            1e-3,
            (stamp_ns(unit_states[-1]) - stamp_ns(unit_states[0]))
            / NS_PER_S
            / (len(unit_states) - 1),
        )
    modes: dict[str, int] = defaultdict(int)
    raw_modes: dict[str, int] = defaultdict(int)
    for s in unit_states:
        name = MODE_NAMES.get(int(s.mode), str(s.mode))
        raw_modes[name] += 1
        modes["SPEAKING" if int(s.unit_index) in conv.spoke else name] += 1
    flushes = _flush_events(conv)
    responses = _responses(conv)
    played = _playback(conv)
    speaker: dict[str, Any] | None = None
    if "playback" in out or "playing" in out:
        starts = [c["heard_ns"] - c["scheduled_ns"] for c in played]
        speaker = {
            "chunks_heard": len(played),
            "late_chunks": sum(1 for c in played if c["late"]),
            "cut_chunks": sum(1 for c in played if c["cut"]),
            "heard_seconds": round(sum(c["seconds"] for c in played), 3),
            "heard_minus_scheduled_ms": _stats([d / 1e6 for d in starts]),
            "played_s": [
                [conv.s(c["heard_ns"]), conv.s(c["heard_ns"] + round(c["seconds"] * NS_PER_S))]
                for c in played
            ],
        }
    barge_ins = [f for f in flushes if f["reason"] in ("barge_in", "flush")]
    summary: dict[str, Any] = {
        "input": {
            "bag": str(input_bag.path),
            "duration_s": round(input_bag.duration_ns / NS_PER_S, 3),
            "messages": input_bag.message_count,
            "topics": input_bag.topics(),
            "origin_ns": conv.origin_ns,
        },
        "backend": unit_states[-1].backend if unit_states else None,
        "units": len(unit_states),
        "unit_indices": [int(unit_states[0].unit_index), int(unit_states[-1].unit_index)]
        if unit_states
        else None,
        "unit_modes": dict(modes),
        "state_modes": dict(raw_modes),
        "turns": len(turns),
        "turn_texts": sorted(turns.values(), key=lambda t: t["turn_id"]),
        "proactive_events": len(proactive),
        "proactive": [
            {
                "turn_id": int(p.turn_id),
                "kind": p.kind,
                "text": p.text,
                "confidence": round(float(p.confidence), 3),
                "trigger_s": conv.s(_time_ns(p.trigger_stamp)),
            }
            for p in proactive
        ],
        "user_speech": [[conv.s(a), conv.s(b)] for a, b in conv.user_segments],
        "user_speaking_published": [[conv.s(a), conv.s(b)] for a, b in conv.published_user],
        "responses": responses,
        "response_latency_ms": _stats([r["latency_ms"] for r in responses]),
        "flushes": flushes,
        "barge_in_latency_ms": _stats([b["latency_ms"] for b in barge_ins]),
        "speech_seconds": round(speech_s, 3),
        "speech_seconds_cancelled": round(cancelled_s, 3),
        "speech_chunks": len(conv.speech),
        # speaker_node's playback reports (replay --with-speaker, make demo); None without them.
        "speaker": speaker,
        "counters": counters,
        "tail_padding_samples": int(tail),
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


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p95": None}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "median": round(float(np.median(arr)), 1),
        "p95": round(float(np.percentile(arr, 95)), 1),
    }


def write_summary(summary: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def _envelope(samples: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray] | None:
    step = max(1, rate // 200)
    if len(samples) < step:
        return None
    env = np.abs(samples[: len(samples) // step * step]).reshape(-1, step).max(axis=1)
    return np.arange(len(env)) * step / rate, env


def plot_timeline(input_bag: InputBag, outputs_path: Path, png: Path) -> None:
    """User speech, frames, unit modes, robot speech with flushes, proactive turns, compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    conv = analyse(input_bag, outputs_path)
    s = conv.s
    fig, axes = plt.subplots(
        6,
        1,
        figsize=(17, 11),
        sharex=True,
        gridspec_kw={"height_ratios": [2, 0.5, 0.8, 2, 0.6, 1.5]},
    )
    ax_in, ax_fr, ax_mode, ax_out, ax_pro, ax_lat = axes

    # Microphone and the user's speech.
    for stamp, rate, pcm in conv.mic:
        env = _envelope(pcm, rate)
        if env is not None:
            ax_in.plot(s(stamp) + env[0], env[1], lw=0.5, color="tab:blue")
    for a, b in conv.user_segments:
        ax_in.axvspan(s(a), s(b), color="tab:cyan", alpha=0.25, lw=0)
    peak = max((float(np.abs(x).max()) for _, _, x in conv.mic if len(x)), default=1.0)
    for a, b in conv.published_user:
        ax_in.plot([s(a), s(b)], [peak * 1.05] * 2, color="black", lw=3, solid_capstyle="butt")
    ax_in.set_ylabel("microphone |x|")
    ax_in.legend(
        handles=[
            Line2D([], [], color="tab:blue", lw=1, label="microphone"),
            Patch(color="tab:cyan", alpha=0.35, label="user speech (VAD, capture time)"),
            Line2D([], [], color="black", lw=3, label="omni/user_speaking (as published)"),
            Line2D([], [], color="tab:orange", ls="--", label="barge-in onset"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.005, 1.0),
        fontsize=8,
    )

    ax_fr.vlines([s(t) for t in conv.frames_ns], 0, 1, color="tab:gray", lw=0.6)
    ax_fr.set_yticks([])
    ax_fr.set_ylabel("frames")

    # Units, coloured by the mode their OmniState reported; units that produced speech hatched.
    for k, (_log, st) in enumerate(conv.units):
        end = s(stamp_ns(st))  # OmniState is stamped at the end of its unit
        start = s(stamp_ns(conv.units[k - 1][1])) if k > 0 else max(0.0, end - 1.0)
        mode = MODE_NAMES.get(int(st.mode), "ERROR")
        ax_mode.axvspan(start, end, color=MODE_COLOURS[mode], alpha=0.6, lw=0)
        if int(st.unit_index) in conv.spoke:
            ax_mode.axvspan(start, end, ymin=0.0, ymax=0.3, color="tab:red", alpha=0.9, lw=0)
        ax_mode.text((start + end) / 2, 0.65, str(int(st.unit_index)), ha="center", fontsize=6)
    ax_mode.set_yticks([])
    ax_mode.set_ylabel("unit mode\n(OmniState)")
    ax_mode.legend(
        handles=[Patch(color=c, alpha=0.6, label=n) for n, c in MODE_COLOURS.items()]
        + [Patch(color="tab:red", label="unit produced speech (lower bar)")],
        loc="upper left",
        bbox_to_anchor=(1.005, 1.15),
        fontsize=7,
    )

    # Robot speech at its scheduled play time; cancelled chunks grey; flush spans shaded.
    top = 0.0
    for _log, m in conv.speech:
        env = _envelope(_mono(m), int(m.sample_rate))
        if env is not None:
            colour = "tab:gray" if conv.cancelled(m) else "tab:red"
            ax_out.fill_between(s(stamp_ns(m)) + env[0], 0.0, env[1], color=colour, lw=0)
            top = max(top, float(env[1].max()))
    top = top * 1.6 if top > 0 else 1.0
    ax_out.set_ylim(0.0, top)
    for f in conv.flushes:
        ax_out.axvspan(s(f.dropped_from_ns), s(f.dropped_until_ns), color="tab:orange", alpha=0.2)
        ax_out.axvline(s(f.decided_ns), color="tab:orange", lw=1.2)
        ax_in.axvline(s(f.onset_ns), color="tab:orange", ls="--", lw=1.2)
        ax_out.annotate(
            f"{f.reason.replace('_', '-')}\n{(f.decided_ns - f.onset_ns) / 1e6:.0f} ms",
            (s(f.decided_ns), top * 0.98),
            fontsize=7,
            va="top",
            ha="left",
        )
    # What the speaker reported it played (speaker/playback), as a bar under the speech.
    played = _playback(conv)
    for c in played:
        colour = "black" if c["late"] else "tab:green"
        ax_out.broken_barh(
            [(s(c["heard_ns"]), c["seconds"])], (top * 0.02, top * 0.06), color=colour, lw=0
        )
    for r in _responses(conv):
        y = top * 0.78
        ax_out.plot([r["user_speech_s"][1], r["speech_at_s"]], [y, y], color="tab:purple", lw=1.5)
        ax_out.annotate(
            f"response {r['latency_ms']:.0f} ms",
            (r["user_speech_s"][1], y),
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=7,
            color="tab:purple",
        )
    ax_out.set_ylabel("robot speech |y|\n(scheduled)")
    ax_out.legend(
        handles=[
            Line2D([], [], color="tab:red", lw=1, label="speech (published)"),
            Line2D([], [], color="tab:gray", lw=1, label="speech cancelled by a flush"),
            Patch(color="tab:orange", alpha=0.3, label="flushed span"),
            Line2D([], [], color="tab:orange", lw=1.2, label="flush decided (onset -> decision)"),
            Line2D([], [], color="tab:purple", lw=1.5, label="response: user stops -> speech"),
        ]
        + (
            [
                Patch(color="tab:green", label="heard (speaker/playback)"),
                Patch(color="black", label="heard late (speaker/playback)"),
            ]
            if played
            else []
        ),
        loc="upper left",
        bbox_to_anchor=(1.005, 1.0),
        fontsize=8,
    )

    for m in (msg for _, msg in conv.out.get("proactive", [])):
        trig = s(_time_ns(m.trigger_stamp))
        ax_pro.axvline(trig, color="tab:purple")
        ax_pro.text(trig, 0.5, f" {m.kind}", va="center", fontsize=8)
    ax_pro.set_yticks([])
    ax_pro.set_ylabel("proactive")

    if conv.units:
        ax_lat.plot(
            [s(stamp_ns(st)) for _, st in conv.units],
            [st.unit_compute_ms for _, st in conv.units],
            marker=".",
            lw=0.8,
            label="prefill + generate",
        )
    unit_ms = 1000.0
    if len(conv.units) >= 2:
        unit_ms = (stamp_ns(conv.units[-1][1]) - stamp_ns(conv.units[0][1])) / 1e6
        unit_ms /= len(conv.units) - 1
    ax_lat.axhline(
        unit_ms, color="tab:red", ls="--", lw=1, label=f"{unit_ms / 1000:.0f} s deadline"
    )
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("unit compute\n[ms]")
    ax_lat.set_xlabel("bag time [s]")
    ax_lat.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8)
    ax_lat.set_xlim(left=0.0)
    backend = conv.units[-1][1].backend if conv.units else "?"
    heard = (
        f"; speaker_node: {len(played)} chunks heard, {sum(c['late'] for c in played)} late"
        if played
        else ""
    )
    fig.suptitle(f"omni_ros replay of {input_bag.path.name} (backend: {backend}){heard}")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
