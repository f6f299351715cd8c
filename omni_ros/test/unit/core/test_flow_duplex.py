"""Omni-Flow full-duplex outputs: flushes for every cancelled span, playback feedback as the echo
reference, the VAD's view, a schedule that keeps speech on time, and in-order audio with no hold."""

from __future__ import annotations

from typing import Any

import numpy as np
from omni_ros.core.types import (
    Mode,
    PlaybackReport,
    SpeechFlush,
    SpeechOut,
    StateOut,
    VoiceActivity,
)
from unit.core.scripted_backend import LISTEN, ScriptedBackendDouble
from unit.core.speech_audio import speech
from unit.core.test_flow import RATE, T0, Harness, S, speak


class ReferenceSpy:
    """Wraps the flow's echo canceller and records where references were placed."""

    def __init__(self, aec: Any) -> None:
        self._aec = aec
        self.pushed: list[tuple[int, int]] = []  # (stamp_ns, samples)
        self.dropped_after: list[int] = []

    def push_reference(self, stamp_ns: int, samples: np.ndarray, rate: int) -> None:
        self.pushed.append((stamp_ns, len(samples)))
        self._aec.push_reference(stamp_ns, samples, rate)

    def drop_reference_after(self, stamp_ns: int) -> None:
        self.dropped_after.append(stamp_ns)
        self._aec.drop_reference_after(stamp_ns)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._aec, name)


def test_a_barge_in_after_the_turns_last_unit_still_flushes_its_queued_speech() -> None:
    backend = ScriptedBackendDouble([speak("All done.", end=True, seconds=2.0), LISTEN, LISTEN])
    h = Harness(backend)
    h.silence(1.0)
    h.run_to(T0 + S)
    assert h.flow.session.mode is Mode.LISTENING  # the turn already ended in its only unit
    (out,) = h.of(SpeechOut)
    h.silence(0.5)
    h.push_audio(speech("Wait, that is not what I asked for."))
    h.run_to(T0 + 3 * S)
    (flush,) = h.of(SpeechFlush)
    assert (flush.reason, flush.turn_id) == ("barge_in", out.turn_id)
    assert flush.dropped_from_ns < out.stamp_ns + len(out.samples) * S // 24_000
    assert flush.decided_ns >= flush.stamp_ns  # decided after the onset it reports
    assert backend.interrupts == 0  # nothing to interrupt: the backend already listens


def test_interrupt_reset_and_stop_each_emit_a_flush_with_their_reason() -> None:
    reasons = []
    for cancel in ("interrupt", "reset", "stop"):
        backend = ScriptedBackendDouble([speak("One", seconds=3.0)] * 3)
        h = Harness(backend)
        h.silence(1.0)
        h.run_to(T0 + S)
        if cancel == "stop":
            h.flow.start()
            h.flow.stop()
        else:
            getattr(h.flow, cancel)()
            h.run_to(T0 + S + 10_000_000)
        (flush,) = h.of(SpeechFlush)
        (out,) = h.of(SpeechOut)
        assert flush.turn_id == out.turn_id
        reasons.append(flush.reason)
        h.flow.close()
    assert reasons == ["interrupt", "reset", "stop"]


def test_a_failed_prepare_is_published_as_error_with_its_reason_and_recovery_too() -> None:
    backend = ScriptedBackendDouble([LISTEN])
    backend.failing_prepares = 2
    h = Harness(backend, prepare_retry_ms=100)
    for t_ms in range(0, 500, 10):
        h.run_to(T0 + t_ms * 1_000_000)
    states = h.of(StateOut)
    assert [s.mode for s in states] == [Mode.ERROR, Mode.ERROR, Mode.LISTENING]
    assert states[1].error.startswith("backend prepare failed (2x)")
    assert "server not up yet" in states[1].error
    assert states[2].error == ""


