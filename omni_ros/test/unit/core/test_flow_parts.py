"""OmniFlow's parts on their own: typed controls, the one "now" of a step, the backend call."""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from omni_ros.core import flow as flow_module
from omni_ros.core.clock import NS_PER_S, ManualClock
from omni_ros.core.errors import BackendTimeout, StateError
from omni_ros.core.flow import (
    CONTROLS,
    CallRunner,
    FlowConfig,
    Interrupt,
    OmniFlow,
    Pause,
    PromptState,
    Reset,
    Resume,
    SetPrompt,
    _StoppedError,
)
from omni_ros.core.types import Mode, OutputEvent, RawAudio, SpeechFlush, StateOut, UnitResult
from unit.core.scripted_backend import ScriptedBackendDouble

T0 = 100 * NS_PER_S
RATE = 16_000


def speak(text: str) -> UnitResult:
    return UnitResult(False, text, np.zeros(24_000, np.float32))


class Flow:
    """A flow on a ManualClock with silence pushed up to ``seconds``."""

    def __init__(self, script: list[Any], **config: object) -> None:
        self.backend = ScriptedBackendDouble(script)
        self.clock = ManualClock(T0)
        self.events: list[OutputEvent] = []
        mapping = {"aec": {"enabled": False}, **config}
        self.flow = OmniFlow(
            FlowConfig.from_mapping(mapping), self.backend, self.clock, self.events.append
        )

    def silence_until(self, seconds: int) -> None:
        pcm = np.zeros(RATE // 10, "<i2").tobytes()
        for k in range(seconds * 10):
            self.flow.push_audio(RawAudio(T0 + k * NS_PER_S // 10, RATE, 1, "S16LE", pcm))
        for s in range(1, seconds + 1):
            self.clock.set_ns(T0 + s * NS_PER_S)
            self.flow.run_until_idle(T0 + s * NS_PER_S)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


@dataclass(frozen=True)
class Mute:
    """A control kind the flow does not know."""


def test_an_unknown_control_is_refused_where_it_is_queued_and_names_the_known_ones() -> None:
    h = Flow([])
    with pytest.raises(TypeError, match=r"Interrupt.*SetPrompt.*interrupt, set_prompt"):
        h.flow.control(Mute())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        h.flow.control(("pause", None))  # type: ignore[arg-type]  # the old tuple form
    h.silence_until(1)  # nothing was queued: the flow runs on
    assert [u.index for u in h.backend.units] == [0]
    assert Mode.PAUSED not in {s.mode for s in h.of(StateOut)}


def test_a_control_kind_without_a_handler_is_a_loud_error_in_the_worker_not_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Flow([])
    monkeypatch.setattr(flow_module, "CONTROLS", (*CONTROLS, Mute))
    h.flow.control(Mute())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no handler for the control Mute"):
        h.flow.step_once(T0)


def test_typed_controls_do_what_the_input_methods_do() -> None:
    by_method, by_type = Flow([speak("Hi")] * 4), Flow([speak("Hi")] * 4)
    by_method.silence_until(1)
    by_type.silence_until(1)
    by_method.flow.pause()
    by_type.flow.control(Pause())
    by_method.silence_until(2)
    by_type.silence_until(2)
    by_method.flow.resume()
    by_type.flow.control(Resume())
    by_method.flow.reset()
    by_type.flow.control(Reset())
    by_method.silence_until(3)
    by_type.silence_until(3)

    def modes(h: Flow) -> list[tuple[int, Mode]]:
        return [(s.stamp_ns, s.mode) for s in h.of(StateOut)]

    assert modes(by_method) == modes(by_type)
    assert Mode.PAUSED in {m for _, m in modes(by_type)}
    assert len(by_type.backend.prepares) == len(by_method.backend.prepares) == 2


def test_set_prompt_queues_one_typed_control_that_withdraw_prompt_finds() -> None:
    h = Flow([])
    future = h.flow.set_prompt("Be brief.")
    (queued,) = h.flow._controls
    assert isinstance(queued, SetPrompt)
    assert (queued.text, queued.ref_voice, queued.future) == ("Be brief.", None, future)
    assert h.flow.withdraw_prompt(future)
    assert not h.flow._controls
    assert future.exception() is not None


def test_a_step_decides_at_its_own_now_not_at_a_second_reading_of_the_clock() -> None:
    """On main the flush of an interrupt was stamped decided at the clock, not the step's now."""
    h = Flow([speak("Hello"), speak(" there")])
    h.silence_until(1)
    assert h.flow.session.mode is Mode.SPEAKING
    h.clock.set_ns(T0 + 5 * NS_PER_S)  # the clock reads later than the step being run
    step_ns = T0 + NS_PER_S + 300_000_000
    h.flow.control(Interrupt())
    h.flow.step_once(step_ns)
    (flush,) = h.of(SpeechFlush)
    assert flush.decided_ns == step_ns
    state = h.of(StateOut)[-1]
    assert (state.mode, state.stamp_ns) == (Mode.INTERRUPTED, flush.stamp_ns)


def test_a_backend_call_yields_the_clock_at_every_tick_and_ends_with_its_value() -> None:
    runner = CallRunner()
    clock = ManualClock(T0)
    release = threading.Event()
    call = runner.start(lambda: release.wait(10) and "done", deadline_ms=60_000)
    ticks = []
    for tick_ns in call.waiting(clock, tick_ms=1, stopping=lambda: False):
        ticks.append(tick_ns)
        clock.advance_ns(NS_PER_S)
        if len(ticks) == 3:
            release.set()
    assert ticks[:3] == [T0, T0 + NS_PER_S, T0 + 2 * NS_PER_S]
    assert call.outcome is not None
    assert call.outcome.value == "done"
    assert call.outcome.error is None
    assert call.outcome.done_ns == clock.now_ns()  # the moment it ended, read once
    runner.close()


def test_a_backend_call_past_its_deadline_ends_in_a_timeout_and_keeps_running() -> None:
    runner = CallRunner()
    release = threading.Event()
    call = runner.start(lambda: release.wait(10), deadline_ms=20)
    for _ in call.waiting(ManualClock(T0), tick_ms=1, stopping=lambda: False):
        pass
    assert call.outcome is not None
    assert isinstance(call.outcome.error, BackendTimeout)
    assert runner.busy
    assert not call.future.done()
    release.set()
    assert runner.wait_idle(10)
    runner.close()


def test_a_backend_call_raises_stopped_when_the_flow_stops_and_errors_are_outcomes() -> None:
    runner = CallRunner()
    release = threading.Event()
    call = runner.start(lambda: release.wait(10), deadline_ms=60_000)
    with pytest.raises(_StoppedError):
        for _ in call.waiting(ManualClock(T0), tick_ms=1, stopping=lambda: True):
            pass
    release.set()
    assert runner.wait_idle(10)

    def fail() -> None:
        raise ValueError("bad")

    failing = runner.start(fail, deadline_ms=60_000)
    list(failing.waiting(ManualClock(T0), tick_ms=1, stopping=lambda: False))
    assert failing.outcome is not None
    assert isinstance(failing.outcome.error, ValueError)
    runner.close()


def _request(text: str) -> SetPrompt:
    return SetPrompt(text, None, concurrent.futures.Future())


def test_a_prompt_tried_and_refused_goes_back_to_the_previous_one() -> None:
    state = PromptState("Be helpful.")
    first = _request("Be brief.")
    state.try_new(first)
    assert (state.text, state.trial) == ("Be brief.", (("Be helpful.", None), first.future))
    assert state.end_trial(refused=True) is first.future  # the flow answers it
    assert state.text == "Be helpful."
    assert state.trial is None
    assert state.end_trial(refused=True) is None  # nothing was being tried
    assert state.text == "Be helpful."


def test_a_prompt_superseded_before_it_was_tried_is_answered_and_the_oldest_is_kept() -> None:
    state = PromptState("Be helpful.")
    first, second = _request("Be brief."), _request("Be kind.")
    state.try_new(first)
    state.try_new(second)
    assert isinstance(first.future.exception(), StateError)
    assert "superseded" in str(first.future.exception())
    assert state.text == "Be kind."
    assert state.end_trial(refused=True) is second.future
    assert state.text == "Be helpful."  # not the superseded "Be brief."


def test_a_prompt_prepared_stays_in_force() -> None:
    state = PromptState("Be helpful.")
    request = _request("Be brief.")
    state.try_new(request)
    assert state.end_trial(refused=False) is request.future
    assert state.text == "Be brief."
    assert state.trial is None
    assert not request.future.done()  # answered by the flow, after its own bookkeeping
