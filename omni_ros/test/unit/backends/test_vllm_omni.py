"""``vllm_omni`` against ``LoopbackVllmServer``, a test double of a vllm-omni replica (127.0.0.1 only)."""

from __future__ import annotations

import base64
import socket
import threading
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
)
from unit.backends.contract import BackendContract, check_result, make_unit
from unit.backends.loopback_duplex_model import tone
from unit.backends.loopback_vllm_server import LoopbackVllmServer

PCM16_TOLERANCE = 1.0 / 16384
PROMPT = "You are a helpful robot."


@pytest.fixture
def vllm_server() -> Iterator[LoopbackVllmServer]:
    server = LoopbackVllmServer().start()
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


# ---------------------------------------------------------------------------------------- contract


class TestVllmOmniContract(BackendContract):
    @pytest.fixture
    def backend(
        self, vllm_server: LoopbackVllmServer, voice_wav: Path
    ) -> Iterator[VllmOmniBackend]:
        backend = make_backend(vllm_server.url, ref_audio_path=str(voice_wav))
        yield backend
        backend.close()


# ------------------------------------------------------------------------------------ the session


def test_session_update_opens_a_native_duplex_session_with_the_voice(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    (update,) = sent(vllm_server, "session.update")
    session = update["session"]
    assert session["instructions"] == PROMPT
    assert session["input_audio_format"] == "pcm16"
    assert session["output_audio_format"] == "pcm16"
    assert session["turn_detection"] is None
    assert session["extra_body"]["native_duplex"] is True
    assert session["ref_audio"].startswith("data:audio/wav;base64,")
    samples, rate = _wire.parse_wav(base64.b64decode(session["ref_audio"].split(",", 1)[1]))
    assert rate == 16000
    np.testing.assert_allclose(samples, voice(), atol=PCM16_TOLERANCE)
    assert backend.capabilities["chunk_period_ms"] == 1000
    assert backend.session_id.startswith("duplex-")
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


def test_a_session_without_reference_voice_is_a_config_error(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url)
    with pytest.raises(ConfigError, match="reference voice"):
        backend.prepare(PROMPT)
    assert vllm_server.refused == ["ref_audio_required"]
    backend.close()


def test_appends_carry_pcm16_at_16khz_with_the_frame_on_the_unit_closing_append(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    unit0 = make_unit(backend, 0, frames=2)
    backend.prefill(unit0)
    backend.generate()
    run(backend, 1)
    first, second = sent(vllm_server, "input_audio_buffer.append")
    assert first["sample_rate_hz"] == 16000
    assert first["input_audio_format"] == "pcm16"
    assert (first["duration_ms"], first["audio_end_ms"]) == (1000, 1000)
    assert (second["duration_ms"], second["audio_end_ms"]) == (1000, 2000)
    np.testing.assert_allclose(
        _wire.pcm16_to_float(base64.b64decode(first["audio"])), unit0.audio, atol=PCM16_TOLERANCE
    )
    assert len(first["video_frames"]) == 1
    assert "video_frames" not in second
    newest = unit0.frames[-1].rgb
    assert vllm_server.live_sessions()[0].frames == [(newest.shape[1], newest.shape[0])]
    backend.close()


@pytest.mark.parametrize("spelling", ["ga", "beta", "both"])
def test_speaking_units_return_24khz_audio_text_and_the_turn_end(spelling: str) -> None:
    server = LoopbackVllmServer(spelling=spelling).start()
    try:
        backend = make_backend(server.url)
        backend.prepare(PROMPT, ref_voice=voice())
        first, second, third = (run(backend, i, speech=i == 0) for i in range(3))
        assert (first.is_listen, second.is_listen, third.is_listen) == (False, False, True)
        assert first.text == "turn1.unit0 "
        assert second.text == "turn1.unit1 "
        for result in (first, second):
            assert result.audio is not None
            np.testing.assert_allclose(
                result.audio, tone(1), atol=PCM16_TOLERANCE
            )  # never counted twice
        assert (first.end_of_turn, second.end_of_turn) == (False, True)
        backend.close()
    finally:
        server.stop()


def test_delivered_audio_is_acknowledged_with_playback_ack_and_events_with_event_ack(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    for index in range(4):
        run(backend, index, speech=index == 0)
    acks = sent(vllm_server, "playback.ack")
    assert [(a["response_id"], a["played_ms"], a["committed_ms"]) for a in acks] == [
        ("resp_01", 1000, 1000),
        ("resp_01", 2000, 2000),
    ]
    event_acks = sent(vllm_server, "session.event_ack")
    assert len(event_acks) >= 3  # the fourth may still be in flight
    # The server read the first three acks before the fourth append: its journal is trimmed to them.
    session = vllm_server.live_sessions()[0]
    with vllm_server.lock:
        assert all(seq > event_acks[2]["server_event_seq"] for seq, _ in session.journal)
    backend.close()


def test_interrupt_sends_barge_in_and_cancel_and_the_next_unit_listens(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    assert not run(backend, 0, speech=True).is_listen
    thread = threading.Thread(target=backend.interrupt)
    thread.start()
    thread.join()
    after = run(backend, 1, speech=True)
    assert after.is_listen
    assert after.audio is None
    assert after.text == ""
    assert len(sent(vllm_server, "barge_in")) == 1
    assert [c["response_id"] for c in sent(vllm_server, "response.cancel")] == ["resp_01"]
    assert vllm_server.live_sessions()[0].barge_ins == 1
    run(backend, 2)  # the cancelled response.done was absorbed; units stay aligned
    backend.close()


def test_reset_closes_the_session_and_frees_its_slot(vllm_server: LoopbackVllmServer) -> None:
    backend = make_backend(vllm_server.url)
    backend.prepare(PROMPT, ref_voice=voice())
    first_id = backend.session_id
    backend.reset()
    assert vllm_server.live_sessions() == []
    backend.prepare(PROMPT, ref_voice=voice())
    assert backend.session_id != first_id
    backend.close()
    assert vllm_server.live_sessions() == []


# ------------------------------------------------------------------------------------ fleet faults


def test_a_full_replica_sends_the_robot_to_the_next_url() -> None:
    full = LoopbackVllmServer(max_sessions=1).start()
    spare = LoopbackVllmServer().start()
    holder = make_backend(full.url)
    robot = make_backend(full.url, spare.url)
    try:
        holder.prepare(PROMPT, ref_voice=voice())
        robot.prepare(PROMPT, ref_voice=voice())
        assert full.refused == ["duplex_session_busy"]
        assert robot.replica_url == spare.url
        assert len(spare.live_sessions()) == 1
        run(robot, 0)
    finally:
        holder.close()
        robot.close()
        full.stop()
        spare.stop()


def test_when_every_replica_is_full_prepare_backs_off_then_raises_unavailable() -> None:
    full = LoopbackVllmServer(max_sessions=1).start()
    holder = make_backend(full.url)
    robot = make_backend(full.url, retries=2)
    try:
        holder.prepare(PROMPT, ref_voice=voice())
        with pytest.raises(BackendUnavailable, match="duplex_session_busy"):
            robot.prepare(PROMPT, ref_voice=voice())
        assert full.refused == ["duplex_session_busy"] * 3  # first try + 2 retries
        holder.close()  # a slot frees up: the robot gets in on its next call
        run(robot, 0)
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
    resume = sent(vllm_server, "session.resume")
    assert len(resume) == 1
    assert resume[0]["session_id"] == session_id
    assert isinstance(resume[0]["last_received_server_event_seq"], int)
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
        assert (
            len(sent(server, "session.update")) == 2
        )  # re-prepared with the same prompt and voice
        assert sent(server, "session.update")[1]["session"]["instructions"] == PROMPT
        backend.close()
    finally:
        server.stop()


def test_a_replica_that_dies_mid_turn_is_reported_and_recovered_on_the_same_port() -> None:
    server = LoopbackVllmServer().start()
    port = server.port
    backend = make_backend(server.url, unit_timeout_s=2.0)
    try:
        backend.prepare(PROMPT, ref_voice=voice())
        server.fault = "hang"  # mid-unit when it dies
        backend.prefill(make_unit(backend, 0, speech=True))
        server.stop()
        with pytest.raises(BackendUnavailable):
            backend.generate()
        with pytest.raises(BackendUnavailable, match="no replica is reachable"):
            backend.prefill(make_unit(backend, 1))
        server = LoopbackVllmServer(port=port).start()
        assert not run(backend, 1, speech=True).is_listen
        assert len(server.live_sessions()) == 1
    finally:
        backend.close()
        server.stop()


def test_a_hanging_unit_raises_backend_timeout_and_the_next_unit_gets_a_fresh_session(
    vllm_server: LoopbackVllmServer,
) -> None:
    backend = make_backend(vllm_server.url, unit_timeout_s=0.3)
    backend.prepare(PROMPT, ref_voice=voice())
    old_id = backend.session_id
    vllm_server.fault = "hang"
    backend.prefill(make_unit(backend, 0))
    with pytest.raises(BackendTimeout):
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
    assert "vllm serve" in str(excinfo.value)
    backend.close()


# ------------------------------------------------------------------------------------------ config


def test_config_accepts_a_comma_separated_url_list_and_rejects_http_urls() -> None:
    config = VllmOmniConfig.from_mapping({"urls": "ws://a:1, ws://b:2/"})
    assert config.urls == ("ws://a:1", "ws://b:2")
    with pytest.raises(ConfigError, match="ws://"):
        VllmOmniConfig.from_mapping({"urls": ["http://a:1"]})
    with pytest.raises(ConfigError, match="unknown"):
        VllmOmniConfig.from_mapping({"url": "ws://a:1"})


def test_a_missing_ref_audio_file_is_a_config_error(tmp_path: Path) -> None:
    backend = make_backend("ws://127.0.0.1:9", ref_audio_path=str(tmp_path / "missing.wav"))
    with pytest.raises(ConfigError, match=r"missing\.wav"):
        backend.prepare(PROMPT)
    backend.close()
