"""``llamacpp_omni`` against loopback test doubles of llama.cpp-omni's two servers (127.0.0.1 only)."""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from omni_ros.backends import _wire
from omni_ros.backends.base import create_backend
from omni_ros.backends.llamacpp_omni import LlamaCppOmniBackend, LlamaCppOmniConfig
from omni_ros.core.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
)
from unit.backends.contract import BackendContract, check_result, make_unit
from unit.backends.loopback_duplex_model import tone
from unit.backends.loopback_llama_server import LoopbackLlamaServer, LoopbackLlamaWsServer

PCM16_TOLERANCE = 1.0 / 16384  # rounding to 16 bits and back


@pytest.fixture
def llama_server() -> Iterator[LoopbackLlamaServer]:
    server = LoopbackLlamaServer(tts_delay_s=0.005).start()
    yield server
    server.stop()


@pytest.fixture
def ws_server() -> Iterator[LoopbackLlamaWsServer]:
    server = LoopbackLlamaWsServer().start()
    yield server
    server.stop()


@pytest.fixture
def voice_wav(tmp_path: Path) -> Path:
    path = tmp_path / "voice.wav"
    _wire.write_wav(path, 0.1 * np.sin(np.arange(16000) / 7.0).astype(np.float32), 16000)
    return path


def http_backend(server: LoopbackLlamaServer, tmp_path: Path, **params: Any) -> LlamaCppOmniBackend:
    settings: dict[str, Any] = {
        "url": server.url,
        "work_dir": str(tmp_path / "shared"),
        "model_dir": "/models/minicpmo45-gguf",
        "health_timeout_s": 2.0,
        "retries": 1,
        "backoff_s": 0.01,
        "audio_wait_s": 2.0,
        **params,
    }
    backend = create_backend("llamacpp_omni", settings)
    assert isinstance(backend, LlamaCppOmniBackend)
    return backend


def ws_backend(server: LoopbackLlamaWsServer, **params: Any) -> LlamaCppOmniBackend:
    settings = {
        "url": server.url,
        "transport": "websocket",
        "retries": 1,
        "backoff_s": 0.01,
        **params,
    }
    return LlamaCppOmniBackend(LlamaCppOmniConfig.from_mapping(settings))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run(backend: LlamaCppOmniBackend, index: int, **kwargs: Any) -> Any:
    backend.prefill(make_unit(backend, index, **kwargs))
    return check_result(backend.generate())


# ---------------------------------------------------------------------------------------- contract


class TestLlamaCppHttpContract(BackendContract):
    @pytest.fixture
    def backend(
        self, llama_server: LoopbackLlamaServer, tmp_path: Path, voice_wav: Path
    ) -> Iterator[LlamaCppOmniBackend]:
        backend = http_backend(llama_server, tmp_path, voice_audio=str(voice_wav))
        yield backend
        backend.close()


class TestLlamaCppWebSocketContract(BackendContract):
    @pytest.fixture
    def backend(self, ws_server: LoopbackLlamaWsServer) -> Iterator[LlamaCppOmniBackend]:
        backend = ws_backend(ws_server)
        yield backend
        backend.close()


# --------------------------------------------------------------------------------- HTTP specifics


def test_omni_init_asks_for_duplex_omni_with_tts_and_the_voice(
    llama_server: LoopbackLlamaServer, tmp_path: Path, voice_wav: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, voice_audio=str(voice_wav))
    backend.prepare("Streaming Omni Conversation.")
    body = llama_server.init_body
    assert body["media_type"] == 2
    assert body["use_tts"] is True
    assert body["duplex_mode"] is True
    assert body["model_dir"] == "/models/minicpmo45-gguf"
    assert body["tts_bin_dir"] == "/models/minicpmo45-gguf/tts"
    assert body["token2wav_device"] == "gpu:0"
    assert body["output_dir"] == str(backend.work_dir / "out")
    assert body["voice_audio"] == str(voice_wav)
    assert [name for name, _ in llama_server.requests] == ["omni_init"]
    backend.close()


