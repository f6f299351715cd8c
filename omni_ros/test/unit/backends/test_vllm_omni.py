"""``vllm_omni`` against ``LoopbackVllmServer``, a test double of a vllm-omni replica (127.0.0.1 only).

The double's behaviours are cited to vllm-omni's code in its module docstring; each test below that
pins a finding from that code names it.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omni_ros.backends import _wire
from omni_ros.backends.base import create_backend
from omni_ros.backends.vllm_omni import VllmOmniBackend, VllmOmniConfig
from omni_ros.core.errors import (
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    StateError,
)
from unit.backends.contract import BackendContract, check_result, make_unit
from unit.backends.loopback_duplex_model import DuplexModelDouble, tone
from unit.backends.loopback_vllm_server import LoopbackVllmServer

PCM16_TOLERANCE = 1.0 / 16384
PROMPT = "You are a helpful robot."
#: Long enough that the double's silence continuations never fire in tests that are not about them
#: (a loaded CI machine must not turn a slow client into a server-driven turn).
NO_CONTINUATION = 30.0


@pytest.fixture
def vllm_server() -> Iterator[LoopbackVllmServer]:
    server = LoopbackVllmServer(continuation_period_s=NO_CONTINUATION).start()
    yield server
    server.stop()


@pytest.fixture
def voice_wav(tmp_path: Path) -> Path:
    path = tmp_path / "voice.wav"
    _wire.write_wav(path, 0.1 * np.sin(np.arange(16000) / 7.0).astype(np.float32), 16000)
    return path


def make_backend(*urls: str, **params: Any) -> VllmOmniBackend:
    settings: dict[str, Any] = {
        "urls": list(urls),
        "retries": 1,
        "backoff_s": 0.01,
        "unit_timeout_s": 5.0,
        "heartbeat_interval_s": 0.0,
        **params,
    }
    backend = create_backend("vllm_omni", settings)
    assert isinstance(backend, VllmOmniBackend)
    return backend


def voice() -> np.ndarray:
    return (0.1 * np.sin(np.arange(16000) / 5.0)).astype(np.float32)


def run(backend: VllmOmniBackend, index: int, **kwargs: Any) -> Any:
    backend.prefill(make_unit(backend, index, **kwargs))
    return check_result(backend.generate())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def sent(server: LoopbackVllmServer, kind: str) -> list[dict[str, Any]]:
    with server.lock:
        return [m for m in server.received if m.get("type") == kind]


def sent_types(server: LoopbackVllmServer) -> list[str]:
    with server.lock:
        return [str(m.get("type")) for m in server.received]


def scripted(*decisions: str, turn_units: int = 2) -> Any:
    def factory() -> DuplexModelDouble:
        return DuplexModelDouble(script=list(decisions), turn_units=turn_units)

    return factory


def wait_for(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------- contract


class TestVllmOmniContract(BackendContract):
    @pytest.fixture
    def backend(
        self, vllm_server: LoopbackVllmServer, voice_wav: Path
    ) -> Iterator[VllmOmniBackend]:
        backend = make_backend(vllm_server.url, ref_audio_path=str(voice_wav))
        yield backend
        backend.close()

    @pytest.fixture
    def stall(self, vllm_server: LoopbackVllmServer) -> Any:
        return lambda: setattr(vllm_server, "fault", "hang")


# ------------------------------------------------------------------------------------ the session


def test_session_update_opens_a_model_native_session_with_the_voice(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    (update,) = sent(vllm_server, "session.update")
    session = update["session"]
    assert session["instructions"] == PROMPT
    assert (session["input_audio_format"], session["output_audio_format"]) == ("pcm16", "pcm16")
    assert session["turn_detection"] is None
    assert session["overlap_policy"] == "listen_only"
    # emitter.py: auto_responds(): without it the session waits for commits and never answers.
    assert session["extra_body"]["auto_response"] is True
    samples, rate = _wire.parse_wav(base64.b64decode(session["ref_audio"].split(",", 1)[1]))
    assert rate == 16000
    np.testing.assert_allclose(samples, voice(), atol=PCM16_TOLERANCE)
    assert backend.capabilities["chunk_period_ms"] == 1000
    assert backend.session_id.startswith("duplex-")
    backend.close()


def test_the_model_answers_streamed_audio_only_with_auto_response(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    result = run(backend, 0, speech=True)
    assert not result.is_listen
    assert vllm_server.session().auto_response
    backend.close()


def test_a_server_that_fell_back_to_turn_based_is_refused_with_a_config_error() -> None:
    server = LoopbackVllmServer(duplex=False).start()
    try:
        backend = make_backend(server.url)
        with pytest.raises(ConfigError, match="session_mode: duplex"):
            backend.prepare(PROMPT, ref_voice=voice())
        assert len(sent(server, "session.close")) == 1
        backend.close()
    finally:
        server.stop()


def test_a_session_without_a_voice_is_refused_before_connecting(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url)
    with pytest.raises(ConfigError, match="reference voice"):
        backend.prepare(PROMPT)
    assert vllm_server.received == []  # plugin.py would answer ref_audio_required
    backend.close()


def test_the_first_unit_is_1030_ms_and_every_frame_lands_on_its_own_unit(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    units = [make_unit(backend, i, frames=1) for i in range(3)]
    for unit in units:
        backend.prefill(unit)
        backend.generate()
    appends = sent(vllm_server, "input_audio_buffer.append")
    assert [(a["duration_ms"], a["audio_end_ms"]) for a in appends] == [
        (1030, 1030),
        (1000, 2030),
        (1000, 3030),
    ]
    assert appends[0]["sample_rate_hz"] == 16000
    np.testing.assert_allclose(
        _wire.pcm16_to_float(base64.b64decode(appends[0]["audio"])),
        units[0].audio,
        atol=PCM16_TOLERANCE,
    )
    session = vllm_server.session()
    sizes = [(u.frames[-1].rgb.shape[1], u.frames[-1].rgb.shape[0]) for u in units]
    assert session.frames == [(0, sizes[0]), (1, sizes[1]), (2, sizes[2])]
    assert session.stranded_frames == 0
    backend.close()


@pytest.mark.parametrize("spelling", ["ga", "beta", "both"])
def test_speaking_units_return_24khz_audio_text_and_the_turn_end(spelling: str) -> None:
    server = LoopbackVllmServer(spelling=spelling, continuation_period_s=NO_CONTINUATION).start()
    try:
        backend = make_backend(server.url)
        backend.prepare(PROMPT, ref_voice=voice())
        first, second, third = (run(backend, i, speech=i == 0) for i in range(3))
        assert (first.is_listen, second.is_listen, third.is_listen) == (False, False, True)
        assert first.text == "turn1.unit0 "
        assert second.text == "turn1.unit1 "
        for result in (first, second):
            assert result.audio is not None
            np.testing.assert_allclose(result.audio, tone(1), atol=PCM16_TOLERANCE)
        assert (first.end_of_turn, second.end_of_turn) == (False, True)
        backend.close()
    finally:
        server.stop()


def test_events_are_acknowledged_so_the_resume_journal_stays_small(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    for index in range(4):
        run(backend, index, speech=index == 0)
    # The acks travel on the client's socket: wait until the server has read them.
    wait_for(lambda: len(sent(vllm_server, "session.event_ack")) >= 4)
    event_acks = [a["server_event_seq"] for a in sent(vllm_server, "session.event_ack")]
    assert event_acks == sorted(event_acks)
    session = vllm_server.session()
    with vllm_server.lock:
        last_ack = sent(vllm_server, "session.event_ack")[-1]["server_event_seq"]
        assert all(seq > last_ack for seq, _ in session.journal)
    backend.close()


# ------------------------------------------------------------------- events are not one per append


def test_a_unit_inside_a_response_where_the_model_listens_gets_no_event_and_no_timeout() -> None:
    # model_channel.py: _on_model_listen emits nothing for a non-terminal listen inside a response.
    server = LoopbackVllmServer(continuation_period_s=NO_CONTINUATION).start()
    server.model_factory = scripted("speak", "listen", "speak_end")
    try:
        backend = make_backend(server.url, unit_timeout_s=3.0, speech_wait_s=0.3)
        backend.prepare(PROMPT, ref_voice=voice())
        first = run(backend, 0, speech=True)
        t0 = time.monotonic()
        middle = run(backend, 1)
        waited = time.monotonic() - t0
        last = run(backend, 2)
        assert first.audio is not None
        assert not first.end_of_turn
        assert (middle.is_listen, middle.audio, middle.end_of_turn) == (False, None, False)
        assert waited < 3.0  # the speech budget, not the decision timeout
        assert last.audio is not None
        assert last.end_of_turn
        backend.close()
    finally:
        server.stop()


def test_speech_from_server_continuation_units_is_returned_at_once() -> None:
    # runner.py: _schedule_silence_continuation runs units of silence while the client is slow.
    server = LoopbackVllmServer(continuation_period_s=0.05).start()
    server.model_factory = lambda: DuplexModelDouble(turn_units=4)
    try:
        backend = make_backend(server.url)
        backend.prepare(PROMPT, ref_voice=voice())
        first = run(backend, 0, speech=True)
        wait_for(lambda: server.session().continuation_units >= 3)
        time.sleep(0.1)
        second = run(backend, 1)
        assert first.audio is not None
        assert len(first.audio) == 24000
        assert second.audio is not None
        assert len(second.audio) == 3 * 24000  # three continuation units, not one per append
        assert second.text == "turn1.unit1 turn1.unit2 turn1.unit3 "
        assert second.end_of_turn
        assert run(backend, 2).is_listen
        backend.close()
    finally:
        server.stop()


def test_speech_released_after_the_next_append_is_not_lost() -> None:
    # model_channel.py: on_stage_output_item: the talker's audio comes when it is ready.
    server = LoopbackVllmServer(audio_delay_s=0.6, continuation_period_s=NO_CONTINUATION).start()
    try:
        backend = make_backend(server.url, speech_wait_s=0.2)
        backend.prepare(PROMPT, ref_voice=voice())
        results = [run(backend, 0, speech=True)]
        assert not results[0].is_listen  # the response started; its audio is still on the way
        for index in range(1, 6):
            results.append(run(backend, index))
            time.sleep(0.2)
        audio = [r.audio for r in results if r.audio is not None]
        assert sum(len(a) for a in audio) == 2 * 24000
        assert "".join(r.text for r in results) == "turn1.unit0 turn1.unit1 "
        assert sum(r.end_of_turn for r in results) == 1
        backend.close()
    finally:
        server.stop()


# ------------------------------------------------------------------------------ playback truth


def test_only_speech_reported_as_played_is_acknowledged(vllm_server: LoopbackVllmServer) -> None:
    backend = make_backend(vllm_server.url, playback_ack="played")
    backend.prepare(PROMPT, ref_voice=voice())
    run(backend, 0, speech=True)
    run(backend, 1)
    assert sent(vllm_server, "playback.ack") == []  # handed over is not heard
    backend.on_played(0, 24000)
    backend.on_played(1, 6000)
    run(backend, 2)
    # The ack travels on the client's socket (flaky under load when read at once): wait until
    # the server has read one, then it must be exactly the heard part.
    wait_for(lambda: sent(vllm_server, "playback.ack") != [])
    acks = [(a["response_id"], a["played_ms"]) for a in sent(vllm_server, "playback.ack")]
    assert acks == [("resp_01", 1250)]
    wait_for(lambda: vllm_server.session().history_ms.get("item_resp_01") == 1250)
    backend.close()


def test_scheduled_acks_never_run_ahead_of_the_schedule(vllm_server: LoopbackVllmServer) -> None:
    backend = make_backend(vllm_server.url, playback_ack="scheduled", playback_latency_ms=0)
    backend.prepare(PROMPT, ref_voice=voice())
    t0 = time.monotonic()
    run(backend, 0, speech=True)
    time.sleep(0.3)
    run(backend, 1)
    elapsed_ms = (time.monotonic() - t0) * 1000
    acks = sent(vllm_server, "playback.ack")
    assert acks, "speech that played must be acknowledged"
    assert all(a["played_ms"] <= elapsed_ms for a in acks)
    assert max(a["played_ms"] for a in acks) >= 250
    backend.close()


def test_barge_in_sends_heard_position_barge_in_and_truncate_but_no_cancel(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url, playback_ack="played")
    backend.prepare(PROMPT, ref_voice=voice())
    vllm_server.model_factory = DuplexModelDouble
    first = run(backend, 0, speech=True)
    assert first.audio is not None
    backend.on_played(0, 12000)  # the user heard half a second, then spoke
    thread = threading.Thread(target=backend.interrupt)
    thread.start()
    thread.join()
    after = run(backend, 1, speech=True)  # must not raise
    assert (after.is_listen, after.audio, after.text) == (True, None, "")
    wait_for(lambda: len(sent(vllm_server, "input_audio_buffer.append")) == 2)
    assert sent(vllm_server, "response.cancel") == []
    types = [t for t in sent_types(vllm_server) if t not in ("session.event_ack",)]
    tail = types[types.index("barge_in") - 1 : types.index("barge_in") + 2]
    assert tail == ["playback.ack", "barge_in", "conversation.item.truncate"]
    assert sent(vllm_server, "conversation.item.truncate")[0]["audio_end_ms"] == 500
    wait_for(lambda: vllm_server.session().history_ms.get("item_resp_01") == 500)
    assert vllm_server.session().barge_ins == 1
    run(backend, 2)  # the cancelled response.done was absorbed; the session goes on
    backend.close()


def test_a_barge_in_before_any_speech_was_heard_leaves_no_assistant_history(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url, playback_ack="scheduled", playback_latency_ms=60_000)
    backend.prepare(PROMPT, ref_voice=voice())
    assert run(backend, 0, speech=True).audio is not None  # returned, still queued on the robot
    backend.interrupt()
    assert run(backend, 1).is_listen
    wait_for(lambda: vllm_server.session().barge_ins == 1)
    assert sent(vllm_server, "playback.ack") == []
    assert sent(vllm_server, "conversation.item.truncate") == []
    assert "item_resp_01" not in vllm_server.session().history_ms
    backend.close()


def test_barge_in_after_the_response_completed_still_cuts_history_to_what_was_heard(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url, playback_ack="played")
    backend.prepare(PROMPT, ref_voice=voice())
    run(backend, 0, speech=True)
    run(backend, 1)  # end of turn: the server's response is complete, playback is not
    backend.on_played(0, 24000)
    backend.on_played(1, 2400)
    backend.interrupt()
    assert run(backend, 2, speech=True).is_listen
    wait_for(lambda: len(sent(vllm_server, "conversation.item.truncate")) == 1)
    assert sent(vllm_server, "conversation.item.truncate")[0]["audio_end_ms"] == 1100
    wait_for(lambda: vllm_server.session().history_ms.get("item_resp_01") == 1100)
    assert backend.stats.get("error.response_not_active", 0) == 0
    backend.interrupt()  # a second barge-in has nothing more to cut
    assert run(backend, 3).is_listen
    wait_for(lambda: vllm_server.session().barge_ins == 2)
    assert len(sent(vllm_server, "conversation.item.truncate")) == 1
    backend.close()


def test_a_stray_response_not_active_error_is_counted_not_raised(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    backend._send({"type": "response.cancel", "response_id": "resp_99"})  # nothing active
    result = run(backend, 0)
    assert result.is_listen
    assert backend.stats["error.response_not_active"] == 1
    backend.close()


# --------------------------------------------------------------------------- retryable errors


def test_playback_ack_too_late_is_retryable_and_does_not_fail_the_unit(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url, playback_ack="played")
    backend.prepare(PROMPT, ref_voice=voice())
    run(backend, 0, speech=True)
    vllm_server.fault = "ack_too_late"
    backend.on_played(0, 24000)
    run(backend, 1)
    run(backend, 2)
    assert backend.stats["error.playback_ack_too_late"] == 1
    backend.close()


def test_input_backpressure_drops_the_unit_and_the_session_goes_on(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url, unit_timeout_s=3.0)
    backend.prepare(PROMPT, ref_voice=voice())
    vllm_server.backpressure_appends = 1
    t0 = time.monotonic()
    dropped = run(backend, 0, speech=True)
    assert dropped.is_listen
    assert time.monotonic() - t0 < 3.0  # no decision will come for it; none is awaited
    assert backend.stats["units_dropped_backpressure"] == 1
    assert not run(backend, 1, speech=True).is_listen
    backend.close()


# ------------------------------------------------------------------------- server-side barge-in


def test_server_vad_barge_in_cancels_the_response_and_the_unit_listens() -> None:
    server = LoopbackVllmServer(continuation_period_s=NO_CONTINUATION).start()
    server.model_factory = lambda: DuplexModelDouble(turn_units=4)
    try:
        backend = make_backend(server.url, turn_detection="server_vad", playback_ack="played")
        backend.prepare(PROMPT, ref_voice=voice())
        session = sent(server, "session.update")[0]["session"]
        assert session["turn_detection"]["type"] == "server_vad"
        assert session["overlap_policy"] == "barge_in_on_speech"
        assert not run(backend, 0, speech=True).is_listen
        backend.on_played(0, 4800)
        run(backend, 1)  # acknowledges 200 ms
        barged = run(backend, 2, speech=True)  # the server hears the user over the robot
        assert barged.is_listen
        assert barged.barge_in  # the session flushes the speech still scheduled
        assert backend.stats["server_barge_ins"] == 1
        assert backend.metrics()["server_barge_ins"] == 1
        assert server.session().history_ms.get("item_resp_01") == 200
        backend.close()
    finally:
        server.stop()


# ------------------------------------------------------------------------------ text injection


def test_injected_text_opens_a_session_seeded_with_it(vllm_server: LoopbackVllmServer) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    run(backend, 0)
    old = backend.session_id
    run(backend, 1, texts=("What is on the table?",))
    updates = sent(vllm_server, "session.update")
    assert len(updates) == 2
    assert updates[1]["session"]["extra_body"]["duplex_initial_user_text"] == (
        "What is on the table?"
    )
    assert updates[1]["session"]["instructions"] == PROMPT
    assert backend.session_id != old
    appends = [a for a in sent(vllm_server, "input_audio_buffer.append")]
    assert appends[-1]["duration_ms"] == 1030  # padded so model unit 0 closes on a unit end
    assert backend.stats["sessions_reopened_for_text"] == 1
    backend.close()


def test_injected_text_can_be_dropped_and_counted(vllm_server: LoopbackVllmServer) -> None:
    backend = make_backend(vllm_server.url, text_injection="drop")
    backend.prepare(PROMPT, ref_voice=voice())
    run(backend, 0, texts=("hello",))
    assert len(sent(vllm_server, "session.update")) == 1
    assert backend.stats["texts_dropped"] == 1
    backend.close()


# ------------------------------------------------------------------------ lifecycle and fleet


def test_heartbeats_keep_an_idle_session_attached() -> None:
    # serving.py: _read_loop: no client message for idle_timeout_s is a disconnect.
    server = LoopbackVllmServer(
        idle_timeout_s=0.4, disconnect_grace_s=0.2, continuation_period_s=NO_CONTINUATION
    ).start()
    try:
        backend = make_backend(server.url, heartbeat_interval_s=0.1, idle_timeout_s=1.0)
        backend.prepare(PROMPT, ref_voice=voice())
        run(backend, 0)
        session_id = backend.session_id
        time.sleep(1.2)  # a paused robot sends no units
        run(backend, 1)
        assert backend.session_id == session_id
        assert server.idle_disconnects == 0
        assert server.session().heartbeats >= 3
        backend.close()
    finally:
        server.stop()


def test_reset_waits_for_session_closed_so_the_reopen_gets_the_freed_slot() -> None:
    # manager.py: _close_runner: session.closed comes after the stage cleanup; the slot is held.
    server = LoopbackVllmServer(max_sessions=1, teardown_s=1.5).start()
    try:
        backend = make_backend(server.url, retries=0)
        backend.prepare(PROMPT, ref_voice=voice())
        first_id = backend.session_id
        backend.reset()
        backend.prepare(PROMPT, ref_voice=voice())
        assert backend.session_id != first_id
        assert server.refused == []
        backend.close()
        assert server.live_sessions() == []
    finally:
        server.stop()


def test_a_full_replica_sends_the_robot_to_the_next_url() -> None:
    full = LoopbackVllmServer(max_sessions=1).start()
    spare = LoopbackVllmServer().start()
    holder = make_backend(full.url)
    robot = make_backend(full.url, spare.url)
    try:
        holder.prepare(PROMPT, ref_voice=voice())
        robot.prepare(PROMPT, ref_voice=voice())
        assert full.refused == ["resource_exhausted"]
        assert robot.replica_url == spare.url
        assert len(spare.live_sessions()) == 1
        run(robot, 0)
    finally:
        holder.close()
        robot.close()
        full.stop()
        spare.stop()


def test_when_every_replica_is_full_prepare_backs_off_raises_then_recovers() -> None:
    full = LoopbackVllmServer(max_sessions=1).start()
    holder = make_backend(full.url)
    robot = make_backend(full.url, retries=2)
    try:
        holder.prepare(PROMPT, ref_voice=voice())
        with pytest.raises(BackendUnavailable, match="resource_exhausted"):
            robot.prepare(PROMPT, ref_voice=voice())
        assert full.refused == ["resource_exhausted"] * 3  # first try + 2 retries
        assert "resource_exhausted" in robot.last_error
        holder.close()  # a slot frees up: the robot gets in on its next call
        run(robot, 0)
        assert robot.recoveries == 1
        assert robot.last_error == ""
    finally:
        holder.close()
        robot.close()
        full.stop()


def test_a_dropped_connection_mid_turn_resumes_the_same_session_transparently(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    session_id = backend.session_id
    vllm_server.fault = "drop_mid_turn"
    result = run(backend, 0, speech=True)
    assert not result.is_listen
    assert result.text == "turn1.unit0 "
    assert result.audio is not None
    assert len(result.audio) == 24000
    (resume,) = sent(vllm_server, "session.resume")
    assert resume["session_id"] == session_id
    assert resume["last_received_server_event_seq"] >= 1
    assert backend.session_id == session_id
    assert not run(backend, 1).is_listen  # the turn goes on
    backend.close()


def test_after_the_grace_period_a_drop_costs_the_session_and_the_next_unit_opens_a_new_one() -> (
    None
):
    server = LoopbackVllmServer(disconnect_grace_s=0.0).start()
    try:
        backend = make_backend(server.url)
        backend.prepare(PROMPT, ref_voice=voice())
        old_id = backend.session_id
        server.fault = "drop_mid_turn"
        backend.prefill(make_unit(backend, 0, speech=True))
        with pytest.raises(BackendUnavailable, match="could not be resumed"):
            backend.generate()
        check_result(run(backend, 1))
        assert backend.session_id not in ("", old_id)
        updates = sent(server, "session.update")
        assert len(updates) == 2  # re-prepared with the same prompt and voice
        assert updates[1]["session"]["instructions"] == PROMPT
        assert updates[1]["session"]["ref_audio"] == updates[0]["session"]["ref_audio"]
        backend.close()
    finally:
        server.stop()


def test_a_replica_that_dies_mid_turn_is_reported_and_recovered_on_the_same_port() -> None:
    server = LoopbackVllmServer().start()
    port = server.port
    backend = make_backend(server.url, unit_timeout_s=2.0)
    try:
        backend.prepare(PROMPT, ref_voice=voice())
        server.fault = "hang"
        backend.prefill(make_unit(backend, 0, speech=True))
        server.stop()
        with pytest.raises(BackendUnavailable):
            backend.generate()
        with pytest.raises(BackendUnavailable, match="no replica is reachable"):
            backend.prefill(make_unit(backend, 1))
        assert "no replica is reachable" in backend.last_error
        server = LoopbackVllmServer(port=port).start()
        assert not run(backend, 1, speech=True).is_listen
        assert len(server.live_sessions()) == 1
        assert backend.recoveries == 1
    finally:
        backend.close()
        server.stop()


def test_a_replica_that_gives_no_decision_raises_backend_timeout_and_gets_a_fresh_session(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url, unit_timeout_s=0.3)
    backend.prepare(PROMPT, ref_voice=voice())
    old_id = backend.session_id
    vllm_server.fault = "hang"
    backend.prefill(make_unit(backend, 0))
    with pytest.raises(BackendTimeout, match="no listen/speak decision"):
        backend.generate()
    vllm_server.fault = None
    check_result(run(backend, 1))
    assert backend.session_id != old_id
    backend.close()


def test_malformed_json_raises_backend_protocol_error(vllm_server: LoopbackVllmServer) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    vllm_server.fault = "malformed"
    backend.prefill(make_unit(backend, 0))
    with pytest.raises(BackendProtocolError, match="malformed JSON"):
        backend.generate()
    backend.close()


def test_no_server_raises_unavailable_naming_the_url_and_how_to_start_it() -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    backend = make_backend(url, retries=0, connect_timeout_s=0.5)
    with pytest.raises(BackendUnavailable) as excinfo:
        backend.prepare(PROMPT, ref_voice=voice())
    assert url in str(excinfo.value)
    assert "vllm-omni serve" in str(excinfo.value)
    backend.close()


# ------------------------------------------------------------------------------------------ config


def test_config_accepts_a_comma_separated_url_list_and_rejects_http_urls() -> None:
    config = VllmOmniConfig.from_mapping({"urls": "ws://a:1, ws://b:2/"})
    assert config.urls == ("ws://a:1", "ws://b:2")
    with pytest.raises(ConfigError, match="ws://"):
        VllmOmniConfig.from_mapping({"urls": ["http://a:1"]})
    with pytest.raises(ConfigError, match="unknown"):
        VllmOmniConfig.from_mapping({"url": "ws://a:1"})


def test_the_shipped_defaults_match_a_default_server_install() -> None:
    config = VllmOmniConfig()
    assert config.urls == ("ws://127.0.0.1:8099",)
    assert config.path == "/v1/realtime?duplex=1"
    assert config.model == "openbmb/MiniCPM-o-4_5"
    assert (config.turn_detection, config.overlap_policy) == ("none", "listen_only")
    assert config.first_unit_ms == 1030


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"turn_detection": "none", "overlap_policy": "barge_in_on_speech"}, "conflicts"),
        ({"turn_detection": "server_vad", "overlap_policy": "listen_only"}, "conflicts"),
        ({"turn_detection": "semantic_vad"}, "turn_detection"),
        ({"overlap_policy": "interrupt"}, "overlap_policy"),
        ({"vad_threshold": 0.0}, "vad_threshold"),
        ({"speech_wait_s": 1.0}, "below one unit"),
        ({"first_unit_ms": 1000}, "1030"),
        ({"playback_ack": "delivered"}, "playback_ack"),
        ({"heartbeat_interval_s": 60.0, "idle_timeout_s": 30.0}, "idle_timeout_s"),
        ({"text_injection": "append"}, "text_injection"),
        ({"path": "v1/realtime"}, "path"),
    ],
)
def test_config_rejects_settings_the_server_would_refuse(
    params: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        VllmOmniConfig.from_mapping(params)


def test_server_vad_derives_its_overlap_policy() -> None:
    config = VllmOmniConfig.from_mapping({"turn_detection": "server_vad"})
    assert config.overlap_policy == "barge_in_on_speech"


def test_a_missing_or_broken_ref_audio_file_is_a_config_error_at_configure(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.wav"):
        VllmOmniConfig.from_mapping({"ref_audio_path": str(tmp_path / "missing.wav")})
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not a wav")
    with pytest.raises(ConfigError, match="ref_audio_path"):
        VllmOmniConfig.from_mapping({"ref_audio_path": str(broken)})


# ------------------------------------------------------- the August 2026 server (run on loopback)


def test_an_earlier_server_generation_opens_its_native_lane_and_resumes() -> None:
    # Found by running the client against that generation's own handler (fullduplex3): without
    # minicpmo45_native_duplex the session is its generic adapter and never decides on units;
    # without incarnation its session.resume is refused.
    server = LoopbackVllmServer(
        generation="2026-08", supports_barge_in=False, continuation_period_s=NO_CONTINUATION
    ).start()
    try:
        backend = make_backend(server.url)
        backend.prepare(PROMPT, ref_voice=voice())
        extra = sent(server, "session.update")[0]["session"]["extra_body"]
        assert extra["minicpmo45_native_duplex"] is True
        assert backend.capabilities["implementation_level"] == "model_native_duplex"
        session_id = backend.session_id
        server.fault = "drop_mid_turn"
        assert not run(backend, 0, speech=True).is_listen
        (resume,) = sent(server, "session.resume")
        assert resume["incarnation"] == 0
        assert backend.session_id == session_id
        backend.close()
    finally:
        server.stop()


def test_a_non_native_session_is_refused_with_a_config_error() -> None:
    server = LoopbackVllmServer(generation="2026-08").start()
    try:
        backend = make_backend(server.url)
        original = backend._session_object

        def without_flag() -> dict[str, Any]:
            session = original()
            session["extra_body"].pop("minicpmo45_native_duplex")
            return session

        backend._session_object = without_flag  # type: ignore[method-assign]
        with pytest.raises(ConfigError, match="serving_session_adapter"):
            backend.prepare(PROMPT, ref_voice=voice())
        backend.close()
    finally:
        server.stop()


def test_without_server_barge_in_the_client_cancels_the_active_response() -> None:
    server = LoopbackVllmServer(
        supports_barge_in=False, continuation_period_s=NO_CONTINUATION
    ).start()
    try:
        backend = make_backend(server.url)
        backend.prepare(PROMPT, ref_voice=voice())
        assert not run(backend, 0, speech=True).is_listen
        backend.interrupt()
        assert run(backend, 1).is_listen
        wait_for(lambda: len(sent(server, "response.cancel")) == 1)
        assert sent(server, "barge_in") == []
        assert sent(server, "response.cancel")[0]["response_id"] == "resp_01"
        run(backend, 2)
        assert backend.stats.get("error.barge_in_unsupported", 0) == 0
        backend.close()
    finally:
        server.stop()


# ------------------------------------------------------------------ close and interrupt mid-call
class _Call:
    """Run one backend call on another thread (as the flow's backend-call thread does)."""

    def __init__(self, fn: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Any) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # the test inspects it
            self.error = exc

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the call did not return within {timeout_s} s"


def _hung_generate(server: LoopbackVllmServer, backend: VllmOmniBackend) -> _Call:
    """A generate() waiting for a decision that never comes (the server swallows the append)."""
    backend.prepare(PROMPT, ref_voice=voice())
    check_result(run(backend, 0))
    server.fault = "hang"
    appends = len(sent(server, "input_audio_buffer.append"))
    backend.prefill(make_unit(backend, 1))
    wait_for(lambda: len(sent(server, "input_audio_buffer.append")) > appends)
    call = _Call(backend.generate)
    time.sleep(0.2)  # let it enter recv(); nothing below depends on the exact moment
    return call


def test_close_from_another_thread_while_generate_waits_closes_the_session_politely(
    vllm_server: LoopbackVllmServer,
) -> None:
    # On the code before the fix, close() read session.closed while generate() was in recv():
    # websockets raised ConcurrencyError (sync/messages.py: Assembler.get, one reader at a time),
    # the session was never closed, and the call in flight went on to resume it on a new socket.
    backend = make_backend(vllm_server.url, unit_timeout_s=30.0)
    call = _hung_generate(vllm_server, backend)
    backend.close()  # must not raise
    call.join(5.0)
    assert isinstance(call.error, BackendUnavailable), call.error
    assert "closing" in str(call.error)
    # manager.py: _close_runner frees the slot once session.closed is sent: the close was polite.
    wait_for(lambda: vllm_server.closed_sessions == 1)
    assert vllm_server.live_sessions() == []
    assert vllm_server.resumes == 0
    assert len(sent(vllm_server, "session.update")) == 1  # no session opened behind close()
    with pytest.raises(StateError):
        backend.prefill(make_unit(backend, 2))


def test_interrupt_ends_a_generate_that_waits_for_a_decision_with_a_listen(
    vllm_server: LoopbackVllmServer,
) -> None:
    # Before the fix interrupt() only set a flag for the next call: the call in flight waited
    # unit_timeout_s and raised BackendTimeout (the node's close then gave up waiting for it).
    backend = make_backend(vllm_server.url, unit_timeout_s=30.0)
    call = _hung_generate(vllm_server, backend)
    backend.interrupt()
    call.join(5.0)
    assert call.error is None, call.error
    result = check_result(call.result)
    assert result.is_listen
    vllm_server.fault = None
    check_result(run(backend, 2))  # the next call tells the server (barge_in) and goes on
    wait_for(lambda: bool(sent(vllm_server, "barge_in")))
    backend.close()


def test_close_during_the_backoff_between_replicas_ends_prepare_at_once() -> None:
    backend = make_backend(f"ws://127.0.0.1:{free_port()}", retries=3, backoff_s=20.0)
    call = _Call(lambda: backend.prepare(PROMPT, ref_voice=voice()))
    time.sleep(0.3)  # the first connect is refused; prepare sleeps 20 s before the next round
    backend.close()
    call.join(5.0)
    assert isinstance(call.error, BackendUnavailable), call.error


def test_close_on_the_calling_thread_still_waits_for_session_closed(
    vllm_server: LoopbackVllmServer,
) -> None:
    vllm_server.teardown_s = 0.3  # the stage cleanup; the slot is free only after it
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    backend.close()
    assert vllm_server.closed_sessions == 1  # close() returned after session.closed
    assert vllm_server.live_sessions() == []