def test_playback_reports_place_the_echo_reference_at_the_real_play_time() -> None:
    backend = ScriptedBackendDouble([speak("Hello", seconds=1.0, level=0.1), LISTEN, LISTEN])
    h = Harness(backend, aec={"enabled": True})
    spy = ReferenceSpy(h.flow.aec)
    h.flow.aec = spy  # type: ignore[assignment]
    h.silence(1.0)
    h.run_to(T0 + S)
    (out,) = h.of(SpeechOut)
    # Before any report the schedule is the reference (a player that never reports still works).
    assert spy.pushed == [(out.stamp_ns, 24_000)]
    # The speaker started the first 100 ms chunk 70 ms late and reports it: from now on the
    # reference follows the reports, at the time the loudspeaker really played.
    heard = out.stamp_ns + 70_000_000
    h.flow.on_playback(PlaybackReport(heard, out.turn_id, out.stamp_ns, 24_000, 2_400, late=True))
    h.flow.on_playback(
        PlaybackReport(
            heard + 100_000_000, out.turn_id, out.stamp_ns + 100_000_000, 24_000, 1_200, cut=True
        )
    )
    h.silence(1.0)
    h.run_to(T0 + 2 * S)
    assert spy.pushed[1] == (heard, 2_400)
    assert spy.dropped_after[-1] == heard + 150_000_000  # what a cut chunk did not play
    assert h.flow.counters.playback_late_chunks == 1
    # A second turn's speech is no longer pushed by its schedule once reports arrive.
    assert len(spy.pushed) == 2


def test_playing_in_the_state_follows_the_playback_reports() -> None:
    backend = ScriptedBackendDouble([speak("Hi", seconds=1.0), LISTEN, LISTEN, LISTEN])
    h = Harness(backend)
    h.silence(1.0)
    h.run_to(T0 + S)
    (out,) = h.of(SpeechOut)
    h.flow.on_playback(PlaybackReport(out.stamp_ns, out.turn_id, out.stamp_ns, 24_000, 24_000))
    h.silence(1.0)
    h.run_to(T0 + 2 * S)
    assert h.of(StateOut)[-1].playing  # heard until stamp + 1 s > now
    h.silence(2.0)
    h.run_to(T0 + 4 * S)
    assert not h.of(StateOut)[-1].playing


