"""Conversation benchmark: a closed loop through the real nodes over DDS, with ground truth.

What runs (all on the wall clock, real time):

- ``omni_flow_node``, a real node process (``_flow_runner.py``: the installed node's ``main()`` with
  the ``bench_planned`` backend registered): the ``reference`` tiny model, told by this benchmark in
  which units to speak (random weights cannot choose; see ``_bench_backend.py``), optionally
  stretched to 400-800 ms a unit (the slow backend).
- ``speaker_node`` (the real node class, in this process) with a :class:`_room.RoomSink` (a sound
  card with a 40 ms buffer, like a blocking PortAudio stream; ``keep_alive: on``, as ``auto`` is
  for a sound card, ``--keep-alive off`` for the figures before 2026-12-04): what it plays goes
  through a simulated room (delay 40-300 ms, attenuation, a reverberant tail, noise)
  back into the microphone. The keep-alive silence is not robot speech in any figure.
- A microphone thread that publishes ``omni_ros_msgs/AudioChunk`` on ``audio/mic`` every 20 ms,
  stamped at capture time: the user's espeak-ng utterances placed at known times, plus the echo,
  plus noise.

Scenarios (each trial is one exchange):

- ``duplex``: the user asks (speech ending at a random phase of a unit), the robot answers in that
  unit with a 3-unit turn, and the user barges in at a swept phase of the turn as heard: 0.3 s
  after it started, in its middle unit, and in its LAST unit (after that unit was generated).
- ``slow``: the same with every unit stretched to 400-800 ms of compute.
- ``startup``: a fresh node per trial; the robot speaks in its first seconds and the user barges
  in 0.4 s into it (the echo canceller has never heard the room). With ``--warm-startup`` the
  trials start warm from one ``aec.echo_path_file``, written by a node that spoke one turn with
  nobody talking and was stopped.
- ``silent``: the user says nothing; the robot speaks unprompted turns (proactive) through each
  echo path; every barge-in is a false one.

Figures (median / p95 over the trials): response latency (end of user speech to the first robot
sample played), barge-in latency (user onset to robot audio stopped at the sink) and success by
phase (the speaker stopped before the turn's natural end), talk-over, false barge-ins per minute
of robot speech (per echo path in ``silent``), late chunks at the speaker, the device underruns
and the chunks ``speaker_node`` resynced after them (speech dropped), and the per-unit breakdown
(unit close -> prefill, generate -> publish, publish -> play).

    python benchmarks/conversation_bench.py              # default run, ~10 min on 2 cores
    python benchmarks/conversation_bench.py --quick      # ~5 min
    python benchmarks/conversation_bench.py --trials 20 --scenarios duplex slow --json out.json
    python benchmarks/conversation_bench.py --scenarios silent --silent-s 300   # 5 min a path
    python benchmarks/conversation_bench.py --scenarios startup --aec dtd_spectral=false  # A/B

Needs a built and sourced workspace (``make build``; ``. install/setup.sh``) and espeak-ng.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _room import ROOMS, Room, RoomConfig, RoomSink  # noqa: E402
from omni_ros.core.clock import NS_PER_S  # noqa: E402

MIC_RATE = 16_000
OUT_RATE = 24_000
CHUNK = 320  # 20 ms microphone chunks
BLOCK_BYTES = OUT_RATE * 20 // 1000 * 2  # speaker_node's first write of a chunk (block_ms 20)
UNIT_NS = NS_PER_S
TURN_UNITS = 3
PHASES: dict[str, float] = {"start": 0.3, "middle": 1.3, "last_unit": 2.25}
QUESTIONS = (
    "Hello robot. What do you see on the table?",
    "Can you remind me to water the plants later?",
    "Please tell me what the weather will be like.",
    "Where did I leave my keys this morning?",
)
INTERJECTIONS = ("Wait, stop please.", "No, hold on a second.", "Sorry, one more thing.")


# --------------------------------------------------------------------------------------- speech
@dataclass(frozen=True)
class Utterance:
    """espeak-ng speech with its ground truth: where speech starts and ends in the clip."""

    text: str
    samples: np.ndarray
    onset: int  # first sample of speech
    offset: int  # one past the last sample of speech

    @property
    def speech_ns(self) -> int:
        return (self.offset - self.onset) * NS_PER_S // MIC_RATE


def utterance(text: str) -> Utterance:
    from omni_ros.tools.synth import speak

    x = speak(text, MIC_RATE) * 0.5
    frame = MIC_RATE // 100
    rms = np.sqrt(np.mean(x[: len(x) // frame * frame].reshape(-1, frame) ** 2, axis=1))
    voiced = np.flatnonzero(rms > 0.01)  # -40 dBFS: espeak-ng's silence is digital zero
    return Utterance(text, x, int(voiced[0]) * frame, int(voiced[-1] + 1) * frame)


def stats(values: Sequence[float]) -> dict[str, float | int | None]:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not arr.size:
        return {"n": 0, "median": None, "p95": None}
    return {
        "n": int(arr.size),
        "median": round(float(np.median(arr)), 1),
        "p95": round(float(np.percentile(arr, 95)), 1),
    }


# ------------------------------------------------------------------------------------ ROS side
class Probe:
    """Everything the benchmark observes over DDS, with the wall time it arrived."""

    def __init__(self, node: Any) -> None:
        from rclpy.qos import (
            DurabilityPolicy,
            QoSProfile,
            ReliabilityPolicy,
            qos_profile_sensor_data,
        )

        from omni_ros_msgs.msg import AudioChunk, OmniState, ProactiveAction

        self.node = node
        self.lock = threading.Lock()
        self.states: list[tuple[int, int, int, int, float]] = []  # recv, stamp, index, mode, ms
        self.speech_log: list[tuple[int, int, int]] = []  # recv, stamp, samples
        self.speech_data: list[bytes] = []  # the PCM of each (speaker_node writes it unchanged)
        self.flush_msgs: list[dict[str, int]] = []
        self.playback: list[dict[str, int]] = []
        self.proactive = 0
        self.barge_ins = 0
        reliable = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(
            depth=1,
            reliability=ReliabilityPolicy.RELIABLE,
            durability=DurabilityPolicy.TRANSIENT_LOCAL,
        )
        node.create_subscription(OmniState, "omni/state", self._on_state, latched)
        node.create_subscription(AudioChunk, "omni/speech", self._on_speech, reliable)
        node.create_subscription(ProactiveAction, "omni/proactive", self._on_proactive, reliable)
        from diagnostic_msgs.msg import DiagnosticArray

        node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        self.mic_pub = node.create_publisher(AudioChunk, "audio/mic", qos_profile_sensor_data)
        self.has_flush_topic = False
        try:  # issue 9's interfaces, where present
            from omni_ros_msgs.msg import Playback, SpeechFlush

            node.create_subscription(SpeechFlush, "omni/speech_flush", self._on_flush, reliable)
            node.create_subscription(Playback, "speaker/playback", self._on_playback, reliable)
            self.has_flush_topic = True
        except ImportError:
            pass

    def clear(self) -> None:
        with self.lock:
            self.states.clear()
            self.speech_log.clear()
            self.speech_data.clear()
            self.flush_msgs.clear()
            self.playback.clear()
            self.proactive = 0
            self.barge_ins = 0

    @staticmethod
    def _ns(stamp: Any) -> int:
        return int(stamp.sec) * NS_PER_S + int(stamp.nanosec)

    def _on_state(self, msg: Any) -> None:
        with self.lock:
            self.states.append(
                (
                    time.time_ns(),
                    self._ns(msg.header.stamp),
                    int(msg.unit_index),
                    int(msg.mode),
                    float(msg.unit_compute_ms),
                )
            )

    def _on_speech(self, msg: Any) -> None:
        data = bytes(msg.data)
        entry = (time.time_ns(), self._ns(msg.header.stamp), len(data) // 2)
        with self.lock:
            self.speech_log.append(entry)
            self.speech_data.append(data)

    def _on_proactive(self, _msg: Any) -> None:
        with self.lock:
            self.proactive += 1

    def _on_diag(self, msg: Any) -> None:
        for status in msg.status:
            for kv in status.values:
                if kv.key == "barge_ins" and kv.value.strip().isdigit():
                    with self.lock:
                        self.barge_ins = max(self.barge_ins, int(kv.value))

    def _on_flush(self, msg: Any) -> None:
        with self.lock:
            self.flush_msgs.append(
                {
                    "recv_ns": time.time_ns(),
                    "decided_ns": self._ns(msg.header.stamp),
                    "reason": int(msg.reason),
                    "onset_ns": self._ns(msg.onset),
                    "dropped_from_ns": self._ns(msg.dropped_from),
                }
            )

    def _on_playback(self, msg: Any) -> None:
        with self.lock:
            self.playback.append(
                {
                    "heard_ns": self._ns(msg.header.stamp),
                    "scheduled_ns": self._ns(msg.scheduled),
                    "late": int(bool(msg.late)),
                    "cut": int(bool(msg.cut)),
                }
            )

    def flushes(self) -> list[dict[str, int]]:
        """Every flush the flow decided: the SpeechFlush topic where it exists, else the extra
        OmniState the flow publishes at a flush (it repeats the last unit's index)."""
        with self.lock:
            if self.has_flush_topic:
                return [
                    {"decided_ns": f["recv_ns"], "onset_ns": f["onset_ns"], "reason": f["reason"]}
                    for f in self.flush_msgs
                ]
            seen: set[int] = set()
            out = []
            for recv, stamp, index, mode, _ms in self.states:
                if index in seen:
                    out.append({"decided_ns": recv, "onset_ns": stamp, "reason": mode})
                seen.add(index)
            return out

    def unit_grid(self) -> tuple[int, int] | None:
        """(index, end stamp) of the newest unit state."""
        with self.lock:
            seen: set[int] = set()
            best = None
            for _recv, stamp, index, _mode, _ms in self.states:
                if index not in seen:
                    best = (index, stamp)
                seen.add(index)
            return best


class Session:
    """One omni_flow_node process + speaker_node on a room sink + the microphone thread."""

    def __init__(
        self,
        bench: Bench,
        room_config: RoomConfig,
        duration_s: float,
        delay_ms: tuple[float, float] = (0.0, 0.0),
        seed: int = 0,
        echo_path_file: Path | None = None,
    ) -> None:
        from omni_ros.audio_io import AudioFormat
        from omni_ros.ros.speaker_node import SpeakerNode

        self.bench = bench
        self.probe = bench.probe
        self.probe.clear()
        self.dir = Path(tempfile.mkdtemp(prefix="conv_", dir=bench.workdir))
        self.plan_path = self.dir / "plan.json"
        self.timing_path = self.dir / "timing.jsonl"
        self.turns: list[tuple[int, int]] = []
        self._write_plan()
        self.rng = np.random.default_rng(seed)
        self.t0_ns = time.time_ns()
        self.mono0_ns = time.monotonic_ns()
        self.duration_s = duration_s
        self.room = Room(room_config, self.t0_ns, duration_s)
        self.user = np.zeros(int(duration_s * MIC_RATE) + MIC_RATE, np.float32)
        self.user_spans: list[tuple[int, int]] = []
        self.noise = 10 ** (room_config.noise_dbfs / 20)
        params = self.dir / "params.yaml"
        params.write_text(
            "omni_flow_node:\n  ros__parameters:\n    backend: bench_planned\n"
            "    bench_planned:\n"
            f"      plan_path: {json.dumps(str(self.plan_path))}\n"
            f"      timing_path: {json.dumps(str(self.timing_path))}\n"
            f"      delay_min_ms: {float(delay_ms[0])}\n      delay_max_ms: {float(delay_ms[1])}\n"
            f"      delay_seed: {seed}\n"
            "      size: tiny\n      seed: 7\n      num_threads: 1\n"
            "    session:\n      proactive_silence_units: 3\n"
            + _aec_yaml(
                {
                    **bench.aec,
                    **({} if echo_path_file is None else {"echo_path_file": str(echo_path_file)}),
                }
            )
        )
        self.log = open(self.dir / "node.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "_flow_runner.py"),
                "--ros-args",
                "--params-file",
                str(params),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.sink = RoomSink(AudioFormat(OUT_RATE, 1, "S16LE"), self.room)
        from rclpy.parameter import Parameter

        self.speaker = SpeakerNode(
            sink=self.sink,
            context=bench.context,
            parameter_overrides=[Parameter("keep_alive", value=bench.keep_alive)],
        )
        self.sink.is_silence = lambda: bool(getattr(self.speaker, "writing_silence", False))
        bench.executor.add_node(self.speaker)
        self._stop = threading.Event()
        self._mic = threading.Thread(target=self._mic_loop, name="bench-mic", daemon=True)
        self._mic.start()
        self.started_ns = time.time_ns()
        deadline = time.monotonic() + 120
        while self.probe.unit_grid() is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"omni_flow_node did not start; see {self.dir / 'node.log'}")
            time.sleep(0.05)
        self.ready_ns = time.time_ns()

    # ------------------------------------------------------------------ inputs
    def _write_plan(self) -> None:
        tmp = self.plan_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"turns": self.turns}))
        os.replace(tmp, self.plan_path)

    def plan_turn(self, start_ns: int, units: int) -> None:
        self.turns.append((int(start_ns), int(units)))
        self._write_plan()

    def place(self, utt: Utterance, onset_ns: int) -> tuple[int, int]:
        """Put ``utt`` into the user's track so that its speech starts at ``onset_ns`` (wall)."""
        first = round((onset_ns - self.t0_ns) * MIC_RATE / NS_PER_S) - utt.onset
        if not 0 <= first < len(self.user) - len(utt.samples):
            raise RuntimeError("the session's microphone track is too short for this trial")
        end = min(len(self.user), first + len(utt.samples))
        self.user[first:end] += utt.samples[: end - first]
        span = (onset_ns, onset_ns + utt.speech_ns)
        self.user_spans.append(span)
        return span

    def _mic_loop(self) -> None:
        from omni_ros.ros import conversions as conv

        from omni_ros_msgs.msg import AudioChunk

        n = 0
        noise_rng = np.random.default_rng(1)
        while not self._stop.is_set() and n + CHUNK < len(self.user):
            due = self.mono0_ns + (n + CHUNK) * NS_PER_S // MIC_RATE
            wait = due - time.monotonic_ns()
            if wait > 0:
                self._stop.wait(wait / NS_PER_S)
            x = self.user[n : n + CHUNK] + self.room.echo(n, CHUNK)
            x = x + noise_rng.normal(0.0, self.noise, CHUNK).astype(np.float32)
            msg = AudioChunk()
            msg.header = conv.header(self.t0_ns + n * NS_PER_S // MIC_RATE, "bench_mic")
            msg.sample_rate, msg.channels, msg.encoding = MIC_RATE, 1, "S16LE"
            msg.data = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
            self.probe.mic_pub.publish(msg)
            n += CHUNK

    # ------------------------------------------------------------------ queries
    def next_unit_start(self, not_before_ns: int) -> int:
        grid = self.probe.unit_grid()
        assert grid is not None
        _index, end = grid
        k = max(0, -(-(not_before_ns - end) // UNIT_NS))
        return end + k * UNIT_NS

    def played(self) -> list[tuple[int, int, bytes]]:
        with self.room._lock:
            return [
                (p.start_ns, p.end_ns(OUT_RATE), p.data) for p in self.room.log if not p.silence
            ]

    def first_play_after(self, t_ns: int, timeout_ns: int) -> int | None:
        while time.time_ns() < timeout_ns:
            for start, _end, _data in self.played():
                if start >= t_ns:
                    return start
            time.sleep(0.01)
        return None

    def talk_over_ns(self, span: tuple[int, int]) -> int:
        total = 0
        for s, e, _ in self.played():
            total += max(0, min(e, span[1]) - max(s, span[0]))
        return total

    def sleep_until(self, t_ns: int) -> None:
        while (rest := t_ns - time.time_ns()) > 0:
            time.sleep(min(rest / NS_PER_S, 0.05))

    # ------------------------------------------------------------------ teardown + analysis
    def close(self) -> dict[str, Any]:
        self._stop.set()
        self._mic.join(2)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        late = int(getattr(self.speaker, "late_chunks", 0))
        resynced = int(getattr(self.speaker, "resynced_chunks", 0))
        resync_ms = int(getattr(self.speaker, "resync_dropped_ns", 0)) / 1e6
        with self.probe.lock:
            playback = list(self.probe.playback)
        self.bench.executor.remove_node(self.speaker)
        self.speaker.destroy_node()
        return {
            "speaker_late_chunks": late,
            "speaker_resynced_chunks": resynced,
            "speaker_resync_dropped_ms": round(resync_ms, 1),
            "sink_underruns": self.sink.underruns,
            # speaker/playback (issue 9's playback feedback), where the speaker publishes it.
            "playback_late": sum(p["late"] for p in playback) if playback else None,
            "playback_msgs": len(playback),
            "room": self.room.config.name,
            "write_lag_ms": [v / 1e6 for v in self.sink.write_lag_ns],
            **self.breakdown(),
        }

    def breakdown(self) -> dict[str, Any]:
        """Per speaking unit: unit close -> prefill, generate -> publish, publish -> play; and
        per played chunk whether it started late (> 30 ms after its stamp, speaker_node's rule)."""
        units = []
        if self.timing_path.exists():
            for line in self.timing_path.read_text().splitlines():
                units.append(json.loads(line))
        with self.probe.lock:
            pairs = sorted(zip(self.probe.speech_log, self.probe.speech_data, strict=True))
        chunks = [c for c, _ in pairs]
        datas = [d for _, d in pairs]
        # speaker_node plays its queue in arrival order, each chunk as consecutive BLOCK_BYTES
        # writes of its own PCM (24 kHz in and out: no resampling), a flush cutting one short.
        # Walk both in order, checking every block's bytes; a block that does not continue the
        # current chunk starts the next one that begins with it (chunks skipped were flushed).
        # Content alone is ambiguous: the reference voice repeats 40 ms speech tokens.
        # A chunk whose start speaker_node dropped to get back on schedule after an underrun
        # (resynced) begins inside its PCM: it is counted apart (its offset is as ambiguous as
        # the content), not as played late or on time.
        played_chunks: dict[tuple[int, int, int], int] = {}
        resynced = 0
        pointer, current, offset = 0, -1, 0
        for start, _end, data in self.played():
            if current >= 0 and datas[current][offset : offset + len(data)] == data:
                offset += len(data)
                continue
            for k in range(pointer, len(chunks)):
                if chunks[k][0] > start:
                    break
                if datas[k][: len(data)] == data:
                    played_chunks[chunks[k]] = start
                    pointer, current, offset = k + 1, k, len(data)
                    break
            else:
                for k in range(pointer, min(pointer + 3, len(chunks))):
                    at = datas[k].find(data)
                    if at > 0 and at % 2 == 0 and chunks[k][0] <= start:
                        resynced += 1
                        pointer, current, offset = k + 1, k, at + len(data)
                        break
        close_prefill, gen_publish, publish_play = [], [], []
        units.sort(key=lambda u: u["generated_ns"])
        for k, unit in enumerate(units):
            close_prefill.append((unit["prefill_ns"] - unit["end_ns"]) / 1e6)
            if not unit["spoke"]:
                continue
            nxt = units[k + 1]["generated_ns"] if k + 1 < len(units) else 1 << 62
            mine = [c for c in chunks if unit["generated_ns"] <= c[0] < nxt]
            if not mine:
                continue
            gen_publish.append((mine[0][0] - unit["generated_ns"]) / 1e6)
            if mine[0] in played_chunks:
                publish_play.append((played_chunks[mine[0]] - mine[0][0]) / 1e6)
        late = [(v - c[1]) / 1e6 for c, v in played_chunks.items()]
        # Every late chunk with where it was late: arrival here (recv) and first sample heard
        # (start) relative to its stamp, and whether the chunk before it was heard late too.
        late_detail = []
        ordered = sorted(played_chunks.items(), key=lambda kv: kv[0][1])
        prev_late = False
        for (recv, stamp, _n), start in ordered:
            is_late = (start - stamp) / 1e6 > 30.0
            if is_late:
                late_detail.append(
                    {
                        "stamp_ns": stamp,
                        "recv_minus_stamp_ms": round((recv - stamp) / 1e6, 1),
                        "start_minus_stamp_ms": round((start - stamp) / 1e6, 1),
                        "after_late": prev_late,
                    }
                )
            prev_late = is_late
        return {
            "close_to_prefill_ms": close_prefill,
            "generate_to_publish_ms": gen_publish,
            "publish_to_play_ms": publish_play,
            "chunks_published": len(chunks),
            "chunks_played": len(late),
            "chunks_late": sum(1 for x in late if x > 30.0),
            "chunks_resynced_at_sink": resynced,
            "chunk_start_minus_stamp_ms": late,
            "late_detail": late_detail,
            "played_s": sum(e - s for s, e, _ in self.played()) / NS_PER_S,
        }


def _aec_yaml(values: dict[str, Any]) -> str:
    """The node's ``aec:`` parameter block (empty for none)."""
    if not values:
        return ""
    return "    aec:\n" + "".join(f"      {k}: {json.dumps(v)}\n" for k, v in values.items())


def parse_aec(items: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs (``--aec``) as aec.* overrides, each checked by AecConfig.

    Raises:
        SystemExit: an unknown name, a value of the wrong type, or one AecConfig refuses.
    """
    from omni_ros.core.aec import AecConfig
    from omni_ros.core.errors import ConfigError

    defaults = AecConfig()
    names = sorted(f.name for f in dataclasses.fields(AecConfig))
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in names:
            raise SystemExit(f"--aec {item!r}: use NAME=VALUE with NAME one of {names}")
        default = getattr(defaults, name)
        try:
            if isinstance(default, bool):
                value: Any = {"true": True, "false": False}[text.lower()]
            elif isinstance(default, (int, float)):
                value = type(default)(text)
            else:
                value = text
        except (KeyError, ValueError):
            kind = "true or false" if isinstance(default, bool) else type(default).__name__
            raise SystemExit(f"--aec {item!r}: {name} takes {kind}") from None
        out[name] = value
    try:
        AecConfig(**out)  # what is wrong is said before any node starts
    except ConfigError as exc:
        raise SystemExit(f"--aec: {exc}") from None
    return out


class Bench:
    """The benchmark process's ROS context, executor and probe node."""

    def __init__(
        self, workdir: Path, keep_alive: str = "on", aec: dict[str, Any] | None = None
    ) -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.workdir = workdir
        self.keep_alive = keep_alive  # speaker_node's keep_alive (the room sink is a sound card)
        self.aec = dict(aec or {})  # omni_flow_node's aec.* overrides (--aec)
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("conversation_bench", context=self.context)
        self.probe = Probe(self.node)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spin = threading.Thread(target=self._spin_loop, daemon=True)
        self._spin.start()

    def _spin_loop(self) -> None:
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # a node removed while spinning: carry on
                if not self.context.ok():
                    return

    def close(self) -> None:
        import rclpy

        self.node.destroy_node()
        rclpy.shutdown(context=self.context)
        self._spin.join(2)


# ------------------------------------------------------------------------------------ scenarios
@dataclass
class Results:
    response_ms: list[float] = field(default_factory=list)
    unit_end_to_play_ms: list[float] = field(default_factory=list)
    bargein: list[dict[str, Any]] = field(default_factory=list)
    talk_over_ms: list[float] = field(default_factory=list)
    false_bargeins: int = 0
    robot_speech_s: float = 0.0
    missed_responses: int = 0
    sessions: list[dict[str, Any]] = field(default_factory=list)
    proactive: int = 0
    planned_turns: int = 0

    def per_room(self) -> dict[str, dict[str, Any]]:
        """Robot speech, false barge-ins and speaker timing per echo path (room)."""
        rooms: dict[str, dict[str, Any]] = {}
        for s in self.sessions:
            r = rooms.setdefault(
                s["room"],
                {
                    "robot_speech_min": 0.0,
                    "false_bargeins": 0,
                    "late_chunks": 0,
                    "chunks_published": 0,
                    "sink_underruns": 0,
                    "resynced_chunks": 0,
                    "resync_dropped_ms": 0.0,
                },
            )
            r["robot_speech_min"] = round(r["robot_speech_min"] + s["played_s"] / 60, 2)
            r["false_bargeins"] += s.get("false_bargeins", 0)
            r["late_chunks"] += s["speaker_late_chunks"]
            r["chunks_published"] += s["chunks_published"]
            r["sink_underruns"] += s["sink_underruns"]
            r["resynced_chunks"] += s["speaker_resynced_chunks"]
            r["resync_dropped_ms"] = round(r["resync_dropped_ms"] + s["speaker_resync_dropped_ms"])
        for r in rooms.values():
            minutes = r["robot_speech_min"]
            r["false_bargeins_per_min"] = (
                round(r["false_bargeins"] / minutes, 2) if minutes else None
            )
        return rooms

    def summary(self) -> dict[str, Any]:
        by_phase: dict[str, dict[str, Any]] = {}
        for phase in dict.fromkeys(b["phase"] for b in self.bargein):
            rows = [b for b in self.bargein if b["phase"] == phase]
            by_phase[phase] = {
                "trials": len(rows),
                "success": sum(1 for b in rows if b["stopped"]),
                "cut_before_onset": sum(1 for b in rows if b.get("cut_before_onset")),
                "latency_ms": stats([b["latency_ms"] for b in rows if b["stopped"]]),
                "decided_ms": stats([b["decided_ms"] for b in rows if b["decided_ms"] is not None]),
                "decided": sum(1 for b in rows if b["decided_ms"] is not None),
            }
        cat = {
            k: [x for s in self.sessions for x in s[k]]
            for k in ("close_to_prefill_ms", "generate_to_publish_ms", "publish_to_play_ms")
        }
        minutes = self.robot_speech_s / 60
        return {
            "response_ms": stats(self.response_ms),
            "unit_end_to_first_play_ms": stats(self.unit_end_to_play_ms),
            "missed_responses": self.missed_responses,
            "bargein_latency_ms": stats([b["latency_ms"] for b in self.bargein if b["stopped"]]),
            "bargein_success": f"{sum(b['stopped'] for b in self.bargein)}/{len(self.bargein)}",
            "bargein_by_phase": by_phase,
            "talk_over_ms": stats(self.talk_over_ms),
            "false_bargeins": self.false_bargeins,
            "robot_speech_min": round(minutes, 2),
            "false_bargeins_per_min": round(self.false_bargeins / minutes, 2) if minutes else None,
            "late_chunks": sum(s["chunks_late"] for s in self.sessions),
            "speaker_late_chunks": sum(s["speaker_late_chunks"] for s in self.sessions),
            "playback_late": sum(s["playback_late"] or 0 for s in self.sessions)
            if any(s["playback_late"] is not None for s in self.sessions)
            else None,
            "chunks_played": sum(s["chunks_played"] for s in self.sessions),
            "chunks_published": sum(s["chunks_published"] for s in self.sessions),
            "breakdown_ms": {k: stats(v) for k, v in cat.items()},
            "proactive_events": self.proactive,
            "planned_turns": self.planned_turns,
            "trials": {"response_ms": self.response_ms, "bargein": self.bargein},
            "late_detail": [d for s in self.sessions for d in s["late_detail"]],
            "per_room": self.per_room(),
            "write_lag_ms": stats([x for s in self.sessions for x in s["write_lag_ms"]]),
            "speaker_resynced_chunks": sum(s["speaker_resynced_chunks"] for s in self.sessions),
            "speaker_resync_dropped_ms": round(
                sum(s["speaker_resync_dropped_ms"] for s in self.sessions), 1
            ),
            "sink_underruns": sum(s["sink_underruns"] for s in self.sessions),
        }


def _count_flushes(
    sess: Session, window: tuple[int, int], true_onsets: Sequence[int], res: Results
) -> None:
    for f in sess.probe.flushes():
        if not window[0] <= f["decided_ns"] < window[1]:
            continue
        if sess.probe.has_flush_topic and f["reason"] != 0:
            continue  # SpeechFlush.BARGE_IN only (not reset / stop at shutdown)
        if not any(0 <= f["decided_ns"] - t <= 2 * NS_PER_S for t in true_onsets):
            res.false_bargeins += 1


def exchange(
    sess: Session,
    res: Results,
    question: Utterance,
    interjection: Utterance,
    phase: str,
    first_turn: bool = False,
) -> None:
    """One trial: a question answered in the unit where it ends, then a barge-in at ``phase``."""
    t_begin = time.time_ns()
    r_phase = float(sess.rng.uniform(0.1, 0.9))
    lead_ns = 300_000_000 if first_turn else 600_000_000
    unit = sess.next_unit_start(
        time.time_ns() + lead_ns + question.speech_ns - int(r_phase * NS_PER_S)
    )
    eos = unit + int(r_phase * NS_PER_S)
    q_span = sess.place(question, eos - question.speech_ns)
    sess.plan_turn(unit, TURN_UNITS)
    res.planned_turns += 1
    first = sess.first_play_after(q_span[1], unit + 4 * NS_PER_S)
    if first is None:
        res.missed_responses += 1
        sess.sleep_until(unit + 5 * NS_PER_S)
        return
    res.response_ms.append((first - eos) / 1e6)
    res.unit_end_to_play_ms.append((first - unit - UNIT_NS) / 1e6)
    onset = first + int((0.4 if first_turn else PHASES[phase]) * NS_PER_S)
    if onset < time.time_ns() + 50_000_000:
        onset = time.time_ns() + 50_000_000  # only if this process was starved
    b_span = sess.place(interjection, onset)
    sess.sleep_until(max(first + TURN_UNITS * UNIT_NS, b_span[1]) + 1_500_000_000)
    # The turn's sound is every block heard from its first sample until now (the plan keeps the
    # robot quiet until the next exchange); it was cut if less than the turn's audio was heard
    # (each speaking unit of the reference model makes exactly one unit of 24 kHz speech).
    blocks = [(s, e, len(d) // 2) for s, e, d in sess.played() if s >= first]
    heard = sum(n for _s, _e, n in blocks)
    stop = max(e for _s, e, _n in blocks)
    cut = heard <= TURN_UNITS * OUT_RATE * UNIT_NS // NS_PER_S - 2 * BLOCK_BYTES // 2
    # Cut before the user said anything: a false barge-in (counted with the flushes below), not
    # a successful one.
    early = cut and stop <= onset
    # The flow's decision (SpeechFlush, or the extra OmniState of older nodes), as received here.
    decided = [
        f for f in sess.probe.flushes() if onset - 500_000_000 <= f["decided_ns"] <= time.time_ns()
    ]
    res.bargein.append(
        {
            "phase": "first_seconds" if first_turn else phase,
            "decided_ms": (decided[0]["decided_ns"] - onset) / 1e6 if decided else None,
            "flush_kind": decided[0]["reason"] if decided else None,
            "stopped": cut and not early,
            "cut_before_onset": early,
            "latency_ms": max(0, stop - onset) / 1e6,
            "heard_s": heard / OUT_RATE,
        }
    )
    res.talk_over_ms.append((sess.talk_over_ns(q_span) + sess.talk_over_ns(b_span)) / 1e6)
    _count_flushes(sess, (t_begin, time.time_ns()), [onset], res)


def run_exchanges(
    bench: Bench,
    trials: int,
    room: RoomConfig,
    delay_ms: tuple[float, float],
    utts: dict[str, list[Utterance]],
    progress: Callable[[str], None],
) -> Results:
    res = Results()
    phases = list(PHASES)
    per_trial_s = 9.5 if delay_ms[1] == 0 else 10.5
    sess = Session(bench, room, duration_s=trials * per_trial_s + 80, delay_ms=delay_ms, seed=3)
    try:
        # A warm-up turn with the user silent: the canceller hears the room first (the first
        # seconds after start are the ``startup`` scenario's subject).
        warm = sess.next_unit_start(time.time_ns() + 200_000_000)
        sess.plan_turn(warm, 4)
        sess.sleep_until(warm + 6 * NS_PER_S)
        for k in range(trials):
            phase = phases[k % len(phases)]
            exchange(
                sess,
                res,
                utts["q"][k % len(utts["q"])],
                # Every phase hears every interjection (not one utterance per phase).
                utts["i"][(k // len(phases)) % len(utts["i"])],
                phase,
            )
            b = res.bargein[-1] if res.bargein else None
            progress(
                f"  trial {k + 1}/{trials} {phase}: response "
                f"{res.response_ms[-1] if res.response_ms else float('nan'):.0f} ms, barge-in "
                f"{'stopped' if b and b['stopped'] else 'NOT stopped'} "
                f"{b['latency_ms'] if b else float('nan'):.0f} ms after onset, "
                f"{b['heard_s'] if b else 0:.2f} s of the turn heard"
            )
    finally:
        info = sess.close()
    info["false_bargeins"] = res.false_bargeins
    res.sessions.append(info)
    res.robot_speech_s += info["played_s"]
    return res


def run_startup(
    bench: Bench,
    trials: int,
    room: RoomConfig,
    utts: dict[str, list[Utterance]],
    progress: Callable[[str], None],
    warm: bool = False,
) -> Results:
    """``warm``: the trials share one ``aec.echo_path_file``, written first by a node that
    speaks one 6-unit turn with nobody talking and is stopped (SIGINT). A trial's own run holds
    only 0.4 s of our speech before the barge-in, too little to remember (>= 1 s), so the file
    stays the first node's."""
    res = Results()
    echo_path = bench.workdir / "echo_path.npz" if warm else None
    if echo_path is not None:
        sess = Session(bench, room, duration_s=40, seed=9, echo_path_file=echo_path)
        try:
            start = sess.next_unit_start(time.time_ns() + 2_500_000_000)
            sess.plan_turn(start, 6)
            sess.sleep_until(start + 7 * NS_PER_S)
        finally:
            sess.close()
        progress(f"  remembered the echo path: {echo_path.exists()}")
    for k in range(trials):
        was_warm = echo_path is not None and echo_path.exists()
        sess = Session(bench, room, duration_s=75, seed=10 + k, echo_path_file=echo_path)
        before = res.false_bargeins
        try:
            exchange(
                sess, res, utts["q"][k % 4], utts["i"][k % 3], "first_seconds", first_turn=True
            )
        finally:
            info = sess.close()
        info["false_bargeins"] = res.false_bargeins - before
        info["warm_start"] = was_warm
        res.sessions.append(info)
        res.robot_speech_s += info["played_s"]
        b = res.bargein[-1] if res.bargein else None
        since = (sess.turns[0][0] - sess.ready_ns) / 1e9 if sess.turns else float("nan")
        saved = "" if echo_path is None else f" ({'warm' if was_warm else 'cold'} start)"
        progress(
            f"  trial {k + 1}/{trials}{saved}: turn {since:.1f} s after the first state, barge-in "
            f"{'stopped' if b and b['stopped'] else 'NOT stopped'} {b['latency_ms'] if b else 0:.0f} ms"
        )
    return res


def run_silent(
    bench: Bench, seconds: float, rooms: Sequence[RoomConfig], progress: Callable[[str], None]
) -> Results:
    """The user says nothing; the robot speaks 6-unit turns after 3 silent units, each room."""
    res = Results()
    for room in rooms:
        sess = Session(bench, room, duration_s=seconds + 60, seed=20)
        t_begin = time.time_ns()
        before = res.false_bargeins
        try:
            end = time.time_ns() + int(seconds * NS_PER_S)
            while time.time_ns() < end - 8 * NS_PER_S:
                # 3 silent units before each turn (proactive_silence_units), then 6 speaking.
                start = sess.next_unit_start(time.time_ns() + 2_500_000_000)
                sess.plan_turn(start, 6)
                res.planned_turns += 1
                sess.sleep_until(start + 7 * NS_PER_S)
            sess.sleep_until(time.time_ns() + 2 * NS_PER_S)
            _count_flushes(sess, (t_begin, time.time_ns()), [], res)
            with sess.probe.lock:
                res.proactive += sess.probe.proactive
        finally:
            info = sess.close()
        info["false_bargeins"] = res.false_bargeins - before
        res.sessions.append(info)
        res.robot_speech_s += info["played_s"]
        progress(
            f"  {room.name}: {info['played_s']:.0f} s of robot speech, "
            f"{res.false_bargeins - before} false barge-in(s), "
            f"{info['speaker_late_chunks']} of {info['chunks_published']} chunks late, "
            f"{info['sink_underruns']} underrun(s), {info['speaker_resynced_chunks']} resynced "
            f"({info['speaker_resync_dropped_ms']:.0f} ms dropped)"
        )
    return res


# ------------------------------------------------------------------------------------------ main
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {platform.machine()} ({cpu}), no GPU, Python {platform.python_version()}"


def print_table(name: str, s: dict[str, Any]) -> None:
    def fmt(st: dict[str, Any]) -> str:
        return "-" if not st["n"] else f"{st['median']:.0f} / {st['p95']:.0f} (n={st['n']})"

    print(f"\n### {name}")
    print("| figure | median / p95 |\n|---|---|")
    print(
        f"| response latency (end of user speech -> first robot sample played) | {fmt(s['response_ms'])} |"
    )
    print(f"| unit end -> first sample played | {fmt(s['unit_end_to_first_play_ms'])} |")
    print(
        f"| barge-in latency (user onset -> robot audio stopped), stopped trials | {fmt(s['bargein_latency_ms'])} |"
    )
    for phase, p in s["bargein_by_phase"].items():
        early = f" ({p['cut_before_onset']} cut before the onset)" if p["cut_before_onset"] else ""
        print(
            f"| barge-in `{phase}`: stopped {p['success']}/{p['trials']}{early} | "
            f"{fmt(p['latency_ms'])} |"
        )
        print(
            f"| barge-in `{phase}`: flush decided {p['decided']}/{p['trials']}, onset -> decision "
            f"| {fmt(p['decided_ms'])} |"
        )
    print(f"| talk-over per exchange | {fmt(s['talk_over_ms'])} |")
    for k, v in s["breakdown_ms"].items():
        print(f"| breakdown: {k.replace('_ms', '').replace('_', ' ')} | {fmt(v)} |")
    for name, r in s["per_room"].items():
        print(
            f"| `{name}`: false barge-ins {r['false_bargeins']} in {r['robot_speech_min']} min "
            f"({r['false_bargeins_per_min']} / min); late chunks {r['late_chunks']} of "
            f"{r['chunks_published']}; device underruns {r['sink_underruns']}, resynced "
            f"{r['resynced_chunks']} ({r['resync_dropped_ms']:.0f} ms dropped) | |"
        )
    print(
        f"\nlate chunks at the speaker (speaker_node's count): {s['speaker_late_chunks']} of "
        f"{s['chunks_published']} published (speaker/playback late: {s['playback_late']}; "
        f"matched at the sink: {s['late_chunks']} of {s['chunks_played']}); false barge-ins: "
        f"{s['false_bargeins']} in {s['robot_speech_min']} min of robot speech "
        f"({s['false_bargeins_per_min']} / min); device underruns: {s['sink_underruns']}, "
        f"chunks resynced after them: {s['speaker_resynced_chunks']} "
        f"({s['speaker_resync_dropped_ms']:.0f} ms of speech dropped); "
        f"missed responses: {s['missed_responses']}; "
        f"proactive events {s['proactive_events']} for {s['planned_turns']} planned turns"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 trials a scenario, 25 s per echo path (~5 min)"
    )
    parser.add_argument("--trials", type=int, default=None, help="trials per scenario (default 12)")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["duplex", "slow", "startup", "silent"],
        choices=["duplex", "slow", "startup", "silent"],
    )
    parser.add_argument("--room", default="mid_120ms", choices=sorted(ROOMS))
    parser.add_argument(
        "--silent-s", type=float, default=None, help="seconds per echo path, silent (default 50)"
    )
    parser.add_argument(
        "--silent-rooms",
        nargs="+",
        default=list(ROOMS),
        choices=sorted(ROOMS),
        help="echo paths of the silent scenario (default: all)",
    )
    parser.add_argument(
        "--warm-startup",
        action="store_true",
        help="startup trials start warm from an aec.echo_path_file a first node wrote",
    )
    parser.add_argument(
        "--keep-alive",
        default="on",
        choices=["on", "off"],
        help="speaker_node keep_alive (on, as auto is for a sound card; off: the figures before "
        "2026-12-04)",
    )
    parser.add_argument(
        "--aec",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="omni_flow_node aec.* overrides (e.g. dtd_spectral=false: the figures before "
        "2026-12-04's spectral test)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--label", default="", help="a name for this run in the output")
    args = parser.parse_args(argv)
    trials = args.trials or (3 if args.quick else 12)
    startup_trials = max(2, trials // 4) if args.trials is None else trials
    silent_s = args.silent_s or (25.0 if args.quick else 50.0)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    started = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:5.0f} s] {line}", flush=True)

    progress("synthesising utterances (espeak-ng)")
    utts = {"q": [utterance(t) for t in QUESTIONS], "i": [utterance(t) for t in INTERJECTIONS]}
    workdir = Path(tempfile.mkdtemp(prefix="conversation_bench_"))
    aec = parse_aec(args.aec)
    bench = Bench(workdir, args.keep_alive, aec)
    results: dict[str, Any] = {
        "label": args.label,
        "machine": machine(),
        "command": " ".join(
            ["python", "benchmarks/conversation_bench.py", *(argv or sys.argv[1:])]
        ),
        "trials": trials,
        "room": args.room,
        "keep_alive": args.keep_alive,
        "aec": aec,
        "scenarios": {},
    }
    room = ROOMS[args.room]
    try:
        for scenario in args.scenarios:
            progress(f"scenario {scenario}")
            if scenario == "duplex":
                res = run_exchanges(bench, trials, room, (0.0, 0.0), utts, progress)
            elif scenario == "slow":
                res = run_exchanges(bench, trials, room, (400.0, 800.0), utts, progress)
            elif scenario == "startup":
                res = run_startup(bench, startup_trials, room, utts, progress, args.warm_startup)
            else:
                res = run_silent(bench, silent_s, [ROOMS[r] for r in args.silent_rooms], progress)
            summary = res.summary()
            results["scenarios"][scenario] = summary
            print_table(
                f"{scenario} ({room.name if scenario != 'silent' else 'every room'})", summary
            )
    finally:
        bench.close()
    results["wall_s"] = round(time.monotonic() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        progress(f"wrote {args.json}")
    progress(f"done in {results['wall_s']:.0f} s; node logs under {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