def test_first_user_unit_is_cnt_1_so_it_never_becomes_the_voice_reference(
    llama_server: LoopbackLlamaServer, tmp_path: Path, voice_wav: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, voice_audio=str(voice_wav))
    backend.prepare("Streaming Omni Conversation.")
    for index in range(3):
        run(backend, index, speech=index == 0)
    assert [p["cnt"] for p in llama_server.prefills] == [1, 2, 3]
    assert not any(p["became_voice_reference"] for p in llama_server.prefills)
    assert llama_server.system_prompt_source == f"voice_audio:{voice_wav}"
    assert llama_server.units_without_system_prompt == 0
    backend.close()


def test_the_loopback_server_turns_cnt0_audio_into_the_voice_reference(
    llama_server: LoopbackLlamaServer, tmp_path: Path, voice_wav: Path
) -> None:
    # The trap the backend avoids, shown on the double: no voice at init, then a cnt-0 prefill.
    with httpx.Client(trust_env=False) as client:
        init = client.post(
            f"{llama_server.url}/v1/stream/omni_init",
            json={"media_type": 2, "duplex_mode": True, "output_dir": str(tmp_path)},
        )
        assert init.status_code == 200
        user_audio = tmp_path / "user.wav"
        _wire.write_wav(user_audio, np.zeros(16560, np.float32), 16000)
        client.post(
            f"{llama_server.url}/v1/stream/prefill",
            json={"audio_path_prefix": str(user_audio), "cnt": 0},
        )
    assert llama_server.system_prompt_source == f"cnt0_audio:{user_audio}"
    assert llama_server.prefills[0]["became_voice_reference"] is True


def test_calls_before_omni_init_get_the_documented_400_error_body(
    llama_server: LoopbackLlamaServer,
) -> None:
    with httpx.Client(trust_env=False) as client:
        resp = client.post(f"{llama_server.url}/v1/stream/decode", json={"stream": True})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == 400
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("omni context not initialized")


def test_ref_voice_given_to_prepare_reaches_the_server_as_a_16khz_wav(
    llama_server: LoopbackLlamaServer, tmp_path: Path
) -> None:
    backend = http_backend(llama_server, tmp_path)
    voice = (0.2 * np.sin(np.arange(24000) / 11.0)).astype(np.float32)
    backend.prepare("Streaming Omni Conversation.", ref_voice=voice)
    path = Path(llama_server.init_body["voice_audio"])
    assert path.parent == backend.work_dir
    read = _wire.read_complete_wav(path)
    assert read is not None
    samples, rate = read
    assert rate == 16000
    np.testing.assert_allclose(samples, voice, atol=PCM16_TOLERANCE)
    backend.close()


def test_prepare_without_any_voice_is_a_config_error_and_sends_nothing(
    llama_server: LoopbackLlamaServer, tmp_path: Path
) -> None:
    backend = http_backend(llama_server, tmp_path)
    with pytest.raises(ConfigError, match="reference voice"):
        backend.prepare("Streaming Omni Conversation.")
    assert llama_server.requests == []
    backend.close()


def test_prefill_passes_file_paths_the_server_reads_and_cleans_them_up(
    llama_server: LoopbackLlamaServer, tmp_path: Path, voice_wav: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, voice_audio=str(voice_wav))
    backend.prepare("Streaming Omni Conversation.")
    run(backend, 0, frames=2)
    run(backend, 1)
    first, second = llama_server.prefills
    assert first["samples"] == 16560
    assert first["rate"] == 16000
    assert second["samples"] == 16000
    frame = make_unit(backend, 0, frames=2).frames[-1]
    assert first["image_size"] == (frame.rgb.shape[1], frame.rgb.shape[0])  # the newest frame
    assert second["image_size"] is None
    body = next(b for name, b in llama_server.requests if name == "prefill")
    assert Path(body["audio_path_prefix"]).parent == backend.work_dir / "in"
    assert list((backend.work_dir / "in").iterdir()) == []  # delete_consumed
    backend.close()


def test_speaking_units_return_the_servers_wavs_as_24khz_float32(
    llama_server: LoopbackLlamaServer, tmp_path: Path, voice_wav: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, voice_audio=str(voice_wav))
    backend.prepare("Streaming Omni Conversation.")
    first = run(backend, 0, speech=True)
    second = run(backend, 1)
    third = run(backend, 2)
    assert not first.is_listen
    assert not second.is_listen
    assert third.is_listen
    assert first.text == "turn1.unit0 "
    assert second.text == "turn1.unit1 "
    for result in (first, second):
        assert result.audio is not None
        np.testing.assert_allclose(result.audio, tone(1), atol=PCM16_TOLERANCE)
    # generation_done.flag after the turn's last WAV is what marks the turn end.
    assert (first.end_of_turn, second.end_of_turn) == (False, True)
    assert list((backend.work_dir / "out" / "tts_wav").iterdir()) == []
    backend.close()


