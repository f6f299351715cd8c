"""The Omni-Flow timeline: cut stamped audio and video into fixed units on one clock.

Unit ``k`` covers ``[start_ns(k), end_ns(k))`` with ``start_ns(0) = origin_ns``, the first unit
``first_unit_ns`` long (MiniCPM-o 4.5 uses 1.035 s) and every later unit ``unit_ns`` long. A unit
closes, and :meth:`Timeline.poll` returns it, once the clock passes its end plus ``watermark_ns``
(late-arrival slack), or, with ``close_when_complete`` (default), as soon as the clock has passed
its end and its audio has arrived without a gap: a live microphone stream that arrives in order
then costs no watermark at all, and the watermark only bounds the wait for audio that is missing.

Design (why it is chunking invariant):

* Audio is written into a per-source-rate sample buffer indexed by the *absolute* sample position
  relative to the origin, ``pos = round((stamp_ns - origin_ns) * rate / 1e9)``. Where a chunk
  boundary falls therefore never matters, and out-of-order chunks land where they belong.
* A unit is assembled from that buffer at the source rate. When the source rate differs from
  ``config.sample_rate`` the unit is resampled with soxr on a window that extends a few
  milliseconds (``resample_context_ns``, rounded out to the rates' common period) past both unit
  edges, and the unit's exact output samples are cut from the middle. The result depends only on
  the buffered samples, never on the chunking, and the boundaries are sample exact. (A stateful
  ``soxr.ResampleStream`` fed one unit at a time cannot do that: its filter delay holds back the
  last few milliseconds of each unit until the next one is fed, so unit k could not be completed
  when it closes.) Because of the right-hand context a resampled unit closes
  ``resample_context_ns`` (+ at most one common period) later than ``end + watermark``.
* A change of the source rate mid-stream opens a second buffer; units are assembled from every
  buffer (older buffers win where both have samples, the overlap is counted as duplicates), and
  buffers that run empty are dropped. Nothing already received is thrown away.
* Frames are kept (raw or decoded) until their unit closes; only the frames the policy chooses are
  decoded (:class:`~omni_ros.core.types.RawImage` is accepted and decoded lazily) and resized.
  With ``frame_policy: last`` a unit's frames that it can no longer choose go on arrival, so at
  most one (sure to decode) is held per open unit whatever the camera's rate.

Bad input never crashes the timeline and is never lost silently; each case is counted in the
shared :class:`~omni_ros.core.types.Counters`:

* out-of-order chunks within the watermark: placed where they belong, identical units;
* data for units already closed: ``late_messages`` +1, the late samples dropped as
  ``audio_dropped_late`` or, if the chunk was received before that unit closed,
  ``audio_dropped_stall`` (the part of a chunk that is still open is kept); the zero-filled
  gap they would have filled moves from ``gap_filled_missing`` to ``gap_filled_late`` /
  ``gap_filled_stall``; late frames in ``dropped_frames``;
* duplicate / overlapping samples: the first writer wins, the overlap is counted in
  ``duplicate_samples``, the non-overlapping part is kept; duplicate frame stamps: first wins,
  ``dropped_frames``;
* gaps: zero-filled, ``gap_samples_filled`` (``gap_filled_missing`` until late samples say
  otherwise) and ``Unit.gap_samples``;
* every received sample is used (``audio_samples_used``, when its unit closes) or dropped by
  cause (``Counters.drop_audio``); :meth:`Timeline.held_samples` is what is still open;
* stamps more than ``max_future_ns`` ahead of the clock: ``future_messages`` +1 and dropped;
* clock jumps backwards by more than ``clock_jump_ns`` (a looping bag): the timeline resets
  (new origin from the next input), ``clock_jumps`` +1, pending data counted as dropped, and
  :attr:`Timeline.last_poll_jumped` is True so the caller can reset its session too;
* NaN / inf samples (normally removed by :func:`omni_ros.core.audio.decode_audio`): zeroed and
  counted in ``nonfinite_samples``;
* a frame that fails lazy decoding: ``decode_errors`` and ``dropped_frames`` +1, the policy's
  next choice is used;
* the clock running far ahead (more than ``max_catchup_units`` units due at once): the oldest units
  are skipped, ``units_dropped_overrun`` + their received samples/frames as dropped.
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import soxr

from omni_ros.core.clock import NS_PER_S
from omni_ros.core.config import from_mapping
from omni_ros.core.errors import AlignmentError, ConfigError, DecodeError, StateError
from omni_ros.core.images import (
    RESIZE_FILTERS,
    RESIZE_POLICIES,
    check_image,
    decode_image,
    resize_for_backend,
)
from omni_ros.core.types import AudioBlock, Counters, FloatArray, RawImage, Unit, VideoFrame

FRAME_POLICIES = ("last", "nearest_end", "up_to_n")
RESAMPLE_QUALITIES = ("HQ", "VHQ")
_MAX_STASHED = 4096  # inputs held while deciding whether they are late or a clock jump's first
_MAX_CLOSED_GAPS = 256  # holes of closed units remembered to attribute late samples
_MAX_CLOSE_TIMES = 256  # (unit end, clock when it closed) of the latest closed units

BoolArray = npt.NDArray[np.bool_]


def _certain_to_decode(item: VideoFrame | RawImage) -> bool:
    """Whether choosing ``item`` cannot fail: decoded, or raw with every check passed."""
    if isinstance(item, VideoFrame):
        return item.rgb.size > 0
    if item.compressed:
        return False  # corrupt compressed data is only found by decoding it
    try:
        check_image(item)
    except DecodeError:
        return False
    return True


def _pos(delta_ns: int, rate: int) -> int:
    """``round(delta_ns * rate / 1e9)`` (half up), exact for any integer, negative included."""
    return (2 * delta_ns * rate + NS_PER_S) // (2 * NS_PER_S)


@dataclass(frozen=True)
class TimelineConfig:
    """How the timeline cuts units. Build from YAML / ROS parameters with :meth:`from_mapping`.

    Attributes:
        unit_ns: length of every unit after the first.
        first_unit_ns: length of unit 0 (MiniCPM-o 4.5: 1.035 s).
        sample_rate: rate of ``Unit.audio`` (the backend's input rate).
        watermark_ns: late-arrival slack: a unit closes when the clock reaches ``end + watermark``.
        max_future_ns: input stamped further than this ahead of the clock is dropped. Before the
            first poll the reference is the origin (with :meth:`Timeline.start`) or nothing.
        clock_jump_ns: a poll whose ``now_ns`` is this much earlier than the latest one is a clock
            jump (looping bag): the timeline resets. Smaller backward steps are ignored.
        frame_policy: ``"last"`` (latest frame stamped in the unit), ``"nearest_end"`` (the frame
            nearest the unit end, from ``[start, end + watermark)``, so a frame just after the end
            may be chosen by two units) or ``"up_to_n"`` (up to ``max_frames_per_unit`` frames
            nearest evenly spaced instants of the unit, oldest first).
        max_frames_per_unit: N for ``"up_to_n"`` (the other policies choose at most one).
        frame_size: if > 0, chosen frames are resized to ``frame_size`` x ``frame_size`` with
            ``resize_policy`` (see :func:`omni_ros.core.images.resize_for_backend`); 0 keeps them.
        resize_policy: ``"letterbox"``, ``"center_crop"`` or ``"stretch"``.
        resize_filter: ``"box"`` (fast) or ``"bilinear"`` (sharper); see ``resize_for_backend``.
        resample_quality: soxr quality for source rates other than ``sample_rate``: "HQ" / "VHQ".
        resample_context_ns: resampler context on each side of a unit (see module docstring).
        audio_snap_ns: a chunk whose first sample lands within this distance of the end of
            already-buffered audio is snapped onto it (driver stamp jitter would otherwise cause
            tiny gaps and overlaps). 0 (default) disables it. Snapping assumes chunks arrive
            mostly in order and are longer than twice this tolerance (e.g. 1 ms for 20 ms
            chunks); with it on, arrival order can matter for smaller chunks.
        max_catchup_units: most units one poll returns; older due units are skipped and counted
            (a clock that leapt forward must not make the backend chew through minutes of zeros).
        max_frames_buffered: most frames held at once; the oldest beyond it are dropped, counted.
        close_when_complete: close a unit before its watermark once the clock has passed its end,
            every one of its samples (plus the resampler's right context) has arrived and, if a
            camera feeds frames, a frame stamped at or after the unit's end has arrived. Audio
            stays sample exact whatever the chunking and order; the frame choice is the same as
            with the watermark for a camera whose frames arrive in stamp order (a frame that
            arrives out of order after its unit closed is late). ``nearest_end`` cannot choose a
            frame after the end.
    """

    unit_ns: int = 1_000_000_000
    first_unit_ns: int = 1_035_000_000
    sample_rate: int = 16_000
    watermark_ns: int = 200_000_000
    max_future_ns: int = 2_000_000_000
    clock_jump_ns: int = 1_000_000_000
    frame_policy: str = "last"
    max_frames_per_unit: int = 1
    frame_size: int = 0
    resize_policy: str = "letterbox"
    resize_filter: str = "box"
    resample_quality: str = "HQ"
    resample_context_ns: int = 20_000_000
    audio_snap_ns: int = 0
    max_catchup_units: int = 30
    max_frames_buffered: int = 600
    close_when_complete: bool = True

    def __post_init__(self) -> None:
        positive = {
            "unit_ns": self.unit_ns,
            "first_unit_ns": self.first_unit_ns,
            "sample_rate": self.sample_rate,
            "max_frames_per_unit": self.max_frames_per_unit,
            "clock_jump_ns": self.clock_jump_ns,
            "max_catchup_units": self.max_catchup_units,
            "max_frames_buffered": self.max_frames_buffered,
            "resample_context_ns": self.resample_context_ns,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"TimelineConfig.{name} must be > 0, got {value}")
        non_negative = {
            "watermark_ns": self.watermark_ns,
            "max_future_ns": self.max_future_ns,
            "frame_size": self.frame_size,
            "audio_snap_ns": self.audio_snap_ns,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"TimelineConfig.{name} must be >= 0, got {value}")
        if self.sample_rate > 384_000:
            raise ConfigError(f"TimelineConfig.sample_rate {self.sample_rate} Hz is absurd")
        if self.frame_policy not in FRAME_POLICIES:
            raise ConfigError(
                f"TimelineConfig.frame_policy {self.frame_policy!r} unknown; use one of "
                f"{FRAME_POLICIES}"
            )
        if self.resize_policy not in RESIZE_POLICIES:
            raise ConfigError(
                f"TimelineConfig.resize_policy {self.resize_policy!r} unknown; use one of "
                f"{RESIZE_POLICIES}"
            )
        if self.resize_filter not in RESIZE_FILTERS:
            raise ConfigError(
                f"TimelineConfig.resize_filter {self.resize_filter!r} unknown; use one of "
                f"{RESIZE_FILTERS}"
            )
        if self.resample_quality not in RESAMPLE_QUALITIES:
            raise ConfigError(
                f"TimelineConfig.resample_quality {self.resample_quality!r} unknown; use one of "
                f"{RESAMPLE_QUALITIES}"
            )
        if self.audio_snap_ns * 2 >= self.unit_ns:
            raise ConfigError("TimelineConfig.audio_snap_ns must be well below half a unit")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> TimelineConfig:
        """Build from a plain mapping; unknown keys / wrong types / bad values raise ConfigError."""
        return from_mapping(cls, mapping)


class _SampleBuffer:
    """Mono samples at one source rate, indexed by absolute sample position since the origin.

    ``data[i]`` holds position ``base + i``; ``mask`` says which positions were written. Positions
    below ``floor`` belong to closed units (writes there are late); ``[base, floor)`` is kept only
    as the resampler's left context.
    """

    def __init__(self, rate: int, floor: int, out_rate: int, context_ns: int) -> None:
        self.rate = rate
        g = math.gcd(rate, out_rate)
        # One "period" maps a whole number of source samples onto a whole number of output
        # samples; windows start on period boundaries so their output lands on the output grid.
        self.period_in = rate // g
        self.period_out = out_rate // g
        context_out = -(-context_ns * out_rate // NS_PER_S)
        self.context_periods = 0 if rate == out_rate else max(1, -(-context_out // self.period_out))
        self.keep = (self.context_periods + 1) * self.period_in if rate != out_rate else 0
        self.lookahead_ns = -(-self.keep * NS_PER_S // rate)
        self.floor = floor
        self.base = floor - self.keep
        self.data: FloatArray = np.zeros(0, np.float32)
        self.mask: BoolArray = np.zeros(0, np.bool_)
        self.hi = self.base  # one past the highest written position
        # Holes of closed units (zero-filled), newest last: late samples landing in them tell
        # why the unit had a gap (Counters.gap_filled_*).
        self.closed_gaps: collections.deque[tuple[int, int]] = collections.deque()

    def _ensure(self, end: int) -> None:
        need = end - self.base
        if need <= len(self.data):
            return
        size = max(need, 2 * len(self.data), self.rate)
        data = np.zeros(size, np.float32)
        mask = np.zeros(size, np.bool_)
        data[: len(self.data)] = self.data
        mask[: len(self.mask)] = self.mask
        self.data, self.mask = data, mask

    def write(self, pos: int, samples: FloatArray) -> int:
        """Write at ``pos >= floor``; first writer wins. Returns the number of overlapped samples."""
        end = pos + len(samples)
        self._ensure(end)
        i, j = pos - self.base, end - self.base
        taken = self.mask[i:j]
        overlap = int(np.count_nonzero(taken))
        if overlap:
            np.copyto(self.data[i:j], samples, where=~taken)
        else:
            self.data[i:j] = samples
        self.mask[i:j] = True
        self.hi = max(self.hi, end)
        return overlap

    def read(self, a: int, b: int) -> tuple[FloatArray, BoolArray]:
        """Samples and coverage of positions ``[a, b)`` (zeros / False where nothing is stored)."""
        data = np.zeros(b - a, np.float32)
        mask = np.zeros(b - a, np.bool_)
        lo, hi = max(a, self.base), min(b, self.base + len(self.data))
        if hi > lo:
            data[lo - a : hi - a] = self.data[lo - self.base : hi - self.base]
            mask[lo - a : hi - a] = self.mask[lo - self.base : hi - self.base]
        return data, mask

    def snap(self, pos: int, length: int, tolerance: int) -> int:
        """Move a chunk's start onto the end of buffered audio within ``tolerance`` samples.

        Only two shapes are treated as stamp jitter: a small gap right after buffered audio (the
        gap is empty), or a small overlap at the chunk's start (the overlapped part is fully
        covered and less than half the chunk). Anything else (an exact re-send, an out-of-order
        neighbour) is left alone so that duplicates are still counted and order still does not
        matter for chunks longer than twice the tolerance.
        """
        if tolerance <= 0 or self.hi <= self.base:
            return pos
        lo = pos - tolerance - 1
        _, mask = self.read(lo, pos + tolerance + 1)
        # Positions e (absolute) where e - 1 is covered and e is not: ends of buffered runs.
        ends = np.flatnonzero(mask[:-1] & ~mask[1:]) + lo + 1
        if not len(ends):
            return pos
        covered_before = np.concatenate([[0], np.cumsum(mask)])  # covered in [lo, lo + k)
        best = pos
        for end in sorted(ends.tolist(), key=lambda e: abs(e - pos)):
            a, b = sorted((end, pos))
            covered = int(covered_before[b - lo] - covered_before[a - lo])
            if end < pos and covered == 0:
                best = end
                break
            if end > pos and covered == b - a and 2 * (b - a) < length:
                best = end
                break
        return int(best)

    def covered(self, a: int, b: int) -> int:
        """How many positions in ``[a, b)`` hold samples."""
        lo, hi = max(a, self.base), min(b, self.base + len(self.mask))
        return int(np.count_nonzero(self.mask[lo - self.base : hi - self.base])) if hi > lo else 0

    def close_until(self, floor: int, record_gaps: bool = False) -> int:
        """Positions below ``floor`` are closed; keep only the resampler's left context.

        Returns:
            How many received samples the closed range held. With ``record_gaps`` the closed
            range's holes are remembered (:meth:`fill_closed_gaps`): they were zero-filled.
        """
        floor = max(self.floor, floor)
        consumed = self.covered(self.floor, floor)
        if record_gaps and floor > self.floor:
            _, mask = self.read(self.floor, floor)
            edges = np.flatnonzero(np.diff(np.concatenate([[True], mask, [True]]).astype(np.int8)))
            for a, b in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
                self.closed_gaps.append((self.floor + a, self.floor + b))
            while len(self.closed_gaps) > _MAX_CLOSED_GAPS:
                self.closed_gaps.popleft()
        self.floor = floor
        new_base = self.floor - self.keep
        if new_base > self.base:
            cut = min(new_base - self.base, len(self.data))
            self.data, self.mask = self.data[cut:], self.mask[cut:]
            self.base = new_base
            self.hi = max(self.hi, self.base)
        return consumed

    def fill_closed_gaps(self, a: int, b: int) -> int:
        """Late samples for closed positions ``[a, b)`` arrived: how many of them fall in holes
        that were zero-filled (each hole position is counted once)."""
        hit = 0
        kept: collections.deque[tuple[int, int]] = collections.deque()
        for lo, hi in self.closed_gaps:
            x, y = max(lo, a), min(hi, b)
            if x >= y:
                kept.append((lo, hi))
                continue
            hit += y - x
            if lo < x:
                kept.append((lo, x))
            if y < hi:
                kept.append((y, hi))
        self.closed_gaps = kept
        return hit

    def render(self, j0: int, j1: int, out_rate: int, quality: str) -> tuple[FloatArray, BoolArray]:
        """Audio and coverage of output positions ``[j0, j1)`` at ``out_rate``."""
        if self.rate == out_rate:
            return self.read(j0, j1)
        a_period = j0 // self.period_out - self.context_periods
        b_period = -(-j1 // self.period_out) + self.context_periods
        a, b = a_period * self.period_in, b_period * self.period_in
        segment, mask = self.read(a, b)
        out_len = (b_period - a_period) * self.period_out
        if mask.any():
            resampled = soxr.resample(segment, self.rate, out_rate, quality=quality)
            window = np.zeros(out_len, np.float32)
            n = min(out_len, len(resampled))
            window[:n] = resampled[:n]
        else:
            window = np.zeros(out_len, np.float32)
        offset = a_period * self.period_out
        audio = window[j0 - offset : j1 - offset].copy()
        # An output sample is "received" if the source sample it starts in was.
        source_index = (np.arange(j0, j1, dtype=np.int64) * self.rate) // out_rate - a
        return audio, mask[source_index]


class Timeline:
    """Cuts stamped audio blocks and video frames into :class:`~omni_ros.core.types.Unit` s.

    Call :meth:`push_audio` / :meth:`push_frame` as input arrives (any order, any chunking) and
    :meth:`poll` with the current clock time; ``poll`` returns every unit that has closed, oldest
    first, each with exactly its number of samples at ``config.sample_rate``.

    The origin (start of unit 0) is the earliest input stamp, fixed on the first poll whose clock
    has passed that stamp plus the watermark (so an earlier chunk that arrives late but within the
    watermark still counts), or set explicitly with :meth:`start`.

    Clock jumps: after every :meth:`poll`, :attr:`last_poll_jumped` says whether that poll found
    the clock had jumped backwards (by more than ``config.clock_jump_ns``) and reset the timeline.
    The caller should then reset whatever it keeps per conversation (the duplex session). Input
    pushed just before that poll with stamps from the new loop is kept for the new timeline.

    Not thread-safe: one owner thread pushes and polls (the ROS layer hands messages over).
    """

    def __init__(self, config: TimelineConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        self._last_now_ns: int | None = None
        self._jumped = False
        self._init_state(None)

    def _init_state(self, origin_ns: int | None) -> None:
        self._origin_ns: int | None = None
        self._next_index = 0
        self._buffers: dict[int, _SampleBuffer] = {}  # insertion order = age (older wins)
        self._current_rate = 0
        self._frame_stamps: list[int] = []
        self._frames: list[VideoFrame | RawImage] = []
        self._pending_audio: list[AudioBlock] = []
        self._pending_frames: list[VideoFrame | RawImage] = []
        self._earliest_ns: int | None = None
        self._newest_frame_ns: int | None = None  # latest frame stamp seen (None: no camera)
        self._observed_ns = 0  # latest clock reading between polls (observe_clock)
        # (end_ns, clock at closing) of the latest closed units: was a late chunk already at the
        # node when its unit closed (an executor stall) or not (late input)?
        self._close_times: collections.deque[tuple[int, int]] = collections.deque()
        # Inputs stamped long before the open unit: late, or the first of a looping bag's new pass.
        self._stashed: list[AudioBlock | VideoFrame | RawImage] = []
        if origin_ns is not None:
            self.start(origin_ns)

    # ------------------------------------------------------------------ lifecycle
    def start(self, origin_ns: int) -> None:
        """Fix the origin (start of unit 0) explicitly; pending input is placed against it.

        Raises:
            StateError: the origin is already fixed (call :meth:`reset` with the new origin).
        """
        if self._origin_ns is not None:
            raise StateError(
                f"timeline origin already fixed at {self._origin_ns} ns; call reset(origin_ns) "
                "to start over"
            )
        self._origin_ns = int(origin_ns)
        audio, frames = self._pending_audio, self._pending_frames
        self._pending_audio, self._pending_frames, self._earliest_ns = [], [], None
        # Through the normal entry points, so the future check now applies to them too.
        for block in audio:
            self.push_audio(block)
        for frame in frames:
            self.push_frame(frame)

    def reset(self, origin_ns: int | None = None) -> None:
        """Forget all buffered input and units; the origin is ``origin_ns`` or the next input's.

        Buffered input that never made it into a unit is counted as dropped. The clock reference
        is kept (so a later backward jump is still recognised).
        """
        self._count_buffered_as_dropped()
        self._init_state(origin_ns)

    def _count_buffered_as_dropped(self) -> None:
        c = self.counters
        for buf in self._buffers.values():
            c.drop_audio("reset", buf.covered(buf.floor, buf.hi))
        c.drop_audio("reset", sum(len(b.samples) for b in self._pending_audio))
        c.dropped_frames += len(self._frames) + len(self._pending_frames)
        self._count_stash_late()

    def _count_stash_late(self) -> None:
        for item in self._stashed:
            self.counters.late_messages += 1
            if isinstance(item, AudioBlock):
                self.counters.drop_audio("late", len(item.samples))
            else:
                self.counters.dropped_frames += 1
        self._stashed = []

    def held_samples(self) -> int:
        """Received audio samples held for units not closed yet (audio accounting)."""
        held = sum(b.covered(b.floor, b.hi) for b in self._buffers.values())
        held += sum(len(b.samples) for b in self._pending_audio)
        return held + sum(len(i.samples) for i in self._stashed if isinstance(i, AudioBlock))

    # ------------------------------------------------------------------ input
    def push_audio(self, block: AudioBlock, received_ns: int = 0) -> None:
        """Place mono audio sample-exactly from its first-sample stamp and rate.

        Bad data is counted, never raised (see the module docstring). ``received_ns`` (clock time
        the node had the chunk; 0 if unknown) decides why samples for a closed unit were lost:
        received before that unit closed is ``audio_dropped_stall`` (the node was behind),
        otherwise ``audio_dropped_late``.

        Raises:
            AlignmentError: ``block.sample_rate`` is not positive (no position can be computed).
        """
        if block.sample_rate <= 0:
            raise AlignmentError(f"audio block has sample_rate={block.sample_rate}; must be > 0")
        samples = np.asarray(block.samples, dtype=np.float32).reshape(-1)
        if not len(samples):
            return
        finite = np.isfinite(samples)
        if not finite.all():
            self.counters.nonfinite_samples += int(len(samples) - np.count_nonzero(finite))
            samples = np.where(finite, samples, np.float32(0.0))
        if samples is not block.samples:
            block = AudioBlock(block.stamp_ns, block.sample_rate, samples)
        if self.is_future(block.stamp_ns):
            self.counters.future_messages += 1
            self.counters.drop_audio("future", len(samples))
            return
        if self._origin_ns is None:
            self._pending_audio.append(block)
            self._note_earliest(block.stamp_ns)
            return
        if self._should_stash(block.stamp_ns):
            return self._stash(block)
        self._place_audio(block, received_ns)

    def push_frame(self, frame: VideoFrame | RawImage) -> None:
        """Keep a frame (decoded, or raw to be decoded only if a policy chooses it).

        Late, future, duplicate-stamp and overflowing frames are dropped and counted.
        """
        if self.is_future(frame.stamp_ns):
            self.counters.future_messages += 1
            self.counters.dropped_frames += 1
            return
        if self._newest_frame_ns is None or frame.stamp_ns > self._newest_frame_ns:
            self._newest_frame_ns = frame.stamp_ns
        if self._origin_ns is None:
            self._pending_frames.append(frame)
            self._note_earliest(frame.stamp_ns)
            return
        if self._should_stash(frame.stamp_ns):
            return self._stash(frame)
        self._place_frame(frame)

    def _note_earliest(self, stamp_ns: int) -> None:
        if self._earliest_ns is None or stamp_ns < self._earliest_ns:
            self._earliest_ns = stamp_ns

    def observe_clock(self, now_ns: int) -> None:
        """The clock read ``now_ns`` (without closing units): input is judged "from the future"
        against it. The caller keeps ingesting while the backend computes and does not poll
        then; without this, audio captured after the last poll would be judged against a clock
        seconds old and dropped as future. Only moves forward; jumps are for :meth:`poll`."""
        if self._last_now_ns is not None and now_ns > self._observed_ns:
            self._observed_ns = now_ns

    def is_future(self, stamp_ns: int, now_ns: int | None = None) -> bool:
        """Whether ``stamp_ns`` is more than ``max_future_ns`` ahead of the clock: the latest
        poll or :meth:`observe_clock` reading, or ``now_ns`` if later (before the first poll the
        origin, or ``now_ns``, or nothing)."""
        reference = self._last_now_ns if self._last_now_ns is not None else self._origin_ns
        if reference is not None and self._observed_ns > reference:
            reference = self._observed_ns
        if now_ns is not None and (reference is None or now_ns > reference):
            reference = now_ns
        return reference is not None and stamp_ns > reference + self.config.max_future_ns

    def _should_stash(self, stamp_ns: int) -> bool:
        return stamp_ns < self._open_start_ns() - self.config.clock_jump_ns

    def _stash(self, item: AudioBlock | VideoFrame | RawImage) -> None:
        if len(self._stashed) >= _MAX_STASHED:
            self._count_stash_late()
        self._stashed.append(item)

    def _open_start_ns(self) -> int:
        return self.unit_bounds_ns(self._next_index)[0]

    def _place_audio(self, block: AudioBlock, received_ns: int = 0) -> None:
        assert self._origin_ns is not None
        # A stamp this far ahead was accepted, so the clock leapt forward: skip now the units the
        # next poll skips anyway (max_catchup_units), instead of zero-filling the leap into the
        # sample buffer first (+10 days tried to allocate 51.5 GiB).
        leap = self.pending_units(block.stamp_ns - self.config.max_future_ns)
        if leap > self.config.max_catchup_units + 1:
            self._skip_units(leap - self.config.max_catchup_units - 1)
        rate = block.sample_rate
        self._current_rate = rate
        buf = self._buffers.get(rate)
        floor = _pos(self._open_start_ns() - self._origin_ns, rate)
        if buf is None:
            buf = _SampleBuffer(
                rate, floor, self.config.sample_rate, self.config.resample_context_ns
            )
            self._buffers[rate] = buf
        pos = _pos(block.stamp_ns - self._origin_ns, rate)
        pos = buf.snap(pos, len(block.samples), _pos(self.config.audio_snap_ns, rate))
        samples = block.samples
        if pos < buf.floor:
            late = min(buf.floor - pos, len(samples))
            self.counters.late_messages += 1
            cause = "stall" if self._at_node_before_close(block.stamp_ns, received_ns) else "late"
            self.counters.drop_audio(cause, late)
            # Holes these samples would have filled were zero-filled for the same reason.
            filled = buf.fill_closed_gaps(pos, pos + late)
            if rate != self.config.sample_rate:
                filled = _pos(filled * NS_PER_S // rate, self.config.sample_rate)
            filled = min(filled, self.counters.gap_filled_missing)
            self.counters.gap_filled_missing -= filled
            name = f"gap_filled_{cause}"
            setattr(self.counters, name, getattr(self.counters, name) + filled)
            samples, pos = samples[late:], pos + late
            if not len(samples):
                return
        overlap = buf.write(pos, samples)
        self.counters.duplicate_samples += overlap
        self.counters.drop_audio("duplicate", overlap)

    def _at_node_before_close(self, stamp_ns: int, received_ns: int) -> bool:
        """Whether a chunk received at ``received_ns`` was there before the unit holding
        ``stamp_ns`` closed (so only the node's own delay made it late)."""
        if received_ns <= 0:
            return False
        for end_ns, closed_ns in self._close_times:
            if stamp_ns < end_ns:
                return received_ns <= closed_ns
        return False

    def _place_frame(self, frame: VideoFrame | RawImage) -> None:
        if frame.stamp_ns < self._open_start_ns():
            self.counters.late_messages += 1
            self.counters.dropped_frames += 1
            return
        i = bisect.bisect_left(self._frame_stamps, frame.stamp_ns)
        if i < len(self._frame_stamps) and self._frame_stamps[i] == frame.stamp_ns:
            # Same stamp twice (a re-sent message): the first one wins.
            self.counters.dropped_frames += 1
            return
        self._frame_stamps.insert(i, frame.stamp_ns)
        self._frames.insert(i, frame)
        self._thin_frames(frame.stamp_ns)
        if len(self._frames) > self.config.max_frames_buffered:
            del self._frame_stamps[0], self._frames[0]
            self.counters.dropped_frames += 1

    def _thin_frames(self, stamp_ns: int) -> None:
        """With ``frame_policy: last``, forget the frames of a unit that it can never choose.

        ``last`` takes a unit's newest frame and an older one only if the newer ones fail to
        decode. A frame that cannot fail (decoded already, or raw and passing every header check,
        which is all a raw decode checks) makes every older frame of its unit unchoosable: they
        go now, not when the unit closes (not counted: like any frame no unit chose). Kept
        frames are then at most one per open unit plus the ones that may still fail (compressed),
        instead of every frame of ``watermark + unit`` (1080p60: ~90 frames, 560 MB).
        """
        if self.config.frame_policy != "last" or self._origin_ns is None:
            return
        start_ns, end_ns = self.unit_bounds_ns(self._unit_index_at(stamp_ns))
        stamps = self._frame_stamps
        lo, hi = bisect.bisect_left(stamps, start_ns), bisect.bisect_left(stamps, end_ns)
        for k in range(hi - 1, lo, -1):
            if _certain_to_decode(self._frames[k]):
                del stamps[lo:k], self._frames[lo:k]
                return

    def _unit_index_at(self, stamp_ns: int) -> int:
        assert self._origin_ns is not None
        cfg = self.config
        offset = stamp_ns - self._origin_ns
        return 0 if offset < cfg.first_unit_ns else 1 + (offset - cfg.first_unit_ns) // cfg.unit_ns

    # ------------------------------------------------------------------ output
    def poll(self, now_ns: int) -> list[Unit]:
        """Return every unit with ``end + watermark (+ resample context) <= now_ns``, oldest first.

        A ``now_ns`` more than ``config.clock_jump_ns`` before the latest one resets the timeline
        (see :attr:`last_poll_jumped`); smaller backward steps are treated as no movement.
        """
        self._jumped = False
        last = self._last_now_ns
        if last is not None and now_ns < last - self.config.clock_jump_ns:
            self._on_clock_jump(now_ns)
        elif last is not None and now_ns < last:
            now_ns = last
        self._last_now_ns = now_ns
        if self._origin_ns is None:
            if self._earliest_ns is None or now_ns < self._earliest_ns + self.config.watermark_ns:
                return []
            self.start(self._earliest_ns)
        if self._stashed:
            # No jump came: whatever was held back really was late.
            self._count_stash_late()
        due = self.pending_units(now_ns)
        if due > self.config.max_catchup_units:
            self._skip_units(due - self.config.max_catchup_units)
            due = self.config.max_catchup_units
        units = [self._emit_next() for _ in range(due)]
        while self.config.close_when_complete and self._next_complete(now_ns):
            units.append(self._emit_next())
        return units

    def _next_complete(self, now_ns: int) -> bool:
        """Whether the next unit's end has passed and all its audio (+ right context) is here."""
        assert self._origin_ns is not None
        start_ns, end_ns = self.unit_bounds_ns(self._next_index)
        buf = self._buffers.get(self._current_rate) if self._current_rate else None
        if now_ns < end_ns or buf is None or len(self._buffers) != 1:
            return False
        if self._newest_frame_ns is not None and self._newest_frame_ns < end_ns:
            return False  # a camera is there and has not moved past the unit's end yet
        a = _pos(start_ns - self._origin_ns, buf.rate)
        b = _pos(end_ns - self._origin_ns, buf.rate) + buf.keep
        return buf.covered(max(a, buf.floor), b) == b - max(a, buf.floor)

    def _on_clock_jump(self, now_ns: int) -> None:
        self.counters.clock_jumps += 1
        self._jumped = True
        stashed, self._stashed = self._stashed, []
        self._count_buffered_as_dropped()
        self._init_state(None)
        self._last_now_ns = now_ns
        # Input stamped on the new pass that arrived before this poll starts the new timeline.
        for item in stashed:
            if isinstance(item, AudioBlock):
                self.push_audio(item)
            else:
                self.push_frame(item)

    def _lookahead_ns(self) -> int:
        return max((b.lookahead_ns for b in self._buffers.values()), default=0)

    def _skip_units(self, count: int) -> None:
        """Drop the oldest ``count`` due units (clock far ahead), counting what they held."""
        assert self._origin_ns is not None
        _, end_ns = self.unit_bounds_ns(self._next_index + count - 1)
        i = bisect.bisect_left(self._frame_stamps, end_ns)
        self.counters.dropped_frames += i
        self.counters.units_dropped_overrun += count
        self._next_index += count
        self._close_before(end_ns, "overrun")

    def _close_before(self, end_ns: int, drop_cause: str | None = None) -> None:
        """Close everything before ``end_ns``: its received samples were used (a unit was
        emitted) or are dropped for ``drop_cause``."""
        assert self._origin_ns is not None
        for rate, buf in list(self._buffers.items()):
            consumed = buf.close_until(_pos(end_ns - self._origin_ns, rate), drop_cause is None)
            if drop_cause is None:
                self.counters.audio_samples_used += consumed
            else:
                self.counters.drop_audio(drop_cause, consumed)
        self._close_times.append((end_ns, self._last_now_ns or 0))
        while len(self._close_times) > _MAX_CLOSE_TIMES:
            self._close_times.popleft()
        for rate, buf in list(self._buffers.items()):
            # A buffer for a rate the source no longer uses goes once it holds nothing open.
            if rate != self._current_rate and buf.hi <= buf.floor:
                del self._buffers[rate]
        i = bisect.bisect_left(self._frame_stamps, end_ns)
        del self._frame_stamps[:i], self._frames[:i]

    def _emit_next(self) -> Unit:
        assert self._origin_ns is not None
        cfg = self.config
        index = self._next_index
        start_ns, end_ns = self.unit_bounds_ns(index)
        j0 = _pos(start_ns - self._origin_ns, cfg.sample_rate)
        j1 = _pos(end_ns - self._origin_ns, cfg.sample_rate)
        audio: FloatArray | None = None
        covered: BoolArray | None = None
        for buf in self._buffers.values():
            part, mask = buf.render(j0, j1, cfg.sample_rate, cfg.resample_quality)
            if audio is None or covered is None:
                audio, covered = part, mask
                continue
            # Two source rates in one unit (a rate change): the older buffer wins overlaps.
            self.counters.duplicate_samples += int(np.count_nonzero(mask & covered))
            take = mask & ~covered
            audio[take] = part[take]
            covered |= mask
        if audio is None or covered is None:
            audio = np.zeros(j1 - j0, np.float32)
            covered = np.zeros(j1 - j0, np.bool_)
        gaps = int(len(covered) - np.count_nonzero(covered))
        if gaps:
            # Resampling rings into gap edges; a gap is silence by definition.
            audio[~covered] = 0.0
            self.counters.gap_samples_filled += gaps
            self.counters.gap_filled_missing += gaps  # until late samples say otherwise
        frames = self._choose_frames(start_ns, end_ns)
        self._next_index = index + 1
        self._close_before(end_ns)
        return Unit(
            index=index,
            start_ns=start_ns,
            end_ns=end_ns,
            audio=audio,
            sample_rate=cfg.sample_rate,
            frames=frames,
            gap_samples=gaps,
        )

    # ------------------------------------------------------------------ frames
    def _choose_frames(self, start_ns: int, end_ns: int) -> tuple[VideoFrame, ...]:
        cfg = self.config
        stamps = self._frame_stamps
        lo = bisect.bisect_left(stamps, start_ns)
        hi = bisect.bisect_left(stamps, end_ns)
        if cfg.frame_policy == "last":
            return self._first_decodable(range(hi - 1, lo - 1, -1))
        if cfg.frame_policy == "nearest_end":
            hi_late = bisect.bisect_left(stamps, end_ns + cfg.watermark_ns)
            order = sorted(range(lo, hi_late), key=lambda i: (abs(stamps[i] - end_ns), stamps[i]))
            return self._first_decodable(order)
        # up_to_n: frames nearest n evenly spaced instants (centres of n equal slices).
        n = cfg.max_frames_per_unit
        if hi - lo <= n:
            chosen = list(range(lo, hi))
        else:
            window = np.asarray(stamps[lo:hi], dtype=np.int64)
            duration = end_ns - start_ns
            targets = start_ns + (2 * np.arange(n, dtype=np.int64) + 1) * duration // (2 * n)
            nearest = np.abs(window[None, :] - targets[:, None]).argmin(axis=1)
            chosen = sorted({lo + int(k) for k in nearest})
        frames = [f for f in (self._materialize(i) for i in chosen) if f is not None]
        return tuple(frames)

    def _first_decodable(self, order: range | list[int]) -> tuple[VideoFrame, ...]:
        for i in order:
            frame = self._materialize(i)
            if frame is not None:
                return (frame,)
        return ()

    def _materialize(self, i: int) -> VideoFrame | None:
        """Decode (if raw) and resize (if configured) stored frame ``i``; None if undecodable."""
        item = self._frames[i]
        if isinstance(item, RawImage):
            try:
                item = decode_image(item)
            except DecodeError:
                self.counters.decode_errors += 1
                self.counters.dropped_frames += 1  # OmniState reports malformed frames as dropped
                # Forget it so that it is neither retried nor chosen again.
                self._frames[i] = VideoFrame(item.stamp_ns, np.zeros((0, 0, 3), np.uint8))
                return None
            self._frames[i] = item
        if item.rgb.size == 0:
            return None
        if self.config.frame_size > 0:
            cfg = self.config
            rgb = resize_for_backend(item.rgb, cfg.frame_size, cfg.resize_policy, cfg.resize_filter)
            return VideoFrame(item.stamp_ns, rgb)
        return item

    # ------------------------------------------------------------------ introspection
    @property
    def last_poll_jumped(self) -> bool:
        """True if the latest :meth:`poll` detected a backward clock jump and reset the timeline."""
        return self._jumped

    @property
    def origin_ns(self) -> int | None:
        """Start of unit 0, or None while it is not fixed yet."""
        return self._origin_ns

    @property
    def next_unit_index(self) -> int:
        """Index of the next unit :meth:`poll` will return."""
        return self._next_index

    @property
    def buffered_frames(self) -> int:
        """Frames held (decoded or raw) for units not closed yet."""
        return len(self._frames) + len(self._pending_frames)

    def unit_bounds_ns(self, index: int) -> tuple[int, int]:
        """``(start_ns, end_ns)`` of unit ``index``.

        Raises:
            StateError: the origin is not fixed yet.
        """
        if self._origin_ns is None:
            raise StateError("timeline origin not fixed yet: push input and poll, or call start()")
        cfg = self.config
        start = 0 if index == 0 else cfg.first_unit_ns + (index - 1) * cfg.unit_ns
        end = cfg.first_unit_ns + index * cfg.unit_ns
        return self._origin_ns + start, self._origin_ns + end

    def unit_samples(self, index: int) -> int:
        """Number of samples of unit ``index`` at ``config.sample_rate``."""
        cfg = self.config
        start = 0 if index == 0 else cfg.first_unit_ns + (index - 1) * cfg.unit_ns
        end = cfg.first_unit_ns + index * cfg.unit_ns
        return _pos(end, cfg.sample_rate) - _pos(start, cfg.sample_rate)

    def pending_units(self, now_ns: int) -> int:
        """How many units a ``poll(now_ns)`` would return now (ignoring jumps and catch-up)."""
        if self._origin_ns is None:
            return 0
        cfg = self.config
        horizon = now_ns - cfg.watermark_ns - self._lookahead_ns() - self._origin_ns
        if horizon < cfg.first_unit_ns:
            return 0
        closed = 1 + (horizon - cfg.first_unit_ns) // cfg.unit_ns
        return max(0, closed - self._next_index)
