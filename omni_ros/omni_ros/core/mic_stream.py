"""The microphone path of :class:`~omni_ros.core.flow.OmniFlow`, top to bottom in one place.

::

    RawAudio ─ decode ─ (too long? future?) ─ reorder hold ─ resample to the mic rate ─ AEC ─ timeline
                                                                                        └─ VAD ─ barge-in detector
                                                                                              └─ on_heard(now_ns)

:class:`MicStream` owns the stream state between those filters (:class:`ReorderState`,
:class:`ResamplerState`, each a dataclass with ``reset()``) and runs :meth:`MicStream.push` /
:meth:`MicStream.release` on the flow's worker thread. The filters themselves (echo canceller,
VAD, barge-in detector, timeline) keep their own state in their modules.
:class:`BargeInDecision` turns the detector's run into a decision against the session's speech
span (state: :class:`BargeInState`); :class:`VoiceActivityReport` turns the VAD's runs into
``VoiceActivity`` events (state: :class:`VoiceActivityState`).

Order: decoded blocks that continue the stream (stamp = end of the audio released last) go
straight on; only a block after a gap or out of order waits (up to ``reorder_ms``) for the
missing piece, so the in-order common case costs no latency.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from omni_ros.core.aec import AecConfig, EchoCanceller, RobotSpeakingGate
from omni_ros.core.audio import StreamResampler, audio_frames, decode_audio
from omni_ros.core.bargein import BargeInDetector
from omni_ros.core.clock import NS_PER_MS, NS_PER_S
from omni_ros.core.echo_path import EchoPath, EchoPathRecorder, warm_up
from omni_ros.core.errors import DecodeError, OmniError
from omni_ros.core.timeline import Timeline
from omni_ros.core.types import AudioBlock, Counters, FloatArray, RawAudio, VoiceActivity
from omni_ros.core.vad import VadConfig, VoiceActivityDetector

#: A block whose stamp is within this of the end of the audio released last continues the stream.
CONTINUES_NS = 1_000_000


class Warn(Protocol):
    """Where recurring problems are reported (the flow's rate-limited log)."""

    def warning(self, kind: str, message: str) -> None: ...


def frames_of(raw: RawAudio) -> int:
    """Sample frames in a message, also for one that does not decode (its whole byte length in
    frames of its stated format), so that what is counted in is what is counted dropped."""
    try:
        return audio_frames(raw)
    except OmniError:
        width = 4 if raw.encoding == "F32LE" else 2
        return len(raw.data) // (width * max(1, raw.channels))


@dataclass
class ReorderState:
    """Decoded blocks waiting to be put back in stamp order.

    Attributes:
        held: a heap of ``(stamp_ns, seq, block, received_ns)``.
        seq: the next tie-breaker (blocks with equal stamps keep their arrival order).
        newest_end_ns: end of the newest audio held (the release horizon follows it).
        released_end_ns: end of the audio released last (None: nothing yet).
    """

    held: list[tuple[int, int, AudioBlock, int]] = field(default_factory=list)
    seq: int = 0
    newest_end_ns: int = 0
    released_end_ns: int | None = None

    def reset(self) -> None:
        self.held = []
        self.seq = 0
        self.newest_end_ns = 0
        self.released_end_ns = None

    def held_samples(self) -> int:
        return sum(len(item[2].samples) for item in self.held)

    def continues(self, block: AudioBlock) -> bool:
        """Whether ``block`` starts where the audio released last ended."""
        end = self.released_end_ns
        return end is not None and abs(block.stamp_ns - end) <= CONTINUES_NS


@dataclass
class ResamplerState:
    """The mic resampler of one continuous stream and where its output is on the clock.

    Attributes:
        resampler: the stream's resampler (None: no stream yet, or it was restarted).
        anchor_ns: stamp of the stream's first input sample (= its first output sample).
        out_samples: output samples produced since ``anchor_ns``.
        next_in_ns: where the next input block must start to continue the stream.
    """

    resampler: StreamResampler | None = None
    anchor_ns: int = 0
    out_samples: int = 0
    next_in_ns: int | None = None

    def reset(self) -> None:
        self.resampler = None
        self.anchor_ns = 0
        self.out_samples = 0
        self.next_in_ns = None


@dataclass
class MicStreamState:
    """Everything :class:`MicStream` holds between calls."""

    reorder: ReorderState = field(default_factory=ReorderState)
    resampler: ResamplerState = field(default_factory=ResamplerState)

    def reset(self) -> None:
        self.reorder.reset()
        self.resampler.reset()


class MicStream:
    """Microphone messages in, stream-ordered audio at the mic rate through AEC and VAD out.

    Args:
        timeline: where the cleaned (or, without a canceller, the decoded) audio goes.
        aec: the echo canceller, or None (then the timeline resamples whole units itself).
        vad: the voice activity detector, or None (no barge-in).
        bargein: the barge-in detector (runs after the VAD), or None.
        mic_rate: the canceller's and VAD's rate.
        reorder_ms: the reorder hold (0: none).
        max_chunk_ms: longest message accepted (a longer one is dropped whole, counted).
        counters: where drops are counted.
        log: where recurring problems are reported.
        on_heard: called with the moment's clock time after every block the VAD (and the
            detector) took in: the flow decides barge-in there, between blocks, at once.
    """

    def __init__(
        self,
        timeline: Timeline,
        aec: EchoCanceller | None,
        vad: VoiceActivityDetector | None,
        bargein: BargeInDetector | None,
        *,
        mic_rate: int,
        reorder_ms: int,
        max_chunk_ms: int,
        counters: Counters,
        log: Warn,
        on_heard: Callable[[int], None],
    ) -> None:
        self.timeline = timeline
        self.aec = aec
        self.vad = vad
        self.bargein = bargein
        self.mic_rate = mic_rate
        self.reorder_ms = reorder_ms
        self.max_chunk_ms = max_chunk_ms
        self.counters = counters
        self.log = log
        self.on_heard = on_heard
        self.state = MicStreamState()
        #: keeps the latest echo-only stretch (omni_ros.core.echo_path) when a file is configured
        self.echo_path = (
            EchoPathRecorder(aec.config)
            if aec is not None and bargein is not None and aec.config.echo_path_file
            else None
        )
        #: played through the canceller and the detector before the next fresh stream begins
        self.warm_path: EchoPath | None = None
        self.warm_starts = 0

    # ------------------------------------------------------------------- 1. a message arrives
    def push(self, raw: RawAudio, now_ns: int) -> None:
        """Decode one message and pass it on, or hold it for the missing piece before it."""
        try:
            frames = audio_frames(raw)
            if frames * 1_000 > self.max_chunk_ms * raw.sample_rate:
                raise DecodeError(
                    f"an audio chunk of {frames / raw.sample_rate:.2f} s is longer than "
                    f"flow.max_chunk_ms = {self.max_chunk_ms}: dropped whole"
                )
            block = decode_audio(raw, self.counters)
        except OmniError as exc:
            self.counters.decode_errors += 1
            self.counters.drop_audio("bad_input", frames_of(raw))
            self.log.warning("decode_audio", f"dropped an undecodable audio chunk: {exc}")
            return
        if len(block.samples) == 0:
            return
        if self.timeline.is_future(block.stamp_ns, now_ns):
            # Before the reorder buffer (issue 16): a chunk stamped an hour ahead must not sit
            # there uncounted and make every later chunk "old enough" to release at once.
            self.counters.future_messages += 1
            self.counters.drop_audio("future", len(block.samples))
            self.log.warning("future_audio", "dropped an audio chunk stamped in the future")
            return
        order = self.state.reorder
        if self.reorder_ms == 0 or (not order.held and order.continues(block)):
            self._filter(block, raw.received_ns, now_ns)
            return
        heapq.heappush(order.held, (block.stamp_ns, order.seq, block, raw.received_ns))
        order.seq += 1
        order.newest_end_ns = max(order.newest_end_ns, block.stamp_ns + block.duration_ns)

    # -------------------------------------------------------------- 2. held blocks move on
    def release(self, now_ns: int) -> None:
        """Pass held blocks on, oldest stamp first, once they are ``reorder_ms`` older than the
        newest audio or than the clock (the stream may simply have stopped)."""
        order = self.state.reorder
        horizon = max(order.newest_end_ns, now_ns) - self.reorder_ms * NS_PER_MS
        while order.held and (
            order.held[0][0] + order.held[0][2].duration_ns <= horizon
            or order.continues(order.held[0][2])  # the missing piece arrived
        ):
            _, _, block, received = heapq.heappop(order.held)
            self._filter(block, received, now_ns)

    # ------------------------------------------------- 3. the stream filters, in stamp order
    def _filter(self, block: AudioBlock, received_ns: int, now_ns: int) -> None:
        self.state.reorder.released_end_ns = block.stamp_ns + block.duration_ns
        for mic in self._to_mic_rate(block):
            if self.aec is not None:
                if len(mic.samples):
                    self._count_aec_restart(mic)
                    self._maybe_warm_up(mic.stamp_ns)
                mic = self.aec.process(mic) if len(mic.samples) else mic
                if len(mic.samples):
                    self._push_timeline(mic, received_ns)
            if self.vad is not None and len(mic.samples):
                self.vad.process(mic)
                if self.bargein is not None:
                    raw = self.aec.last_mic if self.aec is not None else None
                    self.bargein.process(mic, raw, self.aec)
                    if self.echo_path is not None and self.aec is not None:
                        self.echo_path.add(self.aec, mic, self.bargein.last_verdicts)
                self.on_heard(now_ns)
        if self.aec is None:
            self._push_timeline(block, received_ns)  # the timeline resamples whole units itself

    def _maybe_warm_up(self, stamp_ns: int) -> None:
        """A fresh canceller about to hear its first block: play the remembered echo path
        through it (and the detector) first, ending where this block begins."""
        assert self.aec is not None
        if self.warm_path is None or self.aec.state.mic_anchor_ns is not None:
            return
        path, self.warm_path = self.warm_path, None
        try:
            warm_up(path, stamp_ns, self.aec, self.bargein, self.aec.config.echo_path_passes)
        except OmniError as exc:
            self.log.warning("echo_path", f"remembered echo path not used: {exc}")
            return
        self.warm_starts += 1

    def _to_mic_rate(self, block: AudioBlock) -> list[AudioBlock]:
        """Resample to the mic rate as one stream while stamps continue each other.

        At a discontinuity (a gap, a rate change) the old stream's held-back tail is flushed
        first, so the samples before the gap are not lost with the old resampler.
        """
        if block.sample_rate == self.mic_rate:
            return [block]
        st = self.state.resampler
        out_blocks: list[AudioBlock] = []
        continues = (
            st.resampler is not None
            and st.resampler.in_rate == block.sample_rate
            and st.next_in_ns is not None
            and abs(block.stamp_ns - st.next_in_ns) <= NS_PER_S // block.sample_rate
        )
        if not continues:
            if st.resampler is not None:
                tail = st.resampler.process(np.zeros(0, np.float32), last=True)
                if len(tail):
                    out_blocks.append(self._mic_block(tail))
            st.resampler = StreamResampler(block.sample_rate, self.mic_rate)
            st.anchor_ns = block.stamp_ns
            st.out_samples = 0
        assert st.resampler is not None
        out = st.resampler.process(block.samples)
        st.next_in_ns = block.stamp_ns + block.duration_ns
        out_blocks.append(self._mic_block(out))
        return out_blocks

    def _mic_block(self, samples: FloatArray) -> AudioBlock:
        st = self.state.resampler
        stamp = st.anchor_ns + round(st.out_samples * NS_PER_S / self.mic_rate)
        st.out_samples += len(samples)
        return AudioBlock(stamp, self.mic_rate, samples)

    def _count_aec_restart(self, mic: AudioBlock) -> None:
        """The canceller restarts its stream at a discontinuity (a chunk outside the reorder
        hold, a gap) and forgets the unfinished frame it held: count those samples."""
        assert self.aec is not None
        st = self.aec.state
        if st.mic_anchor_ns is None or not len(st.remainder):
            return
        n = st.mic_samples + len(st.remainder)
        expected = st.mic_anchor_ns + round(n * NS_PER_S / self.mic_rate)
        if abs(mic.stamp_ns - expected) > NS_PER_S // self.mic_rate:  # as EchoCanceller does
            self.counters.drop_audio("reorder", len(st.remainder))

    def _push_timeline(self, block: AudioBlock, received_ns: int) -> None:
        try:
            self.timeline.push_audio(block, received_ns)
        except OmniError as exc:
            self.counters.drop_audio("bad_input", len(block.samples))
            self.log.warning("timeline", f"audio not placed on the timeline: {exc}")

    # ----------------------------------------------------------------- restarts, accounting
    def drop_held_after(self, limit_ns: int) -> None:
        """A clock jump: held blocks stamped after ``limit_ns`` belong to the old pass (dropped,
        counted as ``reset``); what is left (the new pass, already arriving) stays held."""
        order = self.state.reorder
        kept = [item for item in order.held if item[0] <= limit_ns]
        for item in order.held:
            if item[0] > limit_ns:
                self.counters.drop_audio("reset", len(item[2].samples))
        heapq.heapify(kept)
        order.held = kept
        order.newest_end_ns = max((i[0] + i[2].duration_ns for i in kept), default=0)

    def restart_stream(self) -> None:
        """A new time base: the resampler and the canceller's stream start over (the
        canceller's unfinished frame is dropped, counted as ``reset``)."""
        self.state.resampler.reset()
        if self.aec is not None:
            self.counters.drop_audio("reset", len(self.aec.state.remainder))
            if self.echo_path is not None:  # the room did not change: start warm again
                self.warm_path = self.echo_path.snapshot(self.aec) or self.warm_path
                self.echo_path.reset()
            self.aec.reset()

    def held_samples(self) -> int:
        """Received samples not yet on the timeline: held for reordering, or the canceller's
        unfinished frame."""
        held = self.state.reorder.held_samples()
        if self.aec is not None:
            held += len(self.aec.state.remainder)
        return held


@dataclass
class BargeInState:
    """The detector run that was decided a barge-in last (it is not decided twice)."""

    decided_run_start_ns: int | None = None

    def reset(self) -> None:
        self.decided_run_start_ns = None


class BargeInDecision:
    """Barge in as soon as the detector has heard enough of the user, not at the unit's end.

    The detector (:mod:`omni_ros.core.bargein`) only counts speech our own echo cannot explain,
    so there is no fixed echo guard and no blind window while the canceller converges. Only
    speech heard while our own speech is scheduled to play counts: a run that began before
    playback (the user was still finishing) is measured from the playback start, so the robot's
    reply is not flushed by the question it answers. The ``robot_speaking`` gate (other speech
    on the robot, not ours) can still ask for more.
    """

    def __init__(
        self,
        detector: BargeInDetector,
        gate: RobotSpeakingGate,
        vad: VadConfig,
        aec: AecConfig,
    ) -> None:
        self.detector = detector
        self.gate = gate
        self.base_ns = vad.barge_in_min_speech_ms * NS_PER_MS
        if not aec.enabled:
            # No canceller, so no reference: our own voice is unexplained speech in the mic.
            self.base_ns = max(self.base_ns, aec.gate_min_speech_ms * NS_PER_MS)
        self.state = BargeInState()

    def decide(self, speech_span: tuple[int, int] | None) -> int | None:
        """The stamp the user's speech over ours starts at, when that is a barge-in now (once
        per detector run); None otherwise. ``speech_span``: our speech scheduled to play."""
        run = self.detector.active_run()
        if run is None or speech_span is None or run[0] == self.state.decided_run_start_ns:
            return None
        run_start_ns, run_ns = run
        run_end_ns = run_start_ns + run_ns
        start_ns = max(run_start_ns, speech_span[0])
        if run_end_ns <= start_ns or speech_span[1] <= start_ns:
            return None  # the user's speech and ours do not overlap
        need_ns = self.gate.required_speech_ns(self.base_ns)
        if need_ns is None or run_end_ns - start_ns < need_ns:
            return None
        self.state.decided_run_start_ns = run_start_ns
        return start_ns


@dataclass
class VoiceActivityState:
    """What was last reported of the VAD's view.

    Attributes:
        user_speaking: a speech run was reported as started and not yet as over.
        last_end_ns: end of the last speech run reported as over.
    """

    user_speaking: bool = False
    last_end_ns: int = 0

    def reset(self) -> None:
        self.user_speaking = False
        self.last_end_ns = 0


class VoiceActivityReport:
    """The VAD's view as ``VoiceActivity`` events, each change once."""

    def __init__(self, vad: VoiceActivityDetector) -> None:
        self.vad = vad
        self.state = VoiceActivityState()

    def changes(self) -> list[VoiceActivity]:
        """Every run that started (and ended) since the last call, also when a batch of audio
        held a whole utterance (replay, a stalled worker); then a run still going on."""
        st, out = self.state, []
        for run_start, run_end in self.vad.state.runs:
            if run_end <= st.last_end_ns:
                continue
            if not st.user_speaking:
                out.append(VoiceActivity(run_start, True))
            st.user_speaking = False
            st.last_end_ns = run_end
            out.append(VoiceActivity(run_end, False))
        run = self.vad.active_run()
        if self.vad.in_speech and not st.user_speaking and run is not None:
            st.user_speaking = True
            out.append(VoiceActivity(run[0], True))
        return out
