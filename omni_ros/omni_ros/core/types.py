"""Plain data types shared by the core, the backends and the ROS layer.

Time is always ``int`` nanoseconds with the unit in the name. Audio inside the core is mono float32 in
[-1, 1]; images inside the core are ``uint8`` RGB arrays of shape (H, W, 3). These types mirror the
omni_ros_msgs interfaces without importing them: ``omni_ros.ros.conversions`` is the only place that
knows both.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
ImageArray = npt.NDArray[np.uint8]


# --------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class RawAudio:
    """Audio exactly as it arrives in an ``AudioChunk`` message (not yet decoded).

    Attributes:
        stamp_ns: capture time of the FIRST sample.
        sample_rate: samples per second per channel.
        channels: interleaved channel count.
        encoding: ``"S16LE"`` or ``"F32LE"`` (interleaved little-endian PCM).
        data: the raw bytes.
        source: device / frame_id, used to keep separate streams apart.
        received_ns: clock time the node had the message (the middleware's receive time where
            known, else the callback's); 0: unknown, :meth:`OmniFlow.push_audio` uses its own
            time. It tells an executor stall from late input (docs/RELIABILITY.md).
    """

    stamp_ns: int
    sample_rate: int
    channels: int
    encoding: str
    data: bytes
    source: str = ""
    received_ns: int = 0


@dataclass(frozen=True)
class AudioBlock:
    """Decoded mono audio: ``samples[i]`` was captured at ``stamp_ns + i * 1e9 / sample_rate``."""

    stamp_ns: int
    sample_rate: int
    samples: FloatArray

    @property
    def duration_ns(self) -> int:
        return round(len(self.samples) * 1_000_000_000 / self.sample_rate)


@dataclass(frozen=True)
class RawImage:
    """An image exactly as it arrives in ``sensor_msgs/Image`` or ``CompressedImage``.

    For a raw image ``encoding`` is the ROS encoding (rgb8, bgr8, ...) and ``step`` the row length in
    bytes (may include padding). For a compressed image ``encoding`` is the ``format`` string
    (``"jpeg"``, ``"png"``, ``"rgb8; jpeg compressed bgr8"``, ...) and width/height/step are 0.
    """

    stamp_ns: int
    encoding: str
    data: bytes
    width: int = 0
    height: int = 0
    step: int = 0
    is_bigendian: bool = False
    compressed: bool = False


@dataclass(frozen=True)
class VideoFrame:
    """A decoded frame: ``rgb`` is uint8 (H, W, 3), captured at ``stamp_ns``."""

    stamp_ns: int
    rgb: ImageArray


@dataclass(frozen=True)
class Unit:
    """One Omni-Flow unit: everything the model gets for [start_ns, end_ns).

    Attributes:
        index: unit number since the timeline origin (0 is the first, possibly longer, unit).
        start_ns: unit start on the ROS clock.
        end_ns: unit end (exclusive).
        audio: mono float32 at ``sample_rate``, exactly the unit's length in samples.
        sample_rate: rate of ``audio`` (the backend's input rate).
        frames: frames chosen for this unit by the frame policy (oldest first).
        gap_samples: samples of ``audio`` that were zero-filled because nothing arrived for them.
        user_speech: whether the VAD heard the user in this unit (set by the session; None = unknown).
        texts: text injected into the conversation in this unit (e.g. an Ask goal).
    """

    index: int
    start_ns: int
    end_ns: int
    audio: FloatArray
    sample_rate: int
    frames: tuple[VideoFrame, ...] = ()
    gap_samples: int = 0
    user_speech: bool | None = None
    texts: tuple[str, ...] = ()

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


# -------------------------------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class UnitResult:
    """What a backend returns for one unit (see ``omni_ros.backends.base.Backend.generate``).

    Attributes:
        is_listen: the model chose to listen in this unit.
        text: only the NEW text of this unit (special tokens removed).
        audio: float32 mono speech at the backend's output rate (24 kHz), or None.
        end_of_turn: the model ended its turn in this unit.
        timings_ms: per-stage compute times in milliseconds (e.g. ``{"prefill": 12.0, "llm": 30.1}``).
        barge_in: the backend's own voice activity detection cut the model's speech (e.g.
            vllm-omni's server VAD): the session flushes the speech still scheduled, as for a
            barge-in the flow detected itself.
    """

    is_listen: bool
    text: str = ""
    audio: FloatArray | None = None
    end_of_turn: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
    barge_in: bool = False


class Mode(enum.IntEnum):
    """Duplex session modes; the values equal ``omni_ros_msgs/OmniState`` constants."""

    LISTENING = 0
    SPEAKING = 1
    INTERRUPTED = 2
    PAUSED = 3
    ERROR = 4


@dataclass(frozen=True)
class SpeechOut:
    """Speech to publish: ``samples[0]`` is scheduled to play at ``stamp_ns``."""

    stamp_ns: int
    turn_id: int
    unit_index: int
    sample_rate: int
    samples: FloatArray


@dataclass(frozen=True)
class TextOut:
    """Streaming text: ``stamp_ns`` is the start of the unit that produced it."""

    stamp_ns: int
    turn_id: int
    unit_index: int
    text: str
    end_of_turn: bool
    proactive: bool


@dataclass(frozen=True)
class ProactiveEvent:
    """The model spoke unprompted. Emitted once at turn start (``completed=False``, no text yet)
    and once at turn end (``completed=True``, full text, kind from the classifier)."""

    stamp_ns: int
    turn_id: int
    trigger_stamp_ns: int
    kind: str
    text: str
    confidence: float
    completed: bool


#: Causes of dropped microphone samples (``Counters.audio_dropped_<cause>``, OmniState order).
AUDIO_DROP_CAUSES = (
    "late",
    "stall",
    "queue_full",
    "reorder",
    "overrun",
    "paused",
    "reset",
    "future",
    "duplicate",
    "bad_input",
)
#: Causes of zero-filled unit samples (``Counters.gap_filled_<cause>``, OmniState order).
GAP_FILL_CAUSES = ("missing", "late", "stall")


@dataclass
class Counters:
    """Every drop / late / gap counter. They surface in OmniState and /diagnostics.

    Mutated only by the thread that owns the core objects; copy with :meth:`snapshot` to read
    from another thread.
    """

    dropped_frames: int = 0
    dropped_audio_samples: int = 0
    late_messages: int = 0
    gap_samples_filled: int = 0
    duplicate_samples: int = 0
    decode_errors: int = 0
    clock_jumps: int = 0
    future_messages: int = 0
    nonfinite_samples: int = 0
    units_dropped_overrun: int = 0
    backend_errors: int = 0
    backend_timeouts: int = 0
    barge_ins: int = 0
    late_speech: int = 0  # speech generated too late for its schedule: moved later (a pause)
    playback_late_chunks: int = 0  # chunks the speaker reported as started late (speaker/playback)
    prompt_errors: int = 0  # set_prompt requests whose prepare failed (the old prompt stayed)
    # ---- where every microphone sample went (docs/RELIABILITY.md, "Audio accounting") ----
    # audio_samples_in = audio_samples_used + sum(audio_dropped_*) + samples still held;
    # dropped_audio_samples is the sum of the audio_dropped_* counters.
    audio_samples_in: int = 0  # samples (frames) of every audio message given to the flow
    audio_samples_used: int = 0  # received samples in units given to the backend (no gap fill)
    audio_dropped_late: int = 0  # arrived after their unit had closed (publisher or network late)
    audio_dropped_stall: int = 0  # reached the node before their unit closed, processed after it
    audio_dropped_queue_full: int = 0  # the flow's input queue overflowed (oldest dropped)
    audio_dropped_reorder: int = 0  # the mic stream broke (a chunk outside the reorder hold, a gap)
    audio_dropped_overrun: int = 0  # in units the overrun policy dropped or skipped
    audio_dropped_paused: int = 0  # in units consumed while paused
    audio_dropped_reset: int = 0  # buffered when a reset, new prompt or clock jump restarted
    audio_dropped_future: int = 0  # stamped beyond clock + max_future_ns
    audio_dropped_duplicate: int = 0  # a second copy of samples already received (first wins)
    audio_dropped_bad_input: int = 0  # undecodable, over flow.max_chunk_ms, not placeable
    # gap_samples_filled = gap_filled_missing + gap_filled_late + gap_filled_stall
    gap_filled_missing: int = 0  # zero-filled: nothing arrived for them (yet)
    gap_filled_late: int = 0  # zero-filled: they arrived later, late (audio_dropped_late)
    gap_filled_stall: int = 0  # zero-filled: they were at the node in time (audio_dropped_stall)

    def drop_audio(self, cause: str, samples: int) -> None:
        """Count ``samples`` dropped for ``cause`` (an ``audio_dropped_<cause>`` counter) and in
        the total ``dropped_audio_samples``."""
        if samples <= 0:
            return
        name = f"audio_dropped_{cause}"
        setattr(self, name, getattr(self, name) + samples)
        self.dropped_audio_samples += samples

    def audio_drops(self) -> dict[str, int]:
        """The dropped samples by cause (the ``audio_dropped_`` counters without the prefix)."""
        return {c: getattr(self, f"audio_dropped_{c}") for c in AUDIO_DROP_CAUSES}

    def gap_fills(self) -> dict[str, int]:
        """The zero-filled samples by cause (the ``gap_filled_`` counters without the prefix)."""
        return {c: getattr(self, f"gap_filled_{c}") for c in GAP_FILL_CAUSES}

    def snapshot(self) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)


@dataclass(frozen=True)
class StateOut:
    """Published every unit as ``OmniState``."""

    stamp_ns: int
    mode: Mode
    unit_index: int
    unit_compute_ms: float
    real_time_factor: float
    counters: Counters
    backend: str
    turn_id: int = 0
    user_speaking: bool = False
    playing: bool = False
    error: str = ""


#: Why speech was cancelled; the values are ``omni_ros_msgs/SpeechFlush`` reason names, lower case.
FLUSH_REASONS = ("barge_in", "interrupt", "reset", "error", "stop")


@dataclass(frozen=True)
class SpeechFlush:
    """Speech of turns up to ``turn_id`` that would play in ``[dropped_from_ns, dropped_until_ns)``
    or later must not play: published for every cancelled span, whatever the session's mode.

    The player stops and drops everything queued (and arriving later) of those turns from
    ``dropped_from_ns`` on. ``stamp_ns`` is the cause's time: for a barge-in the onset of the
    user's speech, otherwise the decision time. ``decided_ns`` is the clock time the decision was
    taken (a player's stop latency is measured from it). An empty span (from == until) still ends
    the turn.
    """

    stamp_ns: int
    turn_id: int
    dropped_from_ns: int
    dropped_until_ns: int
    reason: str = "barge_in"
    decided_ns: int = 0

    def __post_init__(self) -> None:
        if self.reason not in FLUSH_REASONS:
            raise ValueError(f"SpeechFlush.reason {self.reason!r} not in {FLUSH_REASONS}")


@dataclass(frozen=True)
class PlaybackReport:
    """The speaker really played ``samples`` samples of a chunk of ``turn_id`` from ``heard_ns`` on
    (``cut``: a flush stopped it there). ``scheduled_ns`` is the chunk's own stamp."""

    heard_ns: int
    turn_id: int
    scheduled_ns: int
    sample_rate: int
    samples: int
    late: bool = False
    cut: bool = False


@dataclass(frozen=True)
class VoiceActivity:
    """The VAD's view changed: the user started (``speaking``, ``stamp_ns`` = onset) or stopped."""

    stamp_ns: int
    speaking: bool


OutputEvent = SpeechOut | TextOut | ProactiveEvent | StateOut | SpeechFlush | VoiceActivity
