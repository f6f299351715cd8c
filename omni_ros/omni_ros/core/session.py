"""The duplex session: turns, modes, barge-in, output stamps and proactive turns.

:class:`DuplexSession` consumes one ``(Unit, UnitResult)`` pair per step and turns it into output
events on the input clock:

* **Speech stamps.** Speech produced for the unit ``[start, end)`` can only exist after ``end``
  plus the time it took to close the unit (the timeline's watermark) and to compute it. The caller
  passes the clock time of each step (``now_ns``); the session keeps the running p95 of that lag
  (``now - end``) over the last ``lag_window_units`` units and schedules the first speech of a
  block at ``end + p95 lag + margin``, or, if earlier speech is still scheduled then, right after
  it. The margin is ``output_latency_ms`` (publishing and scheduling jitter) plus the player's
  device latency learned from its playback reports (below). Speech that would still be stamped
  before ``now + margin`` (a unit far slower than the p95) is moved there;
  a turn's speech that cannot follow on from its previous speech without a gap is counted in
  ``late_speech``: a pause the listener hears, never a late chunk the player has to skip through.
  Output stamps are therefore monotonic and never overlap, and a player that honours them plays
  speech exactly on the axis the microphone was stamped on.
* **The player's device latency is learned.** A player hands a chunk to its sound card that long
  before its stamp (``speaker_node`` writes it ``sink.latency_ns`` early), so a chunk must reach
  it by then, not by its stamp. ``speaker_node`` reports each chunk (``speaker/playback``) as it
  writes it, naming when it will be heard; :meth:`DuplexSession.on_playback` takes the time
  heard minus the time the report was received (the device's latency less the report's transit)
  and the schedule adds the p95 of the last ``DEVICE_LATENCY_WINDOW`` of them to the margin,
  capped at ``device_latency_max_ms``. A sound card that buffers 40 or 200 ms is therefore on
  time without raising ``output_latency_ms``; before the first report (a fresh node) only
  ``output_latency_ms`` applies.
* **Text** is stamped at the start of the unit that produced it.
* **Turns.** A turn starts with the first speaking unit and ends with ``end_of_turn``, a listening
  unit (the model stopped without saying so), a barge-in, an interrupt, a backend error or a pause.
  Turn ids increase by one per turn and never repeat, not even across :meth:`DuplexSession.reset`.
* **Proactive turns.** A turn that starts after the user has been silent (VAD, ``Unit.user_speech``)
  for ``proactive_silence_units`` units, counting the unit the model answered in, is proactive: a
  :class:`~omni_ros.core.types.ProactiveEvent` at its start (``completed=False``) and a completed
  one at its end with the classifier's kind and confidence and the text without its leading tag.
* **Barge-in.** :meth:`DuplexSession.on_user_speech` while speech is playing or queued drops the
  scheduled speech from the user's first word on (a :class:`~omni_ros.core.types.SpeechFlush`
  reports the span), ends the turn, counts ``barge_ins`` and, if the model was mid-turn, moves to
  INTERRUPTED; the caller then interrupts the backend. Speaking results that still arrive for the
  interrupted turn (a unit already in flight) are dropped until the model listens again. The
  flush is emitted whatever the mode: a turn whose last unit was already generated (mode
  LISTENING again) still has speech queued, and that speech is cut the same way.
* **Every cancelled span is a flush.** Barge-in (``barge_in``), :meth:`interrupt`
  (``interrupt``, or ``reset`` when the conversation restarts), :meth:`on_error` (``error``) and
  :meth:`pause` (``stop``) each emit a :class:`SpeechFlush` with that reason when speech was
  scheduled or a turn was open.
* **Errors.** :meth:`DuplexSession.on_error` moves to ERROR and counts it; the next good result
  recovers.

Not thread-safe: the Omni-Flow worker owns it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from omni_ros.core.clock import NS_PER_MS, NS_PER_S
from omni_ros.core.config import from_mapping
from omni_ros.core.errors import BackendTimeout, ConfigError, StateError
from omni_ros.core.proactive import ProactiveClassifier, TagClassifier, split_leading_tag
from omni_ros.core.types import (
    Counters,
    Mode,
    OutputEvent,
    PlaybackReport,
    ProactiveEvent,
    SpeechFlush,
    SpeechOut,
    TextOut,
    Unit,
    UnitResult,
)

#: How many recent playback reports the device latency's p95 is taken over (20 ms chunks: 2 s of
#: speech; a report whose receipt was delayed only lowers its sample, the p95 keeps the rest).
DEVICE_LATENCY_WINDOW = 100


@dataclass(frozen=True)
class SessionConfig:
    """Duplex session settings.

    Attributes:
        output_latency_ms: margin added to the measured lag: speech for unit ``[start, end)`` is
            scheduled to play at ``end + p95(lag) + margin`` at the earliest, and never before
            ``now + margin``, where ``margin = output_latency_ms + `` the learned device latency
            (this part covers publishing and scheduling jitter).
        device_latency_max_ms: cap on the player's device latency learned from its playback
            reports and added to the margin (a misreporting player or a clock mismatch can add
            at most this to every stamp); 0 turns the learning off.
        lag_window_units: how many recent units the p95 of the unit-end-to-result lag is taken over.
        proactive_silence_units: a turn started after this many consecutive units without user
            speech (including the unit the model answered) is proactive.
        proactive_enabled: emit proactive events at all.
        strip_tags: remove a leading ``[kind]`` tag from the first text of every turn.
        max_interrupted_units: after a barge-in, speaking results are dropped as leftovers of the
            interrupted turn for at most this many units; after that a speaking result starts a new
            turn even if the model never listened in between.
    """

    output_latency_ms: int = 50
    device_latency_max_ms: int = 300
    lag_window_units: int = 20
    proactive_silence_units: int = 3
    proactive_enabled: bool = True
    strip_tags: bool = True
    max_interrupted_units: int = 2

    def __post_init__(self) -> None:
        if self.output_latency_ms < 0:
            raise ConfigError("SessionConfig.output_latency_ms must be >= 0")
        if self.device_latency_max_ms < 0:
            raise ConfigError("SessionConfig.device_latency_max_ms must be >= 0 (0: not learned)")
        if self.proactive_silence_units < 1:
            raise ConfigError("SessionConfig.proactive_silence_units must be >= 1")
        if self.max_interrupted_units < 0:
            raise ConfigError("SessionConfig.max_interrupted_units must be >= 0")
        if self.lag_window_units < 1:
            raise ConfigError("SessionConfig.lag_window_units must be >= 1")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> SessionConfig:
        """Build from a plain mapping (YAML / ROS parameters); unknown keys raise ConfigError."""
        return from_mapping(cls, mapping)


@dataclass
class SessionState:
    """Explicit state of :class:`DuplexSession`."""

    mode: Mode = Mode.LISTENING
    mode_before_pause: Mode = Mode.LISTENING
    turn_id: int = 0  # id of the current or last turn; survives reset() so ids never repeat
    in_turn: bool = False
    turn_proactive: bool = False
    turn_trigger_ns: int = 0
    turn_raw_text: list[str] = field(default_factory=list)
    turn_text: list[str] = field(default_factory=list)
    turn_speech_start_ns: int | None = None
    scheduled_end_ns: int | None = None  # end of the last speech sample scheduled to play
    playback_start_ns: int | None = None  # start of the contiguous speech ending at scheduled_end
    silent_units: int = 0
    interrupted_units: int = 0
    last_unit_index: int | None = None
    lags_ns: list[int] = field(default_factory=list)  # recent unit-end-to-result lags, oldest first
    # Recent playback reports' heard time minus receipt time (the player's device latency).
    device_latencies_ns: list[int] = field(default_factory=list)

    def reset(self) -> None:
        """Back to a fresh conversation (keeps ``turn_id`` so later turns get new ids, and the
        measured lags and device latencies: the machine did not get faster, the sound card is the
        same)."""
        fresh = SessionState(
            turn_id=self.turn_id,
            lags_ns=self.lags_ns,
            device_latencies_ns=self.device_latencies_ns,
        )
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))


class DuplexSession:
    """Turns backend results into stamped output events; decides barge-in and proactive turns.

    Args:
        config: session settings.
        output_sample_rate: rate of ``UnitResult.audio`` (the backend's output rate).
        counters: shared counters (``barge_ins``, ``backend_errors``, ``backend_timeouts``).
        classifier: names proactive turns; default :class:`~omni_ros.core.proactive.TagClassifier`.
    """

    def __init__(
        self,
        config: SessionConfig,
        output_sample_rate: int,
        counters: Counters,
        classifier: ProactiveClassifier | None = None,
    ) -> None:
        if output_sample_rate <= 0:
            raise ConfigError(f"output_sample_rate = {output_sample_rate}; must be > 0")
        self.config = config
        self.output_sample_rate = output_sample_rate
        self.counters = counters
        self.classifier: ProactiveClassifier = classifier or TagClassifier()
        self.state = SessionState()

    # ------------------------------------------------------------------------------------ queries
    @property
    def mode(self) -> Mode:
        """Current mode."""
        return self.state.mode

    @property
    def turn_id(self) -> int:
        """Id of the current (or last) turn; 0 before the first."""
        return self.state.turn_id

    def speech_span(self) -> tuple[int, int] | None:
        """``(start_ns, end_ns)`` of the latest contiguous block of scheduled speech, or None."""
        st = self.state
        if st.playback_start_ns is None or st.scheduled_end_ns is None:
            return None
        return st.playback_start_ns, st.scheduled_end_ns

    def speech_playing(self, stamp_ns: int) -> bool:
        """Whether speech is scheduled to play at or after ``stamp_ns``."""
        end = self.state.scheduled_end_ns
        return end is not None and end > stamp_ns

    # ---------------------------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Forget the conversation (clock jump, new prompt); pending speech is not reported."""
        self.state.reset()

    def pause(self, stamp_ns: int) -> list[OutputEvent]:
        """Stop taking part: an open turn ends and its queued speech is flushed (not a barge-in)."""
        st = self.state
        if st.mode is Mode.PAUSED:
            return []
        events = self._cut_turn(stamp_ns, "stop")
        st.mode_before_pause = Mode.LISTENING if st.mode is Mode.INTERRUPTED else st.mode
        st.mode = Mode.PAUSED
        return events

    def resume(self) -> None:
        """Leave PAUSED (to LISTENING, or ERROR if the backend had failed before the pause)."""
        st = self.state
        if st.mode is Mode.PAUSED:
            st.mode = Mode.ERROR if st.mode_before_pause is Mode.ERROR else Mode.LISTENING

    # ------------------------------------------------------------------------------------ barge-in
    def on_user_speech(self, stamp_ns: int) -> list[OutputEvent]:
        """The VAD heard the user start talking at ``stamp_ns``.

        Returns:
            A :class:`SpeechFlush` (+ the turn's closing events) if our speech was playing or
            queued at ``stamp_ns``; nothing otherwise. After a flush of a turn still in progress
            :attr:`mode` is INTERRUPTED and the caller must interrupt the backend.
        """
        st = self.state
        st.silent_units = 0
        if st.mode is Mode.PAUSED:
            return []
        if not (st.in_turn or self.speech_playing(stamp_ns)):
            return []
        self.counters.barge_ins += 1
        return self.interrupt(stamp_ns, "barge_in")

    def interrupt(self, stamp_ns: int, reason: str = "interrupt") -> list[OutputEvent]:
        """Stop speaking now (barge-in, an explicit interrupt request, a restart); see
        :meth:`on_user_speech`. ``reason`` goes into the :class:`SpeechFlush`."""
        st = self.state
        if st.mode is Mode.PAUSED:
            return []
        was_in_turn = st.in_turn
        events = self._cut_turn(stamp_ns, reason)
        if was_in_turn:
            st.mode = Mode.INTERRUPTED
            st.interrupted_units = 0
        return events

    def _cut_turn(self, stamp_ns: int, reason: str) -> list[OutputEvent]:
        """Flush speech scheduled from ``stamp_ns`` on and close an open turn."""
        st = self.state
        events: list[OutputEvent] = []
        if st.in_turn or self.speech_playing(stamp_ns):
            start = st.turn_speech_start_ns if st.in_turn else None
            dropped_from = max(stamp_ns, start if start is not None else stamp_ns)
            dropped_until = max(st.scheduled_end_ns or dropped_from, dropped_from)
            events.append(
                SpeechFlush(stamp_ns, st.turn_id, dropped_from, dropped_until, reason, stamp_ns)
            )
            if st.scheduled_end_ns is not None:
                st.scheduled_end_ns = min(st.scheduled_end_ns, dropped_from)
        if st.in_turn:
            # The closing text belongs to the last unit the turn spoke in (unit indices are >= 0).
            events.append(self._text(stamp_ns, st.last_unit_index or 0, "", end_of_turn=True))
            events += self._close_turn(stamp_ns)
        return events

    # -------------------------------------------------------------------------------------- units
    def step(self, unit: Unit, result: UnitResult, now_ns: int | None = None) -> list[OutputEvent]:
        """Consume the backend's result for ``unit``; return the events to publish, in order.

        Args:
            unit: the unit the result is for.
            result: the backend's result.
            now_ns: the clock time the events will be published at (the lag ``now - end`` is
                measured from it); None means "right at the unit's end" (tests, offline use).

        Raises:
            StateError: called while PAUSED (the caller must not run the backend then).
        """
        st = self.state
        if st.mode is Mode.PAUSED:
            raise StateError("DuplexSession.step() while PAUSED: call resume() first")
        now = unit.end_ns if now_ns is None else now_ns
        st.lags_ns.append(max(0, now - unit.end_ns))
        del st.lags_ns[: -self.config.lag_window_units]
        if result.barge_in:
            # The backend heard the user over our speech itself: cut what is still scheduled
            # from now on (its onset is the backend's; now is the earliest this side knows).
            flushed = self.on_user_speech(now)
            return flushed + self.step(unit, dataclasses.replace(result, barge_in=False), now_ns)
        st.last_unit_index = unit.index
        if unit.user_speech is True:
            st.silent_units = 0
        elif unit.user_speech is False:
            st.silent_units += 1
        if st.mode is Mode.ERROR:
            st.mode = Mode.LISTENING  # a good result: the backend recovered
        if st.mode is Mode.INTERRUPTED:
            if result.is_listen:
                st.mode = Mode.LISTENING
                return []
            st.interrupted_units += 1
            if st.interrupted_units <= self.config.max_interrupted_units:
                return []  # leftovers of the interrupted turn
            st.mode = Mode.LISTENING
        if result.is_listen:
            events: list[OutputEvent] = []
            if st.in_turn:  # the model went quiet without end_of_turn: the turn is over
                events.append(self._text(unit.start_ns, unit.index, "", end_of_turn=True))
                events += self._close_turn(unit.end_ns)
            st.mode = Mode.LISTENING
            return events
        return self._speak(unit, result, now)

    def on_error(self, unit: Unit | None, error: Exception) -> list[OutputEvent]:
        """The backend failed for ``unit``: count it, end an open turn, go to ERROR."""
        st = self.state
        if isinstance(error, BackendTimeout):
            self.counters.backend_timeouts += 1
        else:
            self.counters.backend_errors += 1
        events: list[OutputEvent] = []
        stamp = unit.start_ns if unit is not None else (st.scheduled_end_ns or 0)
        if st.in_turn:
            # The turn is cut short: its queued speech would stop mid-sentence anyway, and the
            # player must learn of it from a flush, not from silence.
            flush_ns = unit.end_ns if unit is not None else stamp
            if self.speech_playing(flush_ns):
                events.append(
                    SpeechFlush(
                        flush_ns,
                        st.turn_id,
                        flush_ns,
                        max(st.scheduled_end_ns or flush_ns, flush_ns),
                        "error",
                        flush_ns,
                    )
                )
                st.scheduled_end_ns = flush_ns
            index = unit.index if unit is not None else (st.last_unit_index or 0)
            events.append(self._text(stamp, index, "", end_of_turn=True))
            events += self._close_turn(unit.end_ns if unit is not None else stamp)
        if st.mode is not Mode.PAUSED:
            st.mode = Mode.ERROR
        return events

    def lag_p95_ns(self) -> int:
        """p95 of the recent unit-end-to-result lags (0 before the first unit)."""
        return _p95(self.state.lags_ns)

    def on_playback(self, report: PlaybackReport, received_ns: int) -> None:
        """The player's report of a chunk it is handing to its device, received at
        ``received_ns`` on the session's clock: learn how far ahead of the heard time it takes a
        chunk (its device latency, less the report's transit).

        Cut reports (sent when a flush stopped the chunk, after it began) and unstamped chunks
        say nothing about it and are ignored; a report received after its heard time counts 0.
        """
        if report.cut or report.scheduled_ns <= 0 or self.config.device_latency_max_ms == 0:
            return
        lead_ns = report.heard_ns - received_ns
        latencies = self.state.device_latencies_ns
        latencies.append(max(0, lead_ns))
        del latencies[:-DEVICE_LATENCY_WINDOW]

    def device_latency_ns(self) -> int:
        """The player's device latency the schedule adds to its margin: the p95 of the recent
        playback reports' heard-minus-received times, capped at ``device_latency_max_ms`` (0
        before the first report)."""
        return min(
            _p95(self.state.device_latencies_ns), self.config.device_latency_max_ms * NS_PER_MS
        )

    def margin_ns(self) -> int:
        """What the schedule adds to the p95 lag now: ``output_latency_ms`` + the device latency."""
        return self.config.output_latency_ms * NS_PER_MS + self.device_latency_ns()

    def on_recovered(self) -> None:
        """The backend works again (a prepare succeeded after failures): leave ERROR."""
        if self.state.mode is Mode.ERROR:
            self.state.mode = Mode.LISTENING

    def _speak(self, unit: Unit, result: UnitResult, now_ns: int) -> list[OutputEvent]:
        st = self.state
        cfg = self.config
        events: list[OutputEvent] = []
        if not st.in_turn:
            st.turn_id += 1
            st.in_turn = True
            st.turn_proactive = (
                cfg.proactive_enabled and st.silent_units >= cfg.proactive_silence_units
            )
            st.turn_trigger_ns = unit.start_ns
            st.turn_raw_text = []
            st.turn_text = []
            st.turn_speech_start_ns = None
            if st.turn_proactive:
                events.append(
                    ProactiveEvent(
                        stamp_ns=unit.start_ns,
                        turn_id=st.turn_id,
                        trigger_stamp_ns=unit.start_ns,
                        kind="",
                        text="",
                        confidence=0.0,
                        completed=False,
                    )
                )
        st.mode = Mode.SPEAKING
        text = result.text
        if text:
            first = not st.turn_raw_text
            st.turn_raw_text.append(text)
            if first and cfg.strip_tags:
                _, text = split_leading_tag(text)
            st.turn_text.append(text)
        if text or result.end_of_turn:
            events.append(self._text(unit.start_ns, unit.index, text, result.end_of_turn))
        audio = result.audio
        if audio is not None and len(audio):
            margin_ns = self.margin_ns()
            floor_ns = now_ns + margin_ns  # nothing may be due before it is published
            end = st.scheduled_end_ns
            if st.turn_speech_start_ns is not None and end is not None and end >= floor_ns:
                stamp = end  # the turn goes on: its speech follows on without a gap
            else:
                stamp = max(unit.end_ns + self.lag_p95_ns() + margin_ns, floor_ns)
                if end is not None:
                    stamp = max(stamp, end)  # never over speech still scheduled
                if end is None or stamp > end:
                    st.playback_start_ns = stamp  # a gap: a new contiguous block begins
                if st.turn_speech_start_ns is not None:
                    # Generated too late to follow on: the listener hears a pause mid-turn.
                    self.counters.late_speech += 1
            if st.turn_speech_start_ns is None:
                st.turn_speech_start_ns = stamp
            st.scheduled_end_ns = stamp + round(len(audio) * NS_PER_S / self.output_sample_rate)
            events.append(SpeechOut(stamp, st.turn_id, unit.index, self.output_sample_rate, audio))
        if result.end_of_turn:
            events += self._close_turn(unit.end_ns)
            st.mode = Mode.LISTENING
        return events

    def _text(self, stamp_ns: int, unit_index: int, text: str, end_of_turn: bool) -> TextOut:
        st = self.state
        return TextOut(stamp_ns, st.turn_id, unit_index, text, end_of_turn, st.turn_proactive)

    def _close_turn(self, stamp_ns: int) -> list[OutputEvent]:
        st = self.state
        events: list[OutputEvent] = []
        if st.turn_proactive:
            kind, confidence = self.classifier.classify("".join(st.turn_raw_text))
            events.append(
                ProactiveEvent(
                    stamp_ns=stamp_ns,
                    turn_id=st.turn_id,
                    trigger_stamp_ns=st.turn_trigger_ns,
                    kind=kind,
                    text="".join(st.turn_text).strip(),
                    confidence=float(confidence),
                    completed=True,
                )
            )
        st.in_turn = False
        st.turn_proactive = False
        st.turn_speech_start_ns = None
        return events


def _p95(values_ns: list[int]) -> int:
    """The 95th percentile (nearest rank) of ``values_ns``; 0 when empty."""
    ordered = sorted(values_ns)
    if not ordered:
        return 0
    return ordered[min(len(ordered) - 1, (95 * len(ordered) + 99) // 100 - 1)]
