"""Tests for the Omni-Flow runner with a scripted backend double (deterministic: ManualClock, Events)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import soxr
from omni_ros.core.clock import ManualClock
from omni_ros.core.errors import BackendError, ConfigError
from omni_ros.core.flow import FlowConfig, OmniFlow
from omni_ros.core.types import (
    Mode,
    OutputEvent,
    RawAudio,
    RawImage,
    SpeechFlush,
    SpeechOut,
    StateOut,
    TextOut,
    UnitResult,
)
from unit.core.echo_scene import ROBOT_TEXT, room_response
from unit.core.scripted_backend import HANG, LISTEN, ScriptedBackendDouble
from unit.core.speech_audio import speech

S = 1_000_000_000
T0 = 100 * S
RATE = 16_000
WATERMARK = 200_000_000


def speak(text: str, end: bool = False, seconds: float = 1.0, level: float = 0.0) -> UnitResult:
    return UnitResult(False, text, np.full(int(24_000 * seconds), level, np.float32), end)


class Harness:
    def __init__(self, backend: ScriptedBackendDouble, **config: object) -> None:
        self.backend = backend
        self.clock = ManualClock(T0)
        self.events: list[OutputEvent] = []
        mapping = dict(config)  # production defaults: the echo canceller on
        self.flow = OmniFlow(
            FlowConfig.from_mapping(mapping), backend, self.clock, self.events.append
        )
        self.next_sample = 0

    def push_audio(self, samples: np.ndarray, chunk: int = 1_600) -> None:
        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
        for i in range(0, len(pcm), chunk):
            stamp = T0 + round((self.next_sample + i) * S / RATE)
            self.flow.push_audio(RawAudio(stamp, RATE, 1, "S16LE", pcm[i : i + chunk].tobytes()))
        self.next_sample += len(pcm)

    def silence(self, seconds: float) -> None:
        self.push_audio(np.zeros(int(seconds * RATE), np.float32))

    def run_to(self, t_ns: int, jump: bool = False) -> None:
        """Advance the clock to ``t_ns`` one unit at a time (as real time would) unless ``jump``."""
        now = self.clock.now_ns()
        while not jump and now + S < t_ns:
            now += S
            self.clock.set_ns(now)
            self.flow.run_until_idle(now)
        self.clock.set_ns(t_ns)
        self.flow.run_until_idle(t_ns)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.fixture
def backend() -> Iterator[ScriptedBackendDouble]:
    b = ScriptedBackendDouble()
    yield b
    b.close()


def test_units_flow_through_the_backend_into_stamped_events(backend: ScriptedBackendDouble) -> None:
    backend.script = [LISTEN, speak("Hi"), speak(" there.", end=True)]
    h = Harness(backend, session={"output_latency_ms": 200})
    h.silence(3.0)
    h.run_to(T0 + 3 * S + WATERMARK + 50_000_000)
    assert [u.index for u in backend.units] == [0, 1, 2]
    assert [u.start_ns for u in backend.units] == [T0, T0 + S, T0 + 2 * S]
    assert all(len(u.audio) == RATE for u in backend.units)
    texts = h.of(TextOut)
    assert [(t.stamp_ns, t.text, t.end_of_turn) for t in texts] == [
        (T0 + S, "Hi", False),
        (T0 + 2 * S, " there.", True),
    ]
    speech_out = h.of(SpeechOut)
    assert [s.stamp_ns for s in speech_out] == [T0 + 2 * S + 200_000_000, T0 + 3 * S + 200_000_000]
    states = h.of(StateOut)
    assert [s.unit_index for s in states] == [0, 1, 2]
    assert [s.mode for s in states] == [Mode.LISTENING, Mode.SPEAKING, Mode.LISTENING]
    for s in states:
        assert s.backend == "scripted"
        assert s.real_time_factor == pytest.approx(s.unit_compute_ms * 1e6 / S)


def test_barge_in_interrupts_the_backend_and_flushes_as_soon_as_the_user_is_heard(
    backend: ScriptedBackendDouble,
) -> None:
    backend.script = [speak("Let me tell you a long story"), speak(" about")]
    h = Harness(backend, session={"output_latency_ms": 200})
    h.silence(2.0)
    h.run_to(T0 + 2 * S + WATERMARK)
    assert [u.index for u in backend.units] == [0, 1]
    # The user talks over the robot from 2.0 s; the clock is still inside unit 2.
    user = speech("Stop, stop, please stop talking now.")
    h.push_audio(user)
    h.run_to(T0 + 2 * S + WATERMARK + 10_000_000)
    flushes = h.of(SpeechFlush)
    assert len(flushes) == 1
    assert backend.interrupts == 1
    assert h.flow.counters.barge_ins == 1
    assert len(backend.units) == 2  # it happened before unit 2 closed
    assert flushes[0].dropped_until_ns == T0 + 3 * S + 200_000_000  # end of unit 1's speech
    assert T0 + 2 * S <= flushes[0].dropped_from_ns <= T0 + 2 * S + 500_000_000
    assert h.flow.session.mode is Mode.INTERRUPTED
    # Players learn about it at once, not at the next unit's end.
    state = h.of(StateOut)[-1]
    assert h.events.index(state) > h.events.index(flushes[0])
    assert (state.mode, state.stamp_ns) == (Mode.INTERRUPTED, flushes[0].stamp_ns)


def test_input_methods_return_immediately_while_the_backend_is_blocked(
    backend: ScriptedBackendDouble,
) -> None:
    gate = backend.block = threading.Event()
    h = Harness(
        backend, backend_deadline_ms=600_000
    )  # never a timeout here, however slow the machine
    h.silence(1.0)
    h.clock.set_ns(T0 + S + WATERMARK)
    h.flow.start()
    try:
        assert backend.in_generate.wait(10)
        h.silence(1.0)
        h.flow.push_image(RawImage(T0 + S, "rgb8", bytes(12), 2, 2, 6))
        h.flow.inject_text("hello")
        h.flow.set_robot_speaking(True)
        h.flow.pause()
        h.flow.resume()
        h.flow.interrupt()
        # Every call above returned while generate() is still waiting on the test's Event.
        assert backend.in_generate.is_set()
        assert not gate.is_set()
        assert backend.interrupts == 1  # interrupt() reached the backend mid-call
    finally:
        gate.set()
        h.flow.stop()


def test_a_backend_that_raises_moves_to_error_and_recovers(backend: ScriptedBackendDouble) -> None:
    backend.script = [BackendError("server said 500"), LISTEN]
    h = Harness(backend)
    h.silence(2.0)
    h.run_to(T0 + 2 * S + WATERMARK)
    states = h.of(StateOut)
    assert [s.mode for s in states] == [Mode.ERROR, Mode.LISTENING]
    assert states[0].counters.backend_errors == 1
    assert len(backend.prepares) == 1  # a reported backend error does not restart the conversation


def test_a_backend_bug_is_contained_and_the_backend_is_prepared_again(
    backend: ScriptedBackendDouble,
) -> None:
    backend.script = [RuntimeError("bug in a backend")]
    h = Harness(backend)
    h.silence(1.0)
    h.run_to(T0 + S + WATERMARK)
    assert h.of(StateOut)[0].mode is Mode.ERROR
    assert h.flow.counters.backend_errors == 1
    h.silence(1.0)
    h.run_to(T0 + 2 * S + WATERMARK)
    assert len(backend.prepares) == 2
    assert backend.resets == 1


def test_a_malformed_result_is_a_counted_protocol_error(backend: ScriptedBackendDouble) -> None:
    backend.script = [{"is_listen": True}, UnitResult(False, "x", np.full(10, np.nan, np.float32))]
    h = Harness(backend)
    h.silence(2.0)
    h.run_to(T0 + 2 * S + WATERMARK)
    assert h.flow.counters.backend_errors == 2
    assert h.of(SpeechOut) == []


def test_a_hanging_backend_times_out_drops_units_and_is_restarted_when_it_returns(
    backend: ScriptedBackendDouble,
) -> None:
    backend.script = [HANG]
    # Long enough that a loaded machine still gets the prefill in before the deadline (the hang
    # is in generate()), short enough to keep the test quick.
    h = Harness(backend, backend_deadline_ms=500)
    h.silence(1.0)
    h.run_to(T0 + S + WATERMARK)
    assert h.flow.counters.backend_timeouts == 1
    assert h.of(StateOut)[-1].mode is Mode.ERROR
    h.silence(1.0)
    h.run_to(T0 + 2 * S + WATERMARK)  # still hung: the unit is dropped, nothing else is called
    assert h.flow.counters.units_dropped_overrun == 1
    assert len(backend.units) == 1
    backend.release.set()
    assert h.flow.wait_backend_idle(10.0)
    h.silence(1.0)
    h.run_to(T0 + 3 * S + WATERMARK)
    assert len(backend.prepares) == 2
    assert backend.resets == 1


def test_overrun_drops_the_oldest_units_and_counts_them(backend: ScriptedBackendDouble) -> None:
    h = Harness(backend, max_queued_units=1)
    h.silence(4.0)
    h.run_to(T0 + 4 * S + WATERMARK, jump=True)  # four units close at once: compute fell behind
    assert [u.index for u in backend.units] == [0]  # unit 0 (the first, longer unit) is kept
    assert h.flow.counters.units_dropped_overrun == 3
    h.silence(1.0)
    h.run_to(T0 + 5 * S + WATERMARK)
    assert [u.index for u in backend.units] == [0, 4]


def test_a_backwards_clock_jump_resets_session_and_backend(backend: ScriptedBackendDouble) -> None:
    backend.script = [speak("Hello"), speak(" again")]
    h = Harness(backend)
    h.silence(2.0)
    h.run_to(T0 + 2 * S + WATERMARK)
    assert h.flow.session.mode is Mode.SPEAKING
    h.clock.set_ns(T0 - 60 * S)  # the bag looped
    h.flow.run_until_idle(T0 - 60 * S)
    assert h.flow.counters.clock_jumps == 1
    assert len(h.of(SpeechFlush)) == 1  # speech scheduled on the old time base must not play
    assert len(backend.prepares) == 2
    assert h.flow.session.mode is Mode.LISTENING
    # Input on the new time base flows again from unit 0.
    pcm = np.zeros(RATE, "<i2").tobytes()
    h.flow.push_audio(RawAudio(T0 - 60 * S, RATE, 1, "S16LE", pcm))
    h.run_to(T0 - 59 * S + WATERMARK)
    assert backend.units[-1].index == 0
    assert backend.units[-1].start_ns == T0 - 60 * S


def test_a_looping_bags_new_pass_that_arrives_before_the_clock_jumps_is_kept(
    backend: ScriptedBackendDouble,
) -> None:
    h = Harness(backend)
    h.silence(3.0)
    h.run_to(T0 + 3 * S + WATERMARK)
    fed = len(backend.units)
    # The bag starts over: its first audio (stamped T0 again) arrives before /clock jumps back.
    # A 440 Hz tone (mean |x| 0.16): the echo canceller, on as in production, removes DC.
    tone = (0.25 * np.sin(2 * np.pi * 440 * np.arange(2 * RATE) / RATE)).astype(np.float32)
    pcm = (tone * 32767).astype("<i2")
    for i in range(0, len(pcm), 1_600):
        stamp = T0 + round(i * S / RATE)
        h.flow.push_audio(RawAudio(stamp, RATE, 1, "S16LE", pcm[i : i + 1_600].tobytes()))
    h.run_to(T0 + 50_000_000, jump=True)
    h.run_to(T0 + 1_035_000_000 + WATERMARK)
    assert h.flow.counters.clock_jumps == 1
    first = backend.units[fed]
    assert first.index == 0
    assert first.gap_samples == 0  # the new pass's first second was kept, not zero-filled
    assert float(np.abs(first.audio).mean()) > 0.1


@pytest.mark.parametrize("reorder_ms", [60, 0])
def test_out_of_order_chunks_reach_the_stream_filters_in_order_and_lose_nothing(
    backend: ScriptedBackendDouble, reorder_ms: int
) -> None:
    h = Harness(backend, aec={"enabled": True}, audio_reorder_ms=reorder_ms)
    assert h.flow.vad is not None
    seen: list[int] = []
    vad_process = h.flow.vad.process
    h.flow.vad.process = lambda block: (seen.append(block.stamp_ns), vad_process(block))[1]  # type: ignore[method-assign]
    rate, hop = 48_000, 960  # 20 ms chunks of 48 kHz stereo
    pcm = (np.random.default_rng(0).normal(0, 0.05, (3 * rate, 2)) * 32767).astype("<i2")
    chunks = [
        RawAudio(T0 + round(i * S / rate), rate, 2, "S16LE", pcm[i : i + hop].tobytes())
        for i in range(0, len(pcm), hop)
    ]
    for k in range(5, len(chunks) - 1, 7):  # every 7th pair arrives swapped
        chunks[k], chunks[k + 1] = chunks[k + 1], chunks[k]
    for chunk in chunks:
        h.clock.set_ns(chunk.stamp_ns + 22_000_000)  # each arrives just after its last sample
        h.flow.push_audio(chunk)
        h.flow.run_until_idle(h.clock.now_ns())
    h.run_to(T0 + 2 * S + 35_000_000 + WATERMARK)
    assert len(backend.units) == 2
    in_order = all(b > a for a, b in itertools.pairwise(seen))
    if reorder_ms:
        # The echo canceller and the VAD are stream filters: they must see the stream in order.
        assert in_order
        assert h.flow.counters.gap_samples_filled == 0
        assert all(u.gap_samples == 0 for u in backend.units)
    else:
        assert not in_order  # what the reorder buffer is for


def test_bad_audio_is_a_counted_drop_and_the_worker_carries_on(
    backend: ScriptedBackendDouble,
) -> None:
    h = Harness(backend)
    h.flow.push_audio(RawAudio(T0, RATE, 1, "MP3", b"\x00" * 100))
    h.flow.push_audio(RawAudio(T0, RATE, 1, "S16LE", b"\x00" * 3))  # truncated
    h.silence(1.0)
    h.run_to(T0 + S + WATERMARK)
    assert h.flow.counters.decode_errors == 2
    assert len(backend.units) == 1


def test_a_huge_audio_message_is_dropped_whole_and_counted_and_good_audio_still_flows(
    backend: ScriptedBackendDouble,
) -> None:
    h = Harness(backend, max_chunk_ms=2_000)
    ten_minutes = np.zeros((48_000 * 600, 2), np.float32).tobytes()
    h.flow.push_audio(RawAudio(T0, 48_000, 2, "F32LE", ten_minutes))
    h.silence(1.0)
    h.run_to(T0 + S + WATERMARK)
    assert h.flow.counters.decode_errors == 1
    assert h.flow.counters.dropped_audio_samples == 48_000 * 600
    assert len(backend.units) == 1  # the good second after it still made its unit


def test_injected_text_rides_on_the_next_unit(backend: ScriptedBackendDouble) -> None:
    h = Harness(backend)
    h.flow.inject_text("What do you see?")
    h.silence(2.0)
    h.run_to(T0 + 2 * S + WATERMARK)
    assert [u.texts for u in backend.units] == [("What do you see?",), ()]


def test_set_prompt_restarts_the_backend_with_the_new_prompt(
    backend: ScriptedBackendDouble,
) -> None:
    h = Harness(backend)
    h.silence(1.0)
    h.run_to(T0 + S + WATERMARK)
    h.flow.set_prompt("Be brief.")
    h.run_to(T0 + S + WATERMARK)
    assert [p for p, _ in backend.prepares] == ["Streaming Omni Conversation.", "Be brief."]


def test_paused_flow_keeps_consuming_units_without_calling_the_backend(
    backend: ScriptedBackendDouble,
) -> None:
    h = Harness(backend)
    h.flow.pause()
    h.silence(2.0)
    h.run_to(T0 + 2 * S + WATERMARK)
    assert backend.units == []
    assert [s.mode for s in h.of(StateOut)] == [Mode.PAUSED, Mode.PAUSED]
    h.flow.resume()
    h.silence(1.0)
    h.run_to(T0 + 3 * S + WATERMARK)
    assert [u.index for u in backend.units] == [2]


def test_nested_configuration_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="overrun_policy"):
        FlowConfig.from_mapping({"overrun_policy": "queue_forever"})
    with pytest.raises(ConfigError, match="unknown"):
        FlowConfig.from_mapping({"vad": {"agressiveness": 2}})
    assert (
        FlowConfig.from_mapping({"session": {"output_latency_ms": 0}}).session.output_latency_ms
        == 0
    )


def test_a_failing_prepare_is_an_error_retried_after_the_retry_interval(
    backend: ScriptedBackendDouble,
) -> None:
    backend.failing_prepares = 1
    h = Harness(backend, prepare_retry_ms=500)
    assert h.flow.step_once(T0) is False
    assert h.flow.counters.backend_errors == 1
    assert h.flow.session.mode is Mode.ERROR
    h.flow.step_once(T0 + 100_000_000)  # too early: no second attempt
    assert backend.prepares == []
    h.flow.step_once(T0 + 500_000_000)
    assert len(backend.prepares) == 1
    h.silence(1.0)
    h.run_to(T0 + S + WATERMARK + 500_000_000)
    # The failure is published at once with its reason (OmniState ERROR), the recovery too,
    # then the unit.
    states = h.of(StateOut)
    assert [s.mode for s in states] == [Mode.ERROR, Mode.LISTENING, Mode.LISTENING]
    assert "server not up yet" in states[0].error
    assert states[1].error == ""
    assert states[2].unit_index == 0


def test_a_failing_prepare_backs_off_exponentially_up_to_the_maximum(
    backend: ScriptedBackendDouble,
) -> None:
    backend.failing_prepares = 100
    h = Harness(backend, prepare_retry_ms=100, prepare_retry_max_ms=400)
    attempts: list[int] = []
    for t_ms in range(0, 2_000, 10):
        before = h.flow.counters.backend_errors
        h.flow.step_once(T0 + t_ms * 1_000_000)
        if h.flow.counters.backend_errors > before:
            attempts.append(t_ms)
    # 100, 200, 400, then 400 ms apart (never hammering a server that is down).
    assert attempts[:6] == [0, 100, 300, 700, 1100, 1500]
    errors = [s for s in h.of(StateOut) if s.mode is Mode.ERROR]
    assert len(errors) == len(attempts)
    assert "(6x)" in errors[5].error


def _talk_over_the_robot(
    aec_enabled: bool, user_talks: bool = True
) -> tuple[Harness, ScriptedBackendDouble, int, int]:
    """Closed loop: our published speech echoes into the mic (80 ms, room FIR); the user joins at 7 s.

    Returns the harness, the backend, the stamp where the user starts talking and the clock time
    when the first SpeechFlush was emitted (-1 if none).
    """
    robot = np.concatenate([speech(ROBOT_TEXT, rate=24_000, level=0.6)] * 2)
    n_units = len(robot) // 24_000
    backend = ScriptedBackendDouble(
        [UnitResult(False, "w", robot[k * 24_000 : (k + 1) * 24_000]) for k in range(n_units)]
    )
    h = Harness(backend, aec={"enabled": aec_enabled}, session={"output_latency_ms": 300})
    total = (n_units + 2) * RATE
    mic = np.random.default_rng(5).normal(0, 0.001, total + RATE).astype(np.float32)
    user = speech("Excuse me, robot, stop talking please.", voice="en-us", level=0.3)
    user_start = 7 * RATE
    if user_talks:
        mic[user_start : user_start + len(user)] += user
    room = room_response(np.random.default_rng(6))
    echoed = 0
    first_flush_ns = -1
    step = 320
    for i in range(0, total, step):
        h.flow.push_audio(
            RawAudio(
                T0 + round(i * S / RATE),
                RATE,
                1,
                "S16LE",
                (np.clip(mic[i : i + step], -1, 1) * 32767).astype("<i2").tobytes(),
            )
        )
        h.clock.set_ns(T0 + round((i + step) * S / RATE))
        h.flow.run_until_idle(h.clock.now_ns())
        if first_flush_ns < 0 and h.of(SpeechFlush):
            first_flush_ns = h.clock.now_ns()
        for out in h.of(SpeechOut)[echoed:]:  # the room plays what we published, 80 ms later
            played = soxr.resample(out.samples, 24_000, RATE)
            at = round((out.stamp_ns - T0) * RATE / S) + RATE * 80 // 1000
            echo = np.convolve(played, room)[: max(0, len(mic) - at)]
            assert at >= i + step  # speech is never scheduled into the past of the mic stream
            mic[at : at + len(echo)] += echo
            echoed += 1
    return h, backend, T0 + round(user_start * S / RATE), first_flush_ns


def test_with_echo_cancellation_the_robot_never_barges_in_on_itself_but_the_user_does() -> None:
    h, backend, user_ns, flushed_at_ns = _talk_over_the_robot(aec_enabled=True)
    flushes = h.of(SpeechFlush)
    assert flushes, "the user's speech was not detected over the robot's"
    # Not before the user spoke, and within the 400 ms the echo gate asks for (+ one VAD frame).
    assert user_ns <= flushed_at_ns <= user_ns + 500_000_000
    # The speech run it reports may start a little early (a residual-echo blip the VAD hangover
    # joined to the user's first word), never late.
    assert flushes[0].stamp_ns <= user_ns + 100_000_000
    assert backend.interrupts >= 1
    assert h.flow.aec is not None
    assert abs(h.flow.aec.delay_ns - 80_000_000) <= 10_000_000


def test_without_echo_cancellation_the_robot_barges_in_on_its_own_voice() -> None:
    _, _, user_ns, flushed_at_ns = _talk_over_the_robot(aec_enabled=False)
    assert 0 < flushed_at_ns < user_ns - 500_000_000


def _stream(h: Harness, mic: np.ndarray, step: int = 320) -> list[tuple[int, int] | None]:
    """Push ``mic`` in real time: one 20 ms chunk, then the clock moves to its end.

    Returns the VAD's active run at the moment each SpeechOut was emitted.
    """
    runs_at_speech: list[tuple[int, int] | None] = []
    for i in range(0, len(mic), step):
        pcm = (np.clip(mic[i : i + step], -1, 1) * 32767).astype("<i2")
        h.flow.push_audio(RawAudio(T0 + round(i * S / RATE), RATE, 1, "S16LE", pcm.tobytes()))
        h.clock.set_ns(T0 + round((i + step) * S / RATE))
        before = len(h.of(SpeechOut))
        h.flow.run_until_idle(h.clock.now_ns())
        if len(h.of(SpeechOut)) > before:
            assert h.flow.vad is not None
            runs_at_speech.append(h.flow.vad.active_run())
    return runs_at_speech


def test_the_reply_is_not_flushed_by_the_question_it_answers(
    backend: ScriptedBackendDouble,
) -> None:
    backend.script = [LISTEN, speak("It is noon.", end=True)]
    h = Harness(backend, session={"output_latency_ms": 200})
    question = speech("What time is it?")
    last_voiced = int(np.flatnonzero(np.abs(question) > 0.02)[-1])
    start = 2 * RATE - last_voiced  # the voice stops at 2.0 s; the reply plays from 2.2 s
    mic = np.zeros(4 * RATE, np.float32)
    mic[start : start + len(question)] += question
    runs_at_speech = _stream(h, mic)
    # The reply was scheduled while the VAD still held the question's run open (its hangover):
    # a barge-in measured from the run's start would flush it.
    assert runs_at_speech
    assert runs_at_speech[0] is not None
    assert h.of(SpeechFlush) == []
    assert h.flow.counters.barge_ins == 0


def test_a_user_who_keeps_talking_over_the_reply_barges_in_from_the_replys_start(
    backend: ScriptedBackendDouble,
) -> None:
    backend.script = [LISTEN, speak("Sure", seconds=2.0)]
    h = Harness(backend, session={"output_latency_ms": 200})
    talk = speech("Hello robot, let me tell you a very long story about my day at work today.")
    mic = np.zeros(7 * RATE, np.float32)
    mic[RATE // 2 : RATE // 2 + len(talk)] += talk
    assert RATE // 2 + len(talk) > 3 * RATE
    _stream(h, mic)
    flushes = h.of(SpeechFlush)
    assert len(flushes) == 1
    reply_start = h.of(SpeechOut)[0].stamp_ns
    assert flushes[0].stamp_ns == reply_start  # measured from playback, not from the question
    assert flushes[0].dropped_from_ns == reply_start
    assert backend.interrupts == 1


def test_stop_returns_while_the_backend_is_blocked_and_the_backend_is_prepared_again_after(
    backend: ScriptedBackendDouble,
) -> None:
    gate = backend.block = threading.Event()
    h = Harness(backend, backend_deadline_ms=600_000)
    h.silence(1.0)
    h.clock.set_ns(T0 + S + WATERMARK)
    h.flow.start()
    assert backend.in_generate.wait(10)
    h.flow.stop()  # returns although generate() is still blocked on the test's Event
    assert backend.in_generate.is_set()
    backend.block = None
    gate.set()
    assert h.flow.wait_backend_idle(10.0)
    h.silence(1.0)
    h.run_to(T0 + 2 * S + WATERMARK)
    assert len(backend.prepares) == 2  # the abandoned call left the backend in an unknown state
    assert backend.units[-1].index == 0
    h.flow.close()
