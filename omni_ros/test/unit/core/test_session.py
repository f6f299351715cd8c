"""Tests for the duplex session: turns, stamps, barge-in, proactive turns, errors, pause."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omni_ros.core.errors import BackendError, BackendTimeout, ConfigError, StateError
from omni_ros.core.session import DuplexSession, SessionConfig
from omni_ros.core.types import (
    Counters,
    Mode,
    PlaybackReport,
    ProactiveEvent,
    SpeechFlush,
    SpeechOut,
    TextOut,
    Unit,
    UnitResult,
)

S = 1_000_000_000
OUT = 24_000


def unit(k: int, user_speech: bool | None = False) -> Unit:
    return Unit(
        k,
        10 * S + k * S,
        11 * S + k * S,
        np.zeros(16_000, np.float32),
        16_000,
        user_speech=user_speech,
    )


def speak(text: str = "", seconds: float = 1.0, end: bool = False) -> UnitResult:
    return UnitResult(False, text, np.full(int(seconds * OUT), 0.1, np.float32), end)


LISTEN = UnitResult(True)


def make(**kw: object) -> tuple[DuplexSession, Counters]:
    counters = Counters()
    return DuplexSession(SessionConfig.from_mapping(kw), OUT, counters), counters


def test_speech_is_scheduled_after_the_unit_end_plus_latency_and_never_overlaps() -> None:
    session, _ = make(output_latency_ms=200)
    out1 = session.step(unit(0, True), speak("Hi", 1.5))
    out2 = session.step(unit(1, True), speak(" there", 1.0))
    s1 = next(e for e in out1 if isinstance(e, SpeechOut))
    s2 = next(e for e in out2 if isinstance(e, SpeechOut))
    assert s1.stamp_ns == 11 * S + 200_000_000
    # Unit 1 ends at 12 s; 12.2 s would overlap the 1.5 s of unit 0's speech, so it waits.
    assert s2.stamp_ns == s1.stamp_ns + 1_500_000_000
    text = [e for e in out1 + out2 if isinstance(e, TextOut)]
    assert [(t.stamp_ns, t.text) for t in text] == [(10 * S, "Hi"), (11 * S, " there")]
    assert session.mode is Mode.SPEAKING
    assert session.turn_id == 1


def test_end_of_turn_closes_the_turn_and_the_next_speech_is_a_new_turn() -> None:
    session, _ = make()
    session.step(unit(0, True), speak("One.", end=True))
    assert session.mode is Mode.LISTENING
    events = session.step(unit(1, True), speak("Two."))
    assert session.turn_id == 2
    assert all(e.turn_id == 2 for e in events if isinstance(e, TextOut | SpeechOut))


def test_a_listen_result_mid_turn_ends_the_turn_with_an_end_of_turn_text() -> None:
    session, _ = make()
    session.step(unit(0, True), speak("Half"))
    events = session.step(unit(1, True), LISTEN)
    assert [(type(e), getattr(e, "end_of_turn", None)) for e in events] == [(TextOut, True)]
    assert session.mode is Mode.LISTENING


def test_barge_in_flushes_speech_from_the_users_first_word_and_interrupts() -> None:
    session, counters = make(output_latency_ms=200)
    session.step(unit(0, True), speak("A long answer", 1.0))
    session.step(unit(1, False), speak(" goes on", 1.0))  # scheduled 11.2 s .. 13.2 s
    events = session.on_user_speech(11_700_000_000)
    flush = events[0]
    assert isinstance(flush, SpeechFlush)
    assert (flush.dropped_from_ns, flush.dropped_until_ns) == (11_700_000_000, 13_200_000_000)
    assert isinstance(events[1], TextOut)
    assert events[1].end_of_turn
    assert session.mode is Mode.INTERRUPTED
    assert counters.barge_ins == 1
    # Leftover speech of the interrupted turn (a unit already in flight) is dropped...
    assert session.step(unit(2, True), speak(" more")) == []
    # ...until the model listens again.
    assert session.step(unit(3, True), LISTEN) == []
    assert session.mode is Mode.LISTENING
    # The next turn is scheduled from its own unit, not behind the dropped speech.
    out = session.step(unit(4, True), speak("Yes?"))
    speech = next(e for e in out if isinstance(e, SpeechOut))
    assert speech.stamp_ns == 15 * S + 200_000_000
    assert speech.turn_id == 2


def test_user_speech_while_listening_and_silent_is_not_a_barge_in() -> None:
    session, counters = make()
    assert session.on_user_speech(5 * S) == []
    assert counters.barge_ins == 0


def test_user_speech_over_the_tail_of_a_finished_turn_still_flushes_it() -> None:
    session, counters = make(output_latency_ms=200)
    session.step(unit(0, True), speak("Done.", 1.0, end=True))  # plays 11.2 .. 12.2 s
    events = session.on_user_speech(11_500_000_000)
    assert events == [
        SpeechFlush(11_500_000_000, 1, 11_500_000_000, 12_200_000_000, "barge_in", 11_500_000_000)
    ]
    assert session.mode is Mode.LISTENING  # the backend already listens: nothing to interrupt
    assert counters.barge_ins == 1


def test_speaking_results_keep_being_dropped_only_for_max_interrupted_units() -> None:
    session, _ = make(max_interrupted_units=1)
    session.step(unit(0, True), speak("Talk"))
    session.on_user_speech(11 * S)
    assert session.step(unit(1, True), speak("x")) == []
    events = session.step(unit(2, True), speak("New turn"))
    assert session.turn_id == 2
    assert any(isinstance(e, SpeechOut) for e in events)


def test_a_turn_after_enough_silent_units_is_proactive_with_classified_kind() -> None:
    session, _ = make(proactive_silence_units=2)
    session.step(unit(0, False), LISTEN)
    start = session.step(unit(1, False), speak("[reminder] Water"))
    end = session.step(unit(2, False), speak(" the plants.", end=True))
    begin = [e for e in start if isinstance(e, ProactiveEvent)]
    assert begin == [ProactiveEvent(11 * S, 1, 11 * S, "", "", 0.0, False)]
    texts = [e for e in start + end if isinstance(e, TextOut)]
    assert [t.text for t in texts] == ["Water", " the plants."]
    assert all(t.proactive for t in texts)
    done = [e for e in end if isinstance(e, ProactiveEvent)]
    assert done == [ProactiveEvent(13 * S, 1, 11 * S, "reminder", "Water the plants.", 1.0, True)]


def test_a_reply_right_after_the_user_spoke_is_not_proactive() -> None:
    session, _ = make(proactive_silence_units=2)
    session.step(unit(0, False), LISTEN)
    session.step(unit(1, False), LISTEN)
    events = session.step(unit(2, True), speak("Sure.", end=True))
    assert not any(isinstance(e, ProactiveEvent) for e in events)
    assert not any(e.proactive for e in events if isinstance(e, TextOut))


def test_unknown_user_speech_never_makes_a_turn_proactive() -> None:
    session, _ = make(proactive_silence_units=1)
    for k in range(5):
        session.step(unit(k, None), LISTEN)
    assert not any(isinstance(e, ProactiveEvent) for e in session.step(unit(5, None), speak("Hi")))


def test_barge_in_on_a_proactive_turn_completes_it_with_the_text_so_far() -> None:
    session, _ = make(proactive_silence_units=1)
    session.step(unit(0, False), speak("[alert] The door"))
    events = session.on_user_speech(11_500_000_000)
    done = [e for e in events if isinstance(e, ProactiveEvent)]
    assert len(done) == 1
    assert done[0].completed
    assert done[0].kind == "alert"
    assert done[0].text == "The door"


def test_backend_errors_move_to_error_and_the_next_good_result_recovers() -> None:
    session, counters = make()
    session.step(unit(0, True), speak("Hello"))
    events = session.on_error(unit(1), BackendError("boom"))
    assert session.mode is Mode.ERROR
    assert any(isinstance(e, TextOut) and e.end_of_turn for e in events)
    session.on_error(unit(2), BackendTimeout("slow"))
    assert (counters.backend_errors, counters.backend_timeouts) == (1, 1)
    session.step(unit(3, True), LISTEN)
    assert session.mode is Mode.LISTENING


def test_pause_flushes_the_open_turn_and_step_while_paused_is_refused() -> None:
    session, counters = make()
    session.step(unit(0, True), speak("Hello"))
    events = session.pause(11 * S)
    assert isinstance(events[0], SpeechFlush)
    assert session.mode is Mode.PAUSED
    assert counters.barge_ins == 0
    with pytest.raises(StateError, match="resume"):
        session.step(unit(1), LISTEN)
    assert session.on_user_speech(12 * S) == []
    session.resume()
    assert session.mode is Mode.LISTENING


def test_reset_keeps_turn_ids_increasing() -> None:
    session, _ = make()
    session.step(unit(0, True), speak("One", end=True))
    session.reset()
    session.step(unit(0, True), speak("Two", end=True))
    assert session.turn_id == 2


def test_bad_configuration_names_the_key() -> None:
    with pytest.raises(ConfigError, match="proactive_silence_units"):
        SessionConfig(proactive_silence_units=0)
    with pytest.raises(ConfigError, match="unknown"):
        SessionConfig.from_mapping({"latency_ms": 3})


_STEP = st.one_of(
    st.just(("listen", 0.0, False)),
    st.tuples(st.just("speak"), st.floats(0.0, 2.5), st.booleans()),
    st.tuples(st.just("barge"), st.floats(0.0, 1.0), st.just(False)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_STEP, max_size=30), st.integers(0, 500))
def test_output_stamps_are_monotonic_and_never_overlap_within_a_turn(
    steps: list[tuple[str, float, bool]], latency_ms: int
) -> None:
    session, _ = make(output_latency_ms=latency_ms)
    events: list[object] = []
    k = 0
    for kind, amount, end in steps:
        if kind == "barge":  # somewhere inside the current unit
            events += session.on_user_speech(10 * S + k * S + int(amount * S))
            continue
        result = LISTEN if kind == "listen" else speak("w", amount, end)
        events += session.step(unit(k, False), result)
        k += 1
    last_end: dict[int, int] = {}
    flushed_at: dict[int, int] = {}
    for event in events:
        if isinstance(event, SpeechFlush):
            flushed_at[event.turn_id] = event.dropped_from_ns
            assert event.dropped_from_ns <= event.dropped_until_ns
        if isinstance(event, SpeechOut):
            assert event.turn_id not in flushed_at  # nothing of a flushed turn is published later
            unit_end = 11 * S + event.unit_index * S
            assert event.stamp_ns >= unit_end + latency_ms * 1_000_000
            previous = last_end.get(event.turn_id)
            if previous is not None:
                assert event.stamp_ns >= previous  # monotonic, no overlap
            last_end[event.turn_id] = event.stamp_ns + round(len(event.samples) * S / OUT)


# ------------------------------------------------------------------ schedule: speech on time
def test_speech_is_scheduled_after_the_measured_lag_plus_the_margin() -> None:
    session, counters = make(output_latency_ms=50)
    # The result for unit 0 (ends 11 s) is published 600 ms after the unit's end.
    out = session.step(unit(0, True), speak("Hi", 0.5), now_ns=11 * S + 600_000_000)
    (speech,) = [e for e in out if isinstance(e, SpeechOut)]
    assert speech.stamp_ns == 11 * S + 650_000_000  # lag 600 ms + 50 ms margin: not yet due
    assert counters.late_speech == 0


def test_later_units_of_a_turn_continue_the_speech_without_a_gap_at_the_p95_lag() -> None:
    session, counters = make(output_latency_ms=50, lag_window_units=20)
    lags_ms = [400, 800, 500, 700, 450, 800, 600, 400]
    stamps = []
    for k, lag in enumerate(lags_ms):
        out = session.step(unit(k, True), speak(" w", 1.0), now_ns=11 * S + k * S + lag * 1_000_000)
        stamps += [e.stamp_ns for e in out if isinstance(e, SpeechOut)]
    # The first unit's lag (400 ms) sets the start; unit 1 took 800 ms, so its speech could not
    # follow on at 12.45 s: it is moved to 12.85 s (a pause, counted) and the p95 now holds it.
    assert stamps[0] == 11 * S + 450_000_000
    assert stamps[1] == 12 * S + 850_000_000
    assert counters.late_speech == 1
    # From then on every unit lands within the p95 (800 ms): contiguous speech, never late.
    assert all(b - a == S for a, b in itertools.pairwise(stamps[1:]))
    for k, (stamp, lag) in enumerate(zip(stamps, lags_ms, strict=True)):
        assert stamp >= 11 * S + k * S + lag * 1_000_000 + 50_000_000  # published before due


def test_every_cancelled_span_is_a_flush_with_its_reason() -> None:
    session, _ = make()
    session.step(unit(0, True), speak("Hi", 2.0))
    (flush,) = [e for e in session.interrupt(11 * S, "interrupt") if isinstance(e, SpeechFlush)]
    assert (flush.reason, flush.turn_id) == ("interrupt", 1)
    session.step(unit(1, True), LISTEN)
    session.step(unit(2, True), speak("Again", 2.0))
    (flush,) = [e for e in session.pause(13 * S) if isinstance(e, SpeechFlush)]
    assert (flush.reason, flush.turn_id) == ("stop", 2)
    session.resume()
    session.step(unit(4, True), speak("And again", 2.0))
    events = session.on_error(unit(5, True), BackendError("boom"))
    (flush,) = [e for e in events if isinstance(e, SpeechFlush)]
    assert (flush.reason, flush.turn_id) == ("error", 3)
    assert flush.dropped_from_ns == unit(5).end_ns
    assert session.mode is Mode.ERROR


def test_a_backend_side_barge_in_flushes_the_speech_still_scheduled() -> None:
    session, counters = make(output_latency_ms=50)
    session.step(unit(0, True), speak("A long answer", 3.0))  # plays 11.05 .. 14.05 s
    events = session.step(unit(1, True), UnitResult(True, barge_in=True), now_ns=12 * S)
    (flush,) = [e for e in events if isinstance(e, SpeechFlush)]
    assert (flush.reason, flush.turn_id, flush.dropped_from_ns) == ("barge_in", 1, 12 * S)
    assert flush.dropped_until_ns == 14 * S + 50_000_000
    assert counters.barge_ins == 1
    assert session.mode is Mode.LISTENING


# ------------------------------------------------ schedule: the player's device latency, learned
MS = 1_000_000


def played(heard_ns: int, cut: bool = False, scheduled_ns: int | None = None) -> PlaybackReport:
    """A speaker_node report of a 20 ms chunk it writes now, heard from ``heard_ns``."""
    stamp = heard_ns if scheduled_ns is None else scheduled_ns
    return PlaybackReport(heard_ns, 1, stamp, OUT, 480, cut=cut)


def first_stamp(session: DuplexSession, k: int, lag_ms: int = 300) -> int:
    """Stamp of the speech of a new turn answered in unit ``k``, published ``lag_ms`` after it."""
    out = session.step(
        unit(k, True), speak("Hi", 0.5, end=True), now_ns=11 * S + k * S + lag_ms * MS
    )
    (speech,) = [e for e in out if isinstance(e, SpeechOut)]
    return speech.stamp_ns


def test_a_player_whose_device_buffers_200_ms_moves_the_schedule_200_ms_earlier_to_publish() -> (
    None
):
    # speaker_node writes a chunk sink.latency_ns before its stamp and reports it then: heard
    # 200 ms after the report arrives. A chunk published only output_latency_ms (50 ms) before its
    # stamp reaches it 150 ms after it had to be written: late. The schedule adds what it learned.
    session, counters = make(output_latency_ms=50)
    assert first_stamp(session, 0) == 11 * S + 350 * MS  # nothing learned: lag + 50 ms
    assert session.device_latency_ns() == 0
    for i in range(30):
        heard = 12 * S + i * 20 * MS
        session.on_playback(played(heard), received_ns=heard - 200 * MS)
    assert session.device_latency_ns() == 200 * MS
    assert session.margin_ns() == 250 * MS
    # The next turn: lag 300 ms + 50 ms + the device's 200 ms, so it reaches the player in time.
    assert first_stamp(session, 3) == 14 * S + 550 * MS
    assert counters.late_speech == 0


def test_the_learned_device_latency_is_the_p95_so_delayed_receipts_and_one_outlier_do_not_move_it() -> (
    None
):
    session, _ = make()
    heard = 12 * S
    for i in range(100):
        # Every 10th report waited 30 ms in an executor (it looks 30 ms shorter), one says 2 s.
        lead = 40 * MS - (30 * MS if i % 10 == 0 else 0)
        lead = 2 * S if i == 50 else lead
        session.on_playback(played(heard + i * 20 * MS), received_ns=heard + i * 20 * MS - lead)
    assert session.device_latency_ns() == 40 * MS


def test_the_learned_device_latency_is_capped_and_can_be_switched_off() -> None:
    capped, _ = make(device_latency_max_ms=100)
    off, _ = make(device_latency_max_ms=0)
    for session in (capped, off):
        for i in range(20):
            heard = 12 * S + i * 20 * MS
            session.on_playback(played(heard), received_ns=heard - S)  # a clock mismatch: 1 s
    assert capped.device_latency_ns() == 100 * MS
    assert off.device_latency_ns() == 0
    assert off.margin_ns() == 50 * MS
    with pytest.raises(ConfigError, match="device_latency_max_ms"):
        SessionConfig(device_latency_max_ms=-1)


def test_cut_and_unstamped_reports_teach_nothing_and_a_late_receipt_counts_zero() -> None:
    session, _ = make()
    session.on_playback(played(12 * S, cut=True), received_ns=11 * S)  # sent after a flush
    session.on_playback(played(12 * S, scheduled_ns=0), received_ns=11 * S)  # "play now"
    assert session.state.device_latencies_ns == []
    session.on_playback(played(12 * S), received_ns=13 * S)  # reported after it was heard
    assert session.state.device_latencies_ns == [0]


def test_the_learned_device_latency_survives_a_reset() -> None:
    session, _ = make()
    for i in range(10):
        heard = 12 * S + i * 20 * MS
        session.on_playback(played(heard), received_ns=heard - 80 * MS)
    session.reset()  # a new prompt or a clock jump: the sound card is the same one
    assert session.device_latency_ns() == 80 * MS
