"""``speaker_node``: ``omni/speech`` (AudioChunk) -> a speaker, on schedule; reports what it played.

Run: ``ros2 run omni_ros speaker_node --ros-args -p device:=USB`` (or
``ros2 launch omni_ros omni_flow.launch.py with_speaker:=true``).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from rclpy.node import Node
from std_msgs.msg import Bool
from std_srvs.srv import Trigger

from omni_ros import topics
from omni_ros.audio_io import (
    AudioFormat,
    AudioSink,
    NullSink,
    PyAudioSink,
    WavFileSink,
)
from omni_ros.core.audio import decode_audio, encode_audio, resample
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.core.types import PlaybackReport
from omni_ros.ros import conversions as conv
from omni_ros.ros._run import publish_unless_shut_down, spin_node
from omni_ros.ros.qos import profile
from omni_ros_msgs.msg import AudioChunk, Playback
from omni_ros_msgs.msg import SpeechFlush as SpeechFlushMsg

#: name -> (default, description). The node declares exactly these; tests read this table.
PARAMETERS: dict[str, tuple[Any, str]] = {
    "sink": ("pyaudio", "pyaudio (a sound card), wav (write to wav_path), null (discard)"),
    "device": ("", "PortAudio output: index, unique part of its name, or '' for the default"),
    "sample_rate": (24000, "playback rate [Hz]; chunks at other rates are resampled"),
    "channels": (1, "playback channels; mono speech is copied to every channel"),
    "block_ms": (20, "write granularity [ms]: a flush stops playback within one block"),
    "late_tolerance_ms": (
        30.0,
        "a chunk that arrived later than this after its write time is late (played whole); one "
        "that arrived in time but would be heard this much late (the device fell behind) has "
        "its late start dropped so that the rest plays on its stamps",
    ),
    "max_ahead_s": (5.0, "stamps further ahead than this are a clock mismatch: play now"),
    "release_ms": (150.0, "speaker/playing goes false after the queue stayed empty this long"),
    "wav_path": ("", "output file for sink=wav"),
    "keep_alive": (
        "auto",
        "between turns, keep the device fed with silence so that speech after a pause follows "
        "on sample-exactly (the echo canceller's reference stays aligned with the echo): on, "
        "off, or auto (on for sink=pyaudio on the wall clock)",
    ),
}

KEEP_ALIVE = ("auto", "on", "off")


def keep_alive_enabled(mode: str, sink_kind: str, sim_time: bool) -> bool:
    """Whether the player keeps the device fed between turns (see :class:`SpeakerNode`).

    ``auto`` is on for a sound card (``sink_kind`` ``pyaudio``; ``""`` for a sink passed in
    code) on the wall clock: under sim time the ROS clock runs at the bag's pace, not the
    device's, and silence "until now" would fill a device that plays in wall time.

    Raises:
        ConfigError: ``mode`` is not one of :data:`KEEP_ALIVE`.
    """
    if mode not in KEEP_ALIVE:
        raise ConfigError(f"keep_alive = {mode!r}; use {', '.join(KEEP_ALIVE)}")
    return mode == "on" or (mode == "auto" and sink_kind == "pyaudio" and not sim_time)


#: How late a write may come after the audio written before it has played out and still follow
#: on without a gap (the paced sinks of ``audio_io`` allow the same).
DEVICE_SLACK_NS = 5_000_000


class Playhead:
    """Where the device is in what it was given: when the next sample written will be heard.

    Every write is heard right after the audio written before it if it comes before that audio
    has played out (within ``slack_ns``: a device's buffer holds the rest), else, after an
    underrun or a pause, ``latency_ns`` after the write. All times on the node's clock.

    A blocking sink (PortAudio's blocking ``Pa_WriteStream``, the paced sinks of ``audio_io``)
    returns from a write once the data fits in its buffer, so a player that is late to write
    its next block (a busy machine, the GIL) makes the device run dry, and from then on
    everything plays that much later than scheduled. The player uses this model to see that it
    has fallen behind, and by how much, before it writes the next chunk.
    """

    def __init__(self, slack_ns: int = DEVICE_SLACK_NS) -> None:
        self.slack_ns = slack_ns
        self.end_ns: int | None = None  # when the audio written so far has played out

    def heard_at(self, now_ns: int, latency_ns: int) -> int:
        """When audio written at ``now_ns`` would start being heard."""
        if self.end_ns is not None and now_ns <= self.end_ns + self.slack_ns:
            return self.end_ns
        return now_ns + latency_ns

    def wrote(self, now_ns: int, latency_ns: int, duration_ns: int) -> int:
        """A write of ``duration_ns`` of audio began at ``now_ns``; returns when it is heard."""
        start = self.heard_at(now_ns, latency_ns)
        self.end_ns = start + duration_ns
        return start


def resync_frames(heard_ns: int, stamp_ns: int, rate: int, tolerance_ns: int) -> int:
    """Frames to drop from the start of a chunk stamped ``stamp_ns`` that would be heard at
    ``heard_ns``, so that its remaining frames are heard on their stamps; 0 within
    ``tolerance_ns``."""
    behind = heard_ns - stamp_ns
    if behind <= tolerance_ns:
        return 0
    return -(-behind * rate // NS_PER_S)  # rounded up: never early


@dataclass(frozen=True)
class _Queued:
    stamp_ns: int
    pcm: bytes
    generation: int
    turn_id: int
    sample_rate: int  # of the chunk as published (Playback reports count in it)
    samples: int
    end_ns: int  # stamp + duration: a flush from dropped_from on covers it if end > dropped_from
    arrived_ns: int = 0  # when the node received it


def _covered(item: _Queued, turn_id: int, from_ns: int, now_ns: int) -> bool:
    """Whether a flush of turns <= ``turn_id`` from ``from_ns`` on cancels this chunk: one that
    would play after ``from_ns``, and, once that time has come, anything of those turns still
    queued or playing (a player running behind its stamps must not finish them late)."""
    return item.turn_id <= turn_id and (
        item.stamp_ns <= 0 or item.end_ns > from_ns or now_ns >= from_ns
    )


def chunk_to_pcm(msg: AudioChunk, fmt: AudioFormat) -> bytes:
    """Decode an AudioChunk (any rate, channels, encoding) into ``fmt``'s PCM.

    Raises:
        DecodeError: unknown encoding, truncated data, bad rate or channel count.
    """
    block = decode_audio(conv.audio_chunk_to_raw(msg))
    samples = resample(block.samples, block.sample_rate, fmt.sample_rate)
    mono = encode_audio(samples, fmt.encoding)
    if fmt.channels == 1 or not samples.size:
        return mono
    width = len(mono) // max(1, len(samples))
    frames = np.frombuffer(mono, dtype=np.uint8).reshape(-1, width)
    return np.repeat(frames, fmt.channels, axis=0).tobytes()


class SpeakerNode(Node):
    """Plays speech chunks at their stamps; one playback thread owns the sink.

    Parameters: see :data:`PARAMETERS` (``sink``, ``device``, ``sample_rate``, ``channels``,
    ``block_ms``, ``late_tolerance_ms``, ``max_ahead_s``, ``release_ms``, ``wav_path``,
    ``keep_alive``).

    Keep-alive: a device that ran dry starts again when the next write comes, at a time only
    known to the microseconds the clock was read at (measured in the conversation benchmark:
    reports 25-440 us early, a new value each turn). Each turn's echo is then shifted by that
    much against the turn before, which the echo canceller's converged filter does not model
    (half a 16 kHz sample, 31 us, already leaves 8 dB of a 2 kHz echo; docs/BENCHMARKS.md, "Turn
    onsets"). So, like WebRTC's audio device module, which renders silence while nothing plays,
    the player writes silence between turns (never past the next chunk's stamp): the device's
    timeline runs on, each turn starts exactly where the silence before it ended, and only the
    first write of a run starts the device.

    Topics in:
        ``omni/speech`` (omni_ros_msgs/AudioChunk, reliable): ``header.stamp`` is the time the
        first sample should be heard (ROS clock; sim time works). A chunk is written
        ``sink.latency_ns`` before its stamp; a chunk that arrived too late plays at once and is
        counted (``late_chunks``); a zero stamp means "now". If the device ran dry mid-speech
        (this node was late to write a block: a loaded machine), the next chunk's late start
        is dropped so that the rest plays on its stamps (``resynced_chunks``,
        ``resync_dropped_ns``; see :class:`Playhead`).
        ``omni/speech_flush`` (omni_ros_msgs/SpeechFlush, reliable): every queued chunk of a turn
        up to ``turn_id`` that would play at or after ``dropped_from`` is dropped, the one
        playing stops within one ``block_ms``, and chunks of those turns that arrive later are
        dropped too (``dropped_after_flush``): whatever the model's mode was.
    Topics out:
        ``speaker/playback`` (omni_ros_msgs/Playback, reliable): one report per chunk as it is
        written to the device, stamped with when its first sample will be heard (so the flow
        learns the device's buffering from how far ahead reports come; ``scheduled``: the stamp
        of that sample, the chunk's own stamp unless its start was dropped), and one with ``cut``
        when a flush stops it early: the echo canceller's reference and the conversation's
        ground truth.
        ``speaker/playing`` (std_msgs/Bool, reliable, transient-local): true while our speech
        plays, false once the queue stayed empty for ``release_ms`` or right after a flush.
        (``robot_speaking`` is for OTHER speech on the robot; this node does not publish it.)
    Services:
        ``speaker/flush`` (std_srvs/Trigger): drop everything queued and stop playing; the
        response message also reports the late / clock-mismatch / decode-error counts.

    Tests and machines without a sound card use ``sink:=wav``/``null`` or pass ``sink=`` (any
    :class:`~omni_ros.audio_io.AudioSink`) to the constructor.
    """

    def __init__(self, *, sink: AudioSink | None = None, **kwargs: Any) -> None:
        super().__init__("speaker_node", **kwargs)
        # Set before anything can raise: rclpy destroys half-built nodes at shutdown.
        self._cond = threading.Condition()
        self._stop = False
        self._closable: AudioSink | None = None  # closed by destroy_node once it exists
        self._thread: threading.Thread | None = None
        for name, (default, _doc) in PARAMETERS.items():
            self.declare_parameter(name, default)
        p = {name: self.get_parameter(name).value for name in PARAMETERS}
        fmt = AudioFormat(int(p["sample_rate"]), int(p["channels"]), "S16LE")
        self._block_frames = max(1, fmt.sample_rate * int(p["block_ms"]) // 1000)
        self._sink = sink if sink is not None else self._open_sink(str(p["sink"]), p, fmt)
        self._closable = self._sink
        self._late_ns = int(float(p["late_tolerance_ms"]) * 1e6)
        self._max_ahead_ns = int(float(p["max_ahead_s"]) * NS_PER_S)
        self._release_s = float(p["release_ms"]) / 1000.0
        self._queue: collections.deque[_Queued] = collections.deque()
        self._generation = 0
        self._speaking: bool | None = None
        self._playing: _Queued | None = None
        self._flushed_turn = 0  # chunks of turns <= this ...
        self._flushed_from_ns = 0  # ... playing at or after this are cancelled
        self._frame_id = str(p["device"]) or str(p["sink"])
        self._keep_alive = keep_alive_enabled(
            str(p["keep_alive"]),
            str(p["sink"]) if sink is None else "",
            bool(self.get_parameter("use_sim_time").value),
        )
        self._zeros = bytes(self._block_frames * fmt.bytes_per_frame)
        self.writing_silence = False  # a keep-alive write is under way (for device simulations)
        self._playhead = Playhead()
        # How late the speech now playing is because a chunk of it came late (played whole).
        self._accepted_late_ns = 0
        self.late_chunks = 0
        self.resynced_chunks = 0  # arrived in time; their late start dropped after an underrun
        self.resync_dropped_ns = 0  # how much speech that dropped in all
        self.clock_mismatches = 0
        self.decode_errors = 0
        self.flushes = 0
        self.dropped_after_flush = 0
        # Names and QoS from the topic table (omni_ros/topics.py). omni/speech_flush is volatile
        # on purpose: a flush from before this node started must not cut anything.
        playing, playback = topics.PLAYING, topics.PLAYBACK
        self._speaking_pub = self.create_publisher(Bool, playing.name, profile(playing))
        self._playback_pub = self.create_publisher(Playback, playback.name, profile(playback))
        self._set_speaking(False)
        speech, flush = topics.SPEECH, topics.SPEECH_FLUSH
        self.create_subscription(
            AudioChunk, speech.name, self._on_speech, profile(speech, subscriber=True)
        )
        self.create_subscription(
            SpeechFlushMsg, flush.name, self._on_flush_msg, profile(flush, subscriber=True)
        )
        self.create_service(Trigger, topics.SPEAKER_FLUSH, self._on_flush)
        # Said from the executor, not the playback thread (a log call there can take 100+ ms).
        self._resyncs_logged = 0
        self.create_timer(5.0, self._log_resyncs)
        self._thread = threading.Thread(target=self._playback, name="speaker_playback", daemon=True)
        self._thread.start()

    @staticmethod
    def _open_sink(kind: str, p: dict[str, Any], fmt: AudioFormat) -> AudioSink:
        if kind == "wav":
            if not p["wav_path"]:
                raise ConfigError("sink=wav needs the wav_path parameter")
            return WavFileSink(str(p["wav_path"]), fmt)
        if kind == "null":
            return NullSink(fmt)
        if kind == "pyaudio":
            return PyAudioSink(str(p["device"]), fmt, max(1, fmt.sample_rate // 50))
        raise ConfigError(f"sink={kind!r} unknown; use pyaudio, wav or null")

    # ------------------------------------------------------------------ callbacks: only store
    def _on_speech(self, msg: AudioChunk) -> None:
        try:
            pcm = chunk_to_pcm(msg, self._sink.format)
        except (DecodeError, ConfigError) as exc:
            self.decode_errors += 1
            self.get_logger().warning(f"dropped a speech chunk: {exc}", throttle_duration_sec=5.0)
            return
        stamp_ns = conv.stamp_to_ns(msg.header.stamp)
        rate = max(1, int(msg.sample_rate))
        samples = len(msg.data) // max(1, int(msg.channels) * (4 if msg.encoding == "F32LE" else 2))
        end_ns = stamp_ns + samples * NS_PER_S // rate
        now_ns = self._now_ns()
        item = _Queued(stamp_ns, pcm, 0, int(msg.turn_id), rate, samples, end_ns, now_ns)
        with self._cond:
            flushed = _covered(item, self._flushed_turn, self._flushed_from_ns, now_ns)
            if item.turn_id > 0 and flushed:
                self.dropped_after_flush += 1  # published before the flush reached its producer
                return
            self._queue.append(dataclasses.replace(item, generation=self._generation))
            self._cond.notify_all()

    def _on_flush_msg(self, msg: SpeechFlushMsg) -> None:
        flush = conv.msg_to_flush(msg)
        self.flush(flush.turn_id, flush.dropped_from_ns)

    def _on_flush(self, _req: Trigger.Request, res: Trigger.Response) -> Trigger.Response:
        dropped = self.flush()
        res.success = True
        res.message = (
            f"dropped {dropped} queued chunk(s); so far: late_chunks={self.late_chunks} "
            f"resynced_chunks={self.resynced_chunks} "
            f"resync_dropped_ms={self.resync_dropped_ns / 1e6:.0f} "
            f"clock_mismatches={self.clock_mismatches} decode_errors={self.decode_errors}"
        )
        return res

    def _log_resyncs(self) -> None:
        if self.resynced_chunks > self._resyncs_logged:
            self._resyncs_logged = self.resynced_chunks
            self.get_logger().warning(
                f"the device ran dry mid-speech: {self.resynced_chunks} chunk(s) so far had "
                f"their late start dropped to play on time "
                f"({self.resync_dropped_ns / 1e6:.0f} ms of speech in all)"
            )

    def flush(self, turn_id: int | None = None, from_ns: int = 0) -> int:
        """Drop queued chunks and stop the one playing; returns how many were dropped.

        Args:
            turn_id: only chunks of turns up to this one (and later arrivals of them); None = all
                turns queued now (the ``speaker/flush`` service).
            from_ns: only chunks that would still play at or after this time.
        """
        now_ns = self._now_ns()
        with self._cond:
            if turn_id is None:
                turn_id = max((q.turn_id for q in self._queue), default=0)
                if self._playing is not None:
                    turn_id = max(turn_id, self._playing.turn_id)
            if turn_id > self._flushed_turn or (
                turn_id == self._flushed_turn and from_ns < self._flushed_from_ns
            ):
                self._flushed_turn, self._flushed_from_ns = turn_id, from_ns
            kept = collections.deque(
                q for q in self._queue if not _covered(q, turn_id, from_ns, now_ns)
            )
            dropped = len(self._queue) - len(kept)
            self._queue = kept
            playing = self._playing
            cut = playing is not None and _covered(playing, turn_id, from_ns, now_ns)
            if cut:
                self._generation += 1
            self.flushes += 1
            self._cond.notify_all()
        if cut:
            self._sink.flush()
        return dropped

    # --------------------------------------------------------------------- playback thread
    def _set_speaking(self, speaking: bool) -> None:
        if speaking != self._speaking:
            self._speaking = speaking
            self._publish(self._speaking_pub, Bool(data=speaking))

    def _publish(self, publisher: Any, msg: Any) -> None:
        """Publish from the playback thread; after Ctrl-C shut the context down, stop quietly
        (the thread can be mid-chunk when the context goes) instead of dying with a traceback."""
        if not publish_unless_shut_down(self, publisher, msg):
            with self._cond:
                self._stop = True
                self._cond.notify_all()

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _report(self, item: _Queued, heard_ns: int, samples: int, late: bool, cut: bool) -> None:
        report = PlaybackReport(
            heard_ns, item.turn_id, item.stamp_ns, item.sample_rate, samples, late, cut
        )
        self._publish(self._playback_pub, conv.playback_to_msg(report, self._frame_id))

    def _playback(self) -> None:
        idle_since: int | None = None  # when the queue went empty (keep-alive's release timer)
        while True:
            alive = self._keep_alive and self._playhead.end_ns is not None
            with self._cond:
                if not self._queue and not self._stop:
                    timeout = self._release_s if self._speaking else None
                    if alive:  # wake each block to keep the device fed
                        tick = self._block_frames / self._sink.format.sample_rate / 2
                        timeout = tick if timeout is None else min(timeout, tick)
                    self._cond.wait(timeout)
                if self._stop:
                    return
                item = self._queue.popleft() if self._queue else None
                current = self._generation
                self._playing = item  # a flush covers the chunk waiting for its time too
            if item is None:
                if alive:
                    now = self._now_ns()
                    self._keep_fed(now + self._sink.latency_ns)
                    idle_since = now if idle_since is None else idle_since
                    if self._speaking and now - idle_since >= self._release_s * NS_PER_S:
                        self._set_speaking(False)  # the speech itself played out long ago
                    continue
                # idle for release_ms: whatever was written has been heard
                self._sink.drain()
                self._set_speaking(False)
                continue
            idle_since = None
            if item.generation != current:
                self._playing = None
                continue
            due = self._wait_until_due(item, current)
            if due is None:
                self._playing = None
                self._set_speaking(False)
                continue
            item, late = self._resync(item, due)
            if item is None:  # all of it would have been heard before now
                with self._cond:
                    self._playing = None
                continue
            if self._keep_alive and not late:
                self._keep_fed(item.stamp_ns)  # the chunk starts exactly on its stamp
            self._set_speaking(True)
            # Reported before the write, so that the flow has the reference in time: after a
            # pause the device starts when the write comes, the report's publish (~1 ms) later,
            # and the next chunk's report follows on from there. The echo canceller moves such
            # a first chunk to where the next one began (omni_ros.core.aec).
            heard_ns = self._playhead.heard_at(self._now_ns(), self._sink.latency_ns)
            self._report(item, heard_ns, item.samples, late, False)
            played = self._play(item.pcm, current)
            with self._cond:
                self._playing = None
            if not played:
                # Cut by a flush: what is heard is what reached the device. It plays out what it
                # holds (no sink here can drop it: PyAudio has no abort), so the echo canceller
                # needs that part too (reported only until now, its echo went uncancelled).
                end = self._playhead.end_ns if self._playhead.end_ns is not None else heard_ns
                heard = (end - heard_ns) * item.sample_rate // NS_PER_S
                self._report(item, heard_ns, int(min(max(heard, 0), item.samples)), late, True)
                self._set_speaking(False)

    def _keep_fed(self, until_ns: int) -> None:
        """Keep-alive: write silence (in ``block_ms`` writes) so that the device plays on until
        ``until_ns``, unless it already ran dry (then the next write starts it afresh, as
        without keep-alive). Silence is never reported: the echo canceller's reference is zero
        wherever no speech was reported."""
        fmt = self._sink.format
        end = self._playhead.end_ns
        now = self._now_ns()
        if end is None or now > end + self._playhead.slack_ns:
            return
        frames = (until_ns - end) * fmt.sample_rate // NS_PER_S
        self.writing_silence = True
        try:
            while frames > 0:
                n = min(frames, self._block_frames)
                self._playhead.wrote(self._now_ns(), self._sink.latency_ns, fmt.duration_ns(n))
                self._sink.write(self._zeros[: n * fmt.bytes_per_frame])
                frames -= n
        finally:
            self.writing_silence = False

    def _resync(self, item: _Queued, behind: bool) -> tuple[_Queued | None, bool]:
        """The chunk as it will play, and whether it counts as late.

        A chunk that came too late to be written on time (the schedule or the way here was late)
        plays whole, at once, and is counted in ``late_chunks``. One that arrived in time but
        would be heard more than ``late_tolerance_ms`` after its stamp (the device ran dry, see
        :class:`Playhead`, or a late chunk before it delayed it) has its late start dropped: the
        rest is heard on its stamps, as scheduled (the echo canceller's reference and the turn's
        timing stay right), and the drop is counted (``resynced_chunks``, ``resync_dropped_ns``)
        and reported: its Playback report's ``scheduled`` is the stamp of its first sample heard.
        Behind late chunks, a chunk that would have to be dropped whole to catch up plays whole
        and late instead (a burst of late speech is not thrown away); after an underrun it is
        dropped (the device, not the speech, was late).
        """
        if not behind:
            self._accepted_late_ns = 0  # on time: a new stretch of speech
            return item, False
        latency = self._sink.latency_ns
        heard = self._playhead.heard_at(self._now_ns(), latency)
        if item.arrived_ns > item.stamp_ns - latency + self._late_ns:
            self._accepted_late_ns = max(0, heard - item.stamp_ns)
            self.late_chunks += 1
            return item, True
        rate = self._sink.format.sample_rate
        bpf = self._sink.format.bytes_per_frame
        frames = resync_frames(heard, item.stamp_ns, rate, self._late_ns)
        if frames * bpf >= len(item.pcm) and self._accepted_late_ns > self._late_ns:
            self.late_chunks += 1  # waits behind late speech: played late, not thrown away
            return item, True
        self._accepted_late_ns = 0
        dropped_ns = frames * NS_PER_S // rate
        self.resynced_chunks += 1
        self.resync_dropped_ns += min(dropped_ns, item.end_ns - item.stamp_ns)
        offset = frames * bpf
        if offset >= len(item.pcm):
            return None, False
        src = min(item.samples, frames * item.sample_rate // rate)
        trimmed = dataclasses.replace(
            item,
            pcm=item.pcm[offset:],
            stamp_ns=item.stamp_ns + src * NS_PER_S // item.sample_rate,
            samples=item.samples - src,
        )
        return trimmed, False

    def _wait_until_due(self, item: _Queued, generation: int) -> bool | None:
        """Wait for the chunk's write time; None if flushed or stopping meanwhile, else whether
        the chunk starts late."""
        if item.stamp_ns <= 0:
            return False
        due_ns = item.stamp_ns - self._sink.latency_ns
        now = self._now_ns()
        if due_ns - now > self._max_ahead_ns:
            self.clock_mismatches += 1
            self.get_logger().warning(
                f"speech stamped {(due_ns - now) / 1e9:.1f} s ahead (clock mismatch?): playing now",
                throttle_duration_sec=5.0,
            )
            return False
        heard = self._playhead.heard_at(now, self._sink.latency_ns)
        if heard - item.stamp_ns > self._late_ns:
            return True  # _resync: late, or the device fell behind
        if due_ns - now > self._release_s * NS_PER_S:
            self._set_speaking(False)  # a real pause in the speech, not a gap between chunks
        while now < due_ns:
            if self._keep_alive:  # the device plays on until the chunk, never past its stamp
                self._keep_fed(min(now + self._sink.latency_ns, item.stamp_ns))
            with self._cond:
                # Poll: under sim time the ROS clock does not follow the wall clock.
                self._cond.wait(min((due_ns - now) / NS_PER_S, 0.01))
                if self._stop or self._generation != generation:
                    return None
            now = self._now_ns()
        return False

    def _play(self, pcm: bytes, generation: int) -> bool:
        fmt = self._sink.format
        step = self._block_frames * fmt.bytes_per_frame
        for offset in range(0, len(pcm), step):
            if self._stop or self._generation != generation:
                return False
            block = pcm[offset : offset + step]
            self._playhead.wrote(
                self._now_ns(), self._sink.latency_ns, fmt.duration_ns(fmt.frames(block))
            )
            self._sink.write(block)
        return True

    def destroy_node(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        if self._closable is not None:
            self._closable.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    spin_node(SpeakerNode, "speaker_node", args)


if __name__ == "__main__":
    main()