def test_speech_written_after_the_decode_returned_is_waited_for(
    tmp_path: Path, voice_wav: Path
) -> None:
    server = LoopbackLlamaServer(tts_delay_s=0.3).start()  # token2wav slower than the SSE stream
    try:
        backend = http_backend(server, tmp_path, voice_audio=str(voice_wav))
        backend.prepare("Streaming Omni Conversation.")
        result = run(backend, 0, speech=True)
        assert result.audio is not None
        assert len(result.audio) == 24000
        backend.close()
    finally:
        server.stop()


def test_interrupt_breaks_generation_forces_listen_and_drops_queued_speech(
    tmp_path: Path, voice_wav: Path
) -> None:
    server = LoopbackLlamaServer(tts_delay_s=5.0).start()  # speech still pending at the barge-in
    try:
        backend = http_backend(server, tmp_path, voice_audio=str(voice_wav), audio_wait_s=0.0)
        backend.prepare("Streaming Omni Conversation.")
        spoke = run(backend, 0, speech=True)  # its WAV is still being synthesised
        assert not spoke.is_listen
        assert spoke.audio is None
        thread = threading.Thread(target=backend.interrupt)
        thread.start()
        thread.join()
        decodes_before = server.decodes
        after = run(backend, 1, speech=True)
        assert after.is_listen
        assert after.audio is None
        assert after.text == ""
        assert server.breaks == 1
        assert server.decodes == decodes_before  # forced listen: no decode for that unit
        assert [name for name, _ in server.requests][-2:] == ["break", "prefill"]
        backend.close()
    finally:
        server.stop()


def test_reset_clears_the_server_and_prepare_reuses_its_context(
    llama_server: LoopbackLlamaServer, tmp_path: Path, voice_wav: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, voice_audio=str(voice_wav))
    backend.prepare("Streaming Omni Conversation.")
    run(backend, 0)
    backend.reset()
    backend.prepare("Streaming Omni Conversation.")
    run(backend, 0)
    names = [name for name, _ in llama_server.requests]
    assert names.count("omni_init") == 1  # models are not reloaded
    assert names.count("reset") == 1
    assert names.count("update_session_config") == 1  # re-prefills the system prompt with the voice
    assert [p["cnt"] for p in llama_server.prefills] == [1, 1]
    backend.close()