def test_the_vads_view_is_published_when_it_changes() -> None:
    backend = ScriptedBackendDouble([LISTEN] * 8)
    h = Harness(backend)
    audio = np.concatenate(
        [
            np.zeros(RATE, np.float32),
            speech("Hello robot, how are you today?"),
            np.zeros(3 * RATE, np.float32),
        ]
    )
    step = RATE // 10
    for k in range(0, len(audio) - step, step):  # streamed at the clock's pace, 100 ms a step
        h.push_audio(audio[k : k + step], chunk=320)
        h.run_to(T0 + (k + step) * S // RATE)
    activity = h.of(VoiceActivity)
    assert [a.speaking for a in activity] == [True, False]
    # The onset (within a VAD frame of the speech start), not the moment it was confirmed.
    assert T0 + S - 30_000_000 <= activity[0].stamp_ns < T0 + S + 400_000_000
    states = h.of(StateOut)
    assert any(s.user_speaking for s in states)  # a unit closed while the user talked
    assert not states[-1].user_speaking


def test_in_order_mic_audio_closes_its_unit_at_the_unit_end_with_no_reorder_hold() -> None:
    backend = ScriptedBackendDouble([LISTEN] * 3)
    h = Harness(backend, audio_reorder_ms=60)
    h.push_audio(np.zeros(RATE, np.float32), chunk=320)
    h.clock.set_ns(T0 + S)
    h.flow.run_until_idle(T0 + S)
    # Neither the 60 ms reorder window nor the 200 ms watermark was waited for.
    assert [u.index for u in backend.units] == [0]
    assert h.flow.counters.gap_samples_filled == 0


class PlayedBackendDouble(ScriptedBackendDouble):
    """Records ``on_played`` calls like vllm-omni's truthful playback acks want them."""

    def __init__(self, script: list[Any]) -> None:
        super().__init__(script)
        self.played: list[tuple[int, int]] = []

    def on_played(self, unit_index: int, samples: int) -> None:
        self.played.append((unit_index, samples))


def test_the_backend_is_told_what_was_really_heard_chunk_by_chunk_and_at_a_cut() -> None:
    backend = PlayedBackendDouble([speak("Hi", seconds=1.0), speak(" there", seconds=1.0), LISTEN])
    h = Harness(backend)
    h.silence(1.0)
    h.run_to(T0 + S)
    (first,) = h.of(SpeechOut)
    report = PlaybackReport
    h.flow.on_playback(report(first.stamp_ns, 1, first.stamp_ns, 24_000, 12_000))
    h.flow.on_playback(report(first.stamp_ns + S // 2, 1, first.stamp_ns + S // 2, 24_000, 12_000))
    h.silence(1.0)
    h.run_to(T0 + 2 * S)
    second = h.of(SpeechOut)[1]
    # Unit 1's speech starts: unit 0's played to its end. Then a flush cuts it 100 ms in.
    h.flow.on_playback(report(second.stamp_ns, 1, second.stamp_ns, 24_000, 12_000))
    h.flow.on_playback(report(second.stamp_ns, 1, second.stamp_ns, 24_000, 2_400, cut=True))
    h.run_to(T0 + 2 * S + 10_000_000)
    assert backend.played == [(0, 0), (0, 12_000), (0, 24_000), (1, 0), (1, 2_400)]


def test_audio_that_arrives_while_a_slow_unit_computes_is_judged_against_the_clock_now() -> None:
    import threading

    backend = ScriptedBackendDouble([LISTEN] * 8)
    gate = backend.block = threading.Event()
    h = Harness(backend, backend_deadline_ms=60_000)
    h.silence(1.0)
    h.clock.set_ns(T0 + S)
    worker = threading.Thread(target=h.flow.run_until_idle, args=(T0 + S,))
    worker.start()
    assert backend.in_generate.wait(10)
    # The model takes 3.5 s over unit 0; the microphone goes on meanwhile, on the clock.
    for k in range(35):
        h.clock.set_ns(T0 + S + (k + 1) * 100_000_000)
        h.push_audio(np.zeros(RATE // 10, np.float32))
    while h.flow._audio_in:  # the worker ingests while it waits for the backend
        backend.in_generate.wait(0.01)
    backend.block = None
    gate.set()
    worker.join(10)
    h.run_to(T0 + 5 * S)
    assert h.flow.counters.future_messages == 0
    c = h.flow.counters
    # Only the stated overrun policy loses audio: the unit that was one too many in the queue
    # after the 3.5 s call (its samples are counted since issue 15; they were not before).
    assert c.units_dropped_overrun == 1
    assert c.dropped_audio_samples == c.audio_dropped_overrun == RATE


def test_the_speakers_reports_teach_the_schedule_its_device_latency() -> None:
    # speaker_node reports each chunk as it hands it to the sound card, naming when it will be
    # heard: 150 ms later here (its device buffers 150 ms). Speech must reach it that much earlier,
    # so the next turn is stamped 150 ms later after the same lag (before: the same, and late).
    script = [speak("One", seconds=0.5, end=True), LISTEN, LISTEN, speak("Two", seconds=0.5)]
    h = Harness(backend := ScriptedBackendDouble([*script, LISTEN]))
    h.silence(1.0)
    h.run_to(T0 + S)
    (first,) = h.of(SpeechOut)
    heard = h.clock.now_ns() + 150_000_000  # received now, heard 150 ms later
    h.flow.on_playback(PlaybackReport(heard, first.turn_id, first.stamp_ns, 24_000, 480))
    h.silence(3.0)
    for k in (2, 3, 4):
        h.run_to(T0 + k * S)  # each unit handled at its end, as the first: the same lag
    second = h.of(SpeechOut)[-1]
    assert second.turn_id == first.turn_id + 1
    unit_ends = {u.index: u.end_ns for u in backend.units}
    lead_first = first.stamp_ns - unit_ends[first.unit_index]
    lead_second = second.stamp_ns - unit_ends[second.unit_index]
    assert h.flow.session.device_latency_ns() == 150_000_000
    assert lead_second - lead_first == 150_000_000