def test_a_non_default_system_prompt_is_not_sent_over_http_and_warns(
    llama_server: LoopbackLlamaServer,
    tmp_path: Path,
    voice_wav: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = http_backend(llama_server, tmp_path, voice_audio=str(voice_wav))
    with caplog.at_level("WARNING"):
        backend.prepare("You are a warehouse robot.")
    assert "not sent" in caplog.text
    assert "warehouse" not in str(llama_server.requests)
    backend.close()


def test_health_503_while_loading_is_waited_for(
    llama_server: LoopbackLlamaServer, tmp_path: Path, voice_wav: Path
) -> None:
    llama_server.loading = True
    timer = threading.Timer(0.2, lambda: setattr(llama_server, "loading", False))
    timer.start()
    backend = http_backend(llama_server, tmp_path, voice_audio=str(voice_wav))
    backend.prepare("Streaming Omni Conversation.")
    timer.join()
    assert llama_server.initialized
    backend.close()


# ---------------------------------------------------------------------------------- HTTP faults


def test_server_down_raises_unavailable_naming_the_url_and_how_to_start_it(
    tmp_path: Path, voice_wav: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    backend = LlamaCppOmniBackend(
        LlamaCppOmniConfig(
            url=url,
            work_dir=str(tmp_path),
            voice_audio=str(voice_wav),
            health_timeout_s=0.2,
            retries=0,
        )
    )
    with pytest.raises(BackendUnavailable) as excinfo:
        backend.prepare("Streaming Omni Conversation.")
    assert url in str(excinfo.value)
    assert "llama-server" in str(excinfo.value)
    backend.close()


def test_decode_that_hangs_raises_backend_timeout_and_the_next_unit_recovers(
    llama_server: LoopbackLlamaServer, tmp_path: Path, voice_wav: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, voice_audio=str(voice_wav), decode_timeout_s=0.3)
    backend.prepare("Streaming Omni Conversation.")
    llama_server.fault = "hang"
    backend.prefill(make_unit(backend, 0))
    with pytest.raises(BackendTimeout):
        backend.generate()
    llama_server.fault = None
    llama_server.release()
    check_result(run(backend, 0))  # a new session: the first unit again
    backend.close()


def test_malformed_sse_frame_raises_backend_protocol_error(
    llama_server: LoopbackLlamaServer, tmp_path: Path, voice_wav: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, voice_audio=str(voice_wav))
    backend.prepare("Streaming Omni Conversation.")
    llama_server.fault = "malformed"
    backend.prefill(make_unit(backend, 0))
    with pytest.raises(BackendProtocolError, match="malformed JSON"):
        backend.generate()
    backend.close()


def test_connection_cut_mid_decode_raises_backend_unavailable(
    llama_server: LoopbackLlamaServer, tmp_path: Path, voice_wav: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, voice_audio=str(voice_wav))
    backend.prepare("Streaming Omni Conversation.")
    llama_server.fault = "drop"
    backend.prefill(make_unit(backend, 0, speech=True))
    with pytest.raises(BackendUnavailable):
        backend.generate()
    backend.close()


def test_server_error_500_on_prefill_is_a_backend_error(
    llama_server: LoopbackLlamaServer, tmp_path: Path, voice_wav: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, voice_audio=str(voice_wav))
    backend.prepare("Streaming Omni Conversation.")
    llama_server.fault = "error500"
    with pytest.raises(BackendError, match="stream_prefill failed"):
        backend.prefill(make_unit(backend, 0))
    backend.close()


def test_server_that_vanishes_mid_turn_is_reported_and_recovered_on_the_same_port(
    tmp_path: Path, voice_wav: Path
) -> None:
    server = LoopbackLlamaServer(tts_delay_s=0.005).start()
    port = server.port
    backend = http_backend(server, tmp_path, voice_audio=str(voice_wav), health_timeout_s=0.3)
    try:
        backend.prepare("Streaming Omni Conversation.")
        run(backend, 0, speech=True)
        backend.prefill(make_unit(backend, 1))
        server.stop()
        with pytest.raises(BackendUnavailable):
            backend.generate()
        with pytest.raises(BackendUnavailable):  # still down: a clear error, not a hang
            backend.prefill(make_unit(backend, 0))
        server = LoopbackLlamaServer(port=port, tts_delay_s=0.005).start()
        result = run(
            backend, 0, speech=True
        )  # re-opened: omni_init with the same voice, cnt from 1
        assert not result.is_listen
        assert server.init_body["voice_audio"] == str(voice_wav)
        assert [p["cnt"] for p in server.prefills] == [1]
    finally:
        backend.close()
        server.stop()


def test_server_restarted_between_units_loses_its_context_and_the_backend_reinitialises(
    tmp_path: Path, voice_wav: Path
) -> None:
    server = LoopbackLlamaServer(tts_delay_s=0.005).start()
    port = server.port
    backend = http_backend(server, tmp_path, voice_audio=str(voice_wav))
    try:
        backend.prepare("Streaming Omni Conversation.")
        run(backend, 0)
        server.stop()
        server = LoopbackLlamaServer(port=port).start()  # fresh process: no omni context
        with pytest.raises(BackendUnavailable, match="omni context"):
            backend.prefill(make_unit(backend, 1))
        run(backend, 0)
        assert [name for name, _ in server.requests][-3:] == ["omni_init", "prefill", "decode"]
    finally:
        backend.close()
        server.stop()


# ---------------------------------------------------------------------------- WebSocket specifics


def test_ws_session_init_carries_mode_prompt_and_voice_as_float32(
    ws_server: LoopbackLlamaWsServer,
) -> None:
    backend = ws_backend(ws_server)
    voice = (0.1 * np.cos(np.arange(8000) / 3.0)).astype(np.float32)
    backend.prepare("You are a warehouse robot.", ref_voice=voice)
    session = ws_server.sessions[0]
    assert session["mode"] == "full_duplex"
    assert session["system_prompt"] == "You are a warehouse robot."
    sent = np.frombuffer(base64.b64decode(session["voice"]["ref_audio"]), dtype="<f4")
    np.testing.assert_array_equal(sent, voice)
    backend.close()


def test_ws_units_carry_float32_audio_and_the_newest_frame_and_return_speech(
    ws_server: LoopbackLlamaWsServer,
) -> None:
    backend = ws_backend(ws_server)
    backend.prepare("Streaming Omni Conversation.")
    spoke = run(backend, 0, speech=True, frames=3)
    listened = run(backend, 1)
    assert ws_server.appends[0]["samples"] == 16560
    assert len(ws_server.appends[0]["frames"]) == 1
    assert not spoke.is_listen
    assert spoke.text == "turn1.unit0 "
    assert spoke.audio is not None
    np.testing.assert_array_equal(spoke.audio, tone(1))  # float32 travels exactly
    assert not listened.is_listen  # the double's turns last two units
    backend.close()


def test_ws_interrupt_sends_force_listen_and_the_unit_listens(
    ws_server: LoopbackLlamaWsServer,
) -> None:
    backend = ws_backend(ws_server)
    backend.prepare("Streaming Omni Conversation.")
    run(backend, 0, speech=True)
    backend.interrupt()
    after = run(backend, 1, speech=True)
    assert after.is_listen
    assert after.audio is None
    assert [a["force_listen"] for a in ws_server.appends] == [False, True]
    backend.close()


@pytest.mark.parametrize(
    ("fault", "error"),
    [("hang", BackendTimeout), ("malformed", BackendProtocolError), ("drop", BackendUnavailable)],
)
def test_ws_faults_raise_their_error_type_and_the_next_unit_recovers(
    ws_server: LoopbackLlamaWsServer, fault: str, error: type[Exception]
) -> None:
    backend = ws_backend(ws_server, decode_timeout_s=0.3)
    backend.prepare("Streaming Omni Conversation.")
    ws_server.fault = fault
    backend.prefill(make_unit(backend, 0, speech=True))
    with pytest.raises(error):
        backend.generate()
    ws_server.fault = None
    ws_server.release()
    if fault == "malformed":
        backend.reset()
        backend.prepare("Streaming Omni Conversation.")
    check_result(run(backend, 0))
    backend.close()


def test_ws_server_that_vanishes_mid_turn_is_reported_and_recovered_on_the_same_port() -> None:
    server = LoopbackLlamaWsServer().start()
    port = server.port
    backend = ws_backend(server, decode_timeout_s=1.0)
    try:
        backend.prepare("Streaming Omni Conversation.")
        server.fault = "hang"  # the server is mid-decode when it dies
        backend.prefill(make_unit(backend, 0, speech=True))
        server.stop()
        with pytest.raises(BackendUnavailable):
            backend.generate()
        server = LoopbackLlamaWsServer(port=port).start()
        assert not run(backend, 0, speech=True).is_listen
        assert len(server.sessions) == 1
    finally:
        backend.close()
        server.stop()


def test_ws_server_down_raises_unavailable_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    backend = LlamaCppOmniBackend(LlamaCppOmniConfig(url=url, transport="websocket", retries=0))
    with pytest.raises(BackendUnavailable, match="/backend"):
        backend.prepare("Streaming Omni Conversation.")
    backend.close()


# ------------------------------------------------------------------------------------------ config


def test_config_rejects_an_unknown_transport_and_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="transport"):
        LlamaCppOmniConfig.from_mapping({"transport": "grpc"})
    with pytest.raises(ConfigError, match="unknown"):
        LlamaCppOmniConfig.from_mapping({"hostname": "x"})
    with pytest.raises(ConfigError):
        LlamaCppOmniConfig.from_mapping({"decode_timeout_s": 0})


def test_config_derives_http_and_ws_urls_from_one_base() -> None:
    config = LlamaCppOmniConfig(url="ws://10.0.0.5:9000/", transport="websocket")
    assert config.http_base == "http://10.0.0.5:9000"
    assert config.ws_url == "ws://10.0.0.5:9000/backend"
