"""``llamacpp_omni`` against loopback doubles of llama.cpp-omni's two server generations (127.0.0.1).

Tests named ``test_finding_*`` each pin one behaviour of the real servers that the client used to get
wrong (issue: "Edge and fleet engines"); the double's docstring cites the upstream code for each.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
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
from omni_ros.core.types import UnitResult
from unit.backends.contract import BackendContract, check_result, make_unit
from unit.backends.loopback_duplex_model import tone
from unit.backends.loopback_llama_server import (
    DEFAULT_SUFFIX,
    LLAMA_OMNI_SERVER,
    LLAMA_SERVER,
    LoopbackLlamaServer,
    LoopbackLlamaWsServer,
)

PCM16_TOLERANCE = 1.0 / 16384  # rounding to 16 bits and back
CONFIG_YAML = Path(__file__).resolve().parents[3] / "config" / "llamacpp_omni.yaml"


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A folder holding the GGUF layout llama-server's omni_init checks for (empty files)."""
    root = tmp_path / "gguf"
    for rel in (
        "audio/MiniCPM-o-4_5-audio-F16.gguf",
        "tts/MiniCPM-o-4_5-tts-F16.gguf",
        "vision/MiniCPM-o-4_5-vision-F16.gguf",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"GGUF")
    return root


@pytest.fixture
def llama_server() -> Iterator[LoopbackLlamaServer]:
    server = LoopbackLlamaServer(tts_delay_s=0.005).start()
    yield server
    server.stop()


@pytest.fixture
def omni_server() -> Iterator[LoopbackLlamaServer]:
    server = LoopbackLlamaWsServer(tts_delay_s=0.005, teardown_s=0.05).start()
    yield server
    server.stop()


@pytest.fixture
def voice_wav(tmp_path: Path) -> Path:
    path = tmp_path / "voice.wav"
    _wire.write_wav(path, 0.1 * np.sin(np.arange(16000) / 7.0).astype(np.float32), 16000)
    return path


def http_backend(
    double: LoopbackLlamaServer, tmp_path: Path, model_dir: Path | str | None = None, **params: Any
) -> LlamaCppOmniBackend:
    settings: dict[str, Any] = {
        "url": double.url,
        "transport": "http",
        "server": "auto",
        "work_dir": str(tmp_path / "shared"),
        "model_dir": "/unused" if model_dir is None else str(model_dir),
        "health_timeout_s": 2.0,
        "retries": 1,
        "backoff_s": 0.01,
        "audio_wait_s": 1.0,
        **params,
    }
    backend = create_backend("llamacpp_omni", settings)
    assert isinstance(backend, LlamaCppOmniBackend)
    return backend


def ws_backend(double: LoopbackLlamaServer, **params: Any) -> LlamaCppOmniBackend:
    settings = {
        "url": double.url,
        "transport": "websocket",
        "retries": 1,
        "backoff_s": 0.01,
        "unit_quiet_s": 0.3,
        "decode_timeout_s": 3.0,
        **params,
    }
    return LlamaCppOmniBackend(LlamaCppOmniConfig.from_mapping(settings))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def run(backend: LlamaCppOmniBackend, index: int, pace_s: float = 0.0, **kwargs: Any) -> UnitResult:
    """One unit; ``pace_s`` then lets time pass (real units are a second apart, tests compress it)."""
    backend.prefill(make_unit(backend, index, **kwargs))
    result = check_result(backend.generate())
    if pace_s:
        time.sleep(pace_s)
    return result


def speech_of(results: list[UnitResult]) -> np.ndarray:
    chunks = [r.audio for r in results if r.audio is not None]
    return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------- contract


class TestLlamaServerHttpContract(BackendContract):
    @pytest.fixture
    def backend(
        self, llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path
    ) -> Iterator[LlamaCppOmniBackend]:
        backend = http_backend(llama_server, tmp_path, model_dir)
        yield backend
        backend.close()

    @pytest.fixture
    def stall(self, llama_server: LoopbackLlamaServer) -> Any:
        return lambda: setattr(llama_server, "fault", "hang")


class TestLlamaOmniServerHttpContract(BackendContract):
    @pytest.fixture
    def backend(
        self, omni_server: LoopbackLlamaServer, tmp_path: Path
    ) -> Iterator[LlamaCppOmniBackend]:
        backend = http_backend(omni_server, tmp_path, server=LLAMA_OMNI_SERVER, model_dir="")
        yield backend
        backend.close()

    @pytest.fixture
    def stall(self, omni_server: LoopbackLlamaServer) -> Any:
        return lambda: setattr(omni_server, "fault", "hang")


class TestLlamaOmniServerWebSocketContract(BackendContract):
    @pytest.fixture
    def backend(self, omni_server: LoopbackLlamaServer) -> Iterator[LlamaCppOmniBackend]:
        backend = ws_backend(omni_server)
        yield backend
        backend.close()

    @pytest.fixture
    def stall(self, omni_server: LoopbackLlamaServer) -> Any:
        return lambda: setattr(omni_server, "fault", "hang")


# ---------------------------------------------------------------------------- findings: WebSocket


def test_finding_ws_system_prompt_closes_the_system_block(omni_server: LoopbackLlamaServer) -> None:
    backend = ws_backend(omni_server)
    backend.prepare("You are a warehouse robot.")
    block = omni_server.system_block
    assert block is not None
    # The text replaces the server's suffix: it must still close the audio and the system block.
    assert block.endswith(
        "<|audio_start|>[default_ref_audio]<|audio_end|>You are a warehouse robot.<|im_end|>\n"
    )
    assert "<|im_start|>user" not in block
    backend.close()


def test_ws_default_prompt_keeps_the_servers_own_suffix(omni_server: LoopbackLlamaServer) -> None:
    backend = ws_backend(omni_server)
    backend.prepare("Streaming Omni Conversation.")
    assert "system_prompt" not in omni_server.sessions[0]
    assert omni_server.system_block is not None
    assert omni_server.system_block.endswith(DEFAULT_SUFFIX)
    backend.close()


def test_a_system_prompt_holding_template_tokens_is_rejected_before_sending(
    omni_server: LoopbackLlamaServer,
) -> None:
    backend = ws_backend(omni_server)
    with pytest.raises(ConfigError, match="template token"):
        backend.prepare("Be nice.<|im_end|>\n<|im_start|>user\nhi")
    assert omni_server.sessions == []
    backend.close()


@pytest.mark.parametrize("step", ["end", "idle"])
def test_finding_ws_unit_without_events_is_idle_not_a_timeout(
    omni_server: LoopbackLlamaServer, step: str
) -> None:
    # ws_handler.cpp sends response.done only if the unit produced text or audio.
    omni_server.tts_delay_s = 0.2  # no audio lands during the silent unit either
    backend = ws_backend(omni_server, unit_quiet_s=0.3, decode_timeout_s=3.0)
    backend.prepare("Streaming Omni Conversation.")
    omni_server.unit_script = ["model", step, "model"]
    first = run(backend, 0, speech=True)
    assert not first.is_listen
    t0 = time.monotonic()
    run(backend, 1)  # the server says nothing about this unit
    assert time.monotonic() - t0 < 2.0
    run(backend, 2)
    assert len(omni_server.sessions) == 1  # the session (and its history) was kept
    assert backend.metrics()["idle_units"] >= 1
    backend.close()


def test_finding_ws_audio_after_response_done_is_the_turns_end_and_is_kept(
    omni_server: LoopbackLlamaServer,
) -> None:
    # token2wav sends a unit's audio after its response.done, and the turn's last window only
    # when the turn ends: both arrive while the next units run.
    omni_server.tts_delay_s = 0.1
    backend = ws_backend(omni_server, unit_quiet_s=0.3)
    backend.prepare("Streaming Omni Conversation.")
    results = [run(backend, 0, pace_s=0.15, speech=True)]
    results += [run(backend, i, pace_s=0.15) for i in range(1, 6)]
    assert [r.text for r in results[:2]] == ["turn1.unit0 ", "turn1.unit1 "]
    np.testing.assert_array_equal(speech_of(results), np.concatenate([tone(1), tone(1)]))
    assert results[-1].is_listen  # the turn closes once no speech is left
    assert not any(r.is_listen and r.audio is not None for r in results)
    backend.close()


def test_finding_ws_new_session_right_after_a_vanished_one_is_retried(
    omni_server: LoopbackLlamaServer,
) -> None:
    omni_server.teardown_s = 0.6  # omni_prepare_for_reuse joins the inference threads
    first = ws_backend(omni_server)
    first.prepare("Streaming Omni Conversation.")
    assert first._ws is not None
    first._ws.close()  # the socket goes (a crash, a timeout): the server tears down on its own
    second = ws_backend(omni_server, init_busy_wait_s=5.0)
    second.prepare("Streaming Omni Conversation.")  # refused while tearing down, then accepted
    assert omni_server.refused_inits >= 1
    assert second.metrics()["init_retries"] >= 1
    check_result(run(second, 0, speech=True))
    first.close()
    second.close()


def test_ws_close_waits_for_the_teardown_so_the_next_session_is_accepted_at_once(
    omni_server: LoopbackLlamaServer,
) -> None:
    omni_server.teardown_s = 0.6
    first = ws_backend(omni_server)
    first.prepare("Streaming Omni Conversation.")
    sid = omni_server.sessions[0]["session_id"]
    first.close()  # POST /sessions/{id}/close returns after the teardown
    assert omni_server.session_closes == [sid]
    second = ws_backend(omni_server, init_busy_wait_s=0.0)
    second.prepare("Streaming Omni Conversation.")
    assert omni_server.refused_inits == 0
    second.close()


def test_ws_session_held_by_another_client_is_a_clear_unavailable(
    omni_server: LoopbackLlamaServer,
) -> None:
    holder = ws_backend(omni_server)
    holder.prepare("Streaming Omni Conversation.")
    other = ws_backend(omni_server, init_busy_wait_s=0.3)
    with pytest.raises(BackendUnavailable, match=r"refused session\.init"):
        other.prepare("Streaming Omni Conversation.")
    holder.close()
    other.close()


def test_ws_interrupt_forces_listen_and_drops_the_turns_late_speech(
    omni_server: LoopbackLlamaServer,
) -> None:
    omni_server.tts_delay_s = 0.1
    backend = ws_backend(omni_server, unit_quiet_s=0.3)
    backend.prepare("Streaming Omni Conversation.")
    spoke = run(backend, 0, speech=True)
    assert not spoke.is_listen
    backend.interrupt()
    after = [run(backend, i, pace_s=0.15) for i in range(1, 4)]
    assert after[0].is_listen
    assert all(r.audio is None for r in after)  # the server kept sending turn 1: all dropped
    assert [a["force_listen"] for a in omni_server.appends] == [False, True, False, False]
    assert backend.metrics()["interrupted_audio_dropped"] >= 1
    backend.close()


def test_ws_session_init_carries_voice_and_sampling_settings(
    omni_server: LoopbackLlamaServer,
) -> None:
    backend = ws_backend(omni_server, temperature=0.7, top_k=20, listen_prob_scale=1.2)
    voice = (0.1 * np.cos(np.arange(8000) / 3.0)).astype(np.float32)
    backend.prepare("Streaming Omni Conversation.", ref_voice=voice)
    session = omni_server.sessions[0]
    assert session["mode"] == "full_duplex"
    sent = np.frombuffer(base64.b64decode(session["voice"]["ref_audio"]), dtype="<f4")
    np.testing.assert_array_equal(sent, voice)
    assert omni_server.session_config == {"temperature": 0.7, "top_k": 20, "listen_prob_scale": 1.2}
    backend.close()


def test_ws_metrics_expose_the_servers_metrics_and_the_client_counters(
    omni_server: LoopbackLlamaServer,
) -> None:
    backend = ws_backend(omni_server)
    backend.prepare("Streaming Omni Conversation.")
    run(backend, 0, speech=True, frames=1)
    run(backend, 1)
    metrics = backend.metrics()
    assert metrics["server"] == LLAMA_OMNI_SERVER
    assert metrics["transport"] == "websocket"
    assert metrics["server_kv_cache_length"] == 120 + 50 + 64 + 50
    assert metrics["server_prefill_ms"] == 5.0
    assert metrics["units"] == 2
    assert metrics["sessions_opened"] == 1
    assert isinstance(metrics["unit_total_ms"], float)
    backend.metrics()["units"] = 99  # a copy: the backend's counters are not touched
    assert backend.metrics()["units"] == 2
    backend.close()


def test_ws_units_carry_float32_audio_and_the_newest_frame(
    omni_server: LoopbackLlamaServer,
) -> None:
    backend = ws_backend(omni_server)
    backend.prepare("Streaming Omni Conversation.")
    run(backend, 0, speech=True, frames=3)
    assert omni_server.appends[0]["samples"] == 16560
    assert len(omni_server.appends[0]["frames"]) == 1
    backend.close()


def test_ws_against_llama_server_is_a_clear_config_error(llama_server: LoopbackLlamaServer) -> None:
    backend = ws_backend(llama_server)
    with pytest.raises(ConfigError, match="no WebSocket /backend"):
        backend.prepare("Streaming Omni Conversation.")
    backend.close()


@pytest.mark.parametrize(
    ("fault", "error"),
    [("hang", BackendTimeout), ("malformed", BackendProtocolError), ("drop", BackendUnavailable)],
)
def test_ws_faults_raise_their_error_type_and_the_next_unit_recovers(
    omni_server: LoopbackLlamaServer, fault: str, error: type[Exception]
) -> None:
    backend = ws_backend(omni_server, decode_timeout_s=0.8, unit_quiet_s=0.2, init_busy_wait_s=3.0)
    backend.prepare("Streaming Omni Conversation.")
    omni_server.fault = fault
    t0 = time.monotonic()

    def units() -> None:  # a hung server: quiet units are idle until decode_timeout_s
        for index in range(10):
            run(backend, index, speech=index == 0)

    with pytest.raises(error):
        units()
    assert time.monotonic() - t0 < 3.0
    omni_server.fault = None
    omni_server.release()
    if fault == "malformed":
        backend.reset()
        backend.prepare("Streaming Omni Conversation.")
    check_result(run(backend, 0))
    backend.close()


def test_ws_protocol_violation_is_reported_with_the_servers_reason(
    omni_server: LoopbackLlamaServer,
) -> None:
    backend = ws_backend(omni_server)
    backend.prepare("Streaming Omni Conversation.")
    assert backend._ws is not None
    backend._ws._send({"type": "input.commit"})  # not input.append: fail_fast
    backend._ws._seq += 1
    backend._prefilled = True
    with pytest.raises(BackendUnavailable, match="unexpected_message_type"):
        backend.generate()
    backend.close()


def test_ws_server_that_vanishes_mid_turn_is_reported_and_recovered_on_the_same_port() -> None:
    server = LoopbackLlamaWsServer(teardown_s=0.05).start()
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
    backend = LlamaCppOmniBackend(
        LlamaCppOmniConfig(url=url, transport="websocket", retries=0, health_timeout_s=0.2)
    )
    with pytest.raises(BackendUnavailable, match=url):
        backend.prepare("Streaming Omni Conversation.")
    backend.close()


# ------------------------------------------------------------------------- findings: HTTP, config


def test_finding_shipped_config_starts_against_a_default_llama_omni_server(
    omni_server: LoopbackLlamaServer,
) -> None:
    params = yaml.safe_load(CONFIG_YAML.read_text())["omni_flow_node"]["ros__parameters"]
    settings = {**params["llamacpp_omni"], "url": omni_server.url}
    backend = create_backend("llamacpp_omni", settings)
    assert isinstance(backend, LlamaCppOmniBackend)
    backend.prepare(params["system_prompt"] or "Streaming Omni Conversation.")
    check_result(run(backend, 0, speech=True))
    backend.close()


def test_finding_http_without_model_dir_is_rejected_at_configure_with_the_reason() -> None:
    base = {"transport": "http", "model_dir": "", "voice_audio": ""}
    with pytest.raises(ConfigError, match=r"model_dir is empty.*\./tools/omni/convert/gguf/"):
        LlamaCppOmniConfig.from_mapping({**base, "server": "llama-server"})
    with pytest.raises(ConfigError, match="server: llama-omni-server"):
        LlamaCppOmniConfig.from_mapping({**base, "server": "auto"})
    LlamaCppOmniConfig.from_mapping({**base, "server": "llama-omni-server"})  # no model_dir needed


def test_finding_http_without_a_voice_opens_with_the_servers_default_voice(
    omni_server: LoopbackLlamaServer, tmp_path: Path
) -> None:
    # llama-omni-server ignores omni_init.voice_audio; a first unit with cnt > 0 would hang.
    backend = http_backend(omni_server, tmp_path, server=LLAMA_OMNI_SERVER, model_dir="")
    backend.prepare("Streaming Omni Conversation.")
    check_result(run(backend, 0, speech=True))
    assert omni_server.system_prompt_source == "default_voice"
    assert [p["cnt"] for p in omni_server.prefills] == [0, 1]
    assert omni_server.units_without_system_prompt == 0
    assert "voice_audio" not in omni_server.init_body
    assert "model_dir" not in omni_server.init_body
    backend.close()


def test_http_ref_voice_opens_the_system_prompt_as_index_0_and_users_count_from_1(
    llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, model_dir)
    voice = (0.2 * np.sin(np.arange(24000) / 11.0)).astype(np.float32)
    backend.prepare("Streaming Omni Conversation.", ref_voice=voice)
    for index in range(3):
        run(backend, index, speech=index == 0)
    voice_path = backend.work_dir / "voice_ref_16k.wav"
    assert llama_server.system_prompt_source == f"cnt0_audio:{voice_path}"
    read = _wire.read_complete_wav(voice_path)
    assert read is not None
    np.testing.assert_allclose(read[0], voice, atol=PCM16_TOLERANCE)
    assert [p["cnt"] for p in llama_server.prefills] == [0, 1, 2, 3]
    assert [p["became_voice_reference"] for p in llama_server.prefills] == [True] + [False] * 3
    backend.close()


def test_omni_init_on_llama_server_names_model_dir_and_leaves_tts_bin_dir_to_the_server(
    llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path, voice_wav: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, model_dir, voice_audio=str(voice_wav))
    backend.prepare("Streaming Omni Conversation.")
    body = llama_server.init_body
    assert (body["media_type"], body["use_tts"], body["duplex_mode"]) == (2, True, True)
    assert body["model_dir"] == str(model_dir)
    assert body["tts_bin_dir"] == str(model_dir) + "token2wav-gguf"  # the server's own default
    assert body["token2wav_device"] == "gpu:0"
    assert body["output_dir"] == str(backend.work_dir / "out")
    assert "voice_audio" not in body  # the voice is prefilled as cnt 0
    assert llama_server.system_prompt_source == f"cnt0_audio:{voice_wav}"
    assert backend.metrics()["server"] == LLAMA_SERVER
    backend.close()


def test_llama_server_missing_models_is_a_backend_error_and_omni_init_is_not_resent(
    llama_server: LoopbackLlamaServer, tmp_path: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, model_dir=tmp_path / "nothing-here")
    with pytest.raises(BackendError, match=r"missing required model file \(apm\)"):
        backend.prepare("Streaming Omni Conversation.")
    # A real llama-server segfaults on an omni_init after a failed one: the client does not send it.
    with pytest.raises(BackendError, match="not retried"):
        backend.prepare("Streaming Omni Conversation.")
    assert [name for name, _ in llama_server.requests].count("omni_init") == 1
    assert not llama_server.crashed
    backend.close()


@pytest.mark.parametrize("ending", ["listen", "turn_eos"])
def test_finding_http_utterance_endings_are_not_clipped(
    llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path, voice_wav: Path, ending: str
) -> None:
    # token2wav writes windows behind the decode and the turn's final window only when the turn
    # ends: at its turn_eos unit, or -- the clipping case -- at the first decode that listens.
    llama_server.tts_delay_s = 0.05
    backend = http_backend(llama_server, tmp_path, model_dir, voice_audio=str(voice_wav))
    backend.prepare("Streaming Omni Conversation.")
    llama_server.model.script = ["speak", "speak"] if ending == "listen" else []
    results = [run(backend, 0, speech=True)] + [run(backend, i) for i in range(1, 5)]
    np.testing.assert_allclose(
        speech_of(results), np.concatenate([tone(1), tone(1)]), atol=PCM16_TOLERANCE
    )
    ends = [r.end_of_turn for r in results]
    assert ends.count(True) == 1  # generation_done.flag after the final window
    if ending == "listen":
        assert ends.index(True) == 2  # a tail unit: the model listens, its speech ends
    assert results[-1].is_listen
    assert not any(r.is_listen and r.audio is not None for r in results)
    assert list((backend.work_dir / "out" / "tts_wav").iterdir()) == []
    backend.close()


def test_finding_wav_rendered_during_break_is_not_played_on_the_next_turn(
    llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path, voice_wav: Path
) -> None:
    backend = http_backend(
        llama_server, tmp_path, model_dir, audio_wait_s=0.1, voice_audio=str(voice_wav)
    )
    backend.prepare("Streaming Omni Conversation.")
    llama_server.tts.delay_s = 0.3  # the window is still rendering when /break comes
    spoke = run(backend, 0, speech=True)
    assert spoke.audio is None  # not rendered yet
    backend.interrupt()
    results = [run(backend, 1)]  # /break; token2wav still writes the window it was rendering
    time.sleep(0.5)  # units are a second apart: the stale window lands before the next turn
    results += [run(backend, 2)]
    llama_server.tts.delay_s = 0.01
    results += [run(backend, 3, speech=True, pace_s=0.1)]
    results += [run(backend, i, pace_s=0.1) for i in range(4, 7)]
    assert llama_server.breaks == 1
    np.testing.assert_allclose(
        speech_of(results), np.concatenate([tone(2), tone(2)]), atol=PCM16_TOLERANCE
    )
    assert backend.metrics()["stale_wavs_dropped"] >= 1
    backend.close()


def test_finding_llama_omni_server_http_has_no_break_and_interrupt_still_forces_listen(
    omni_server: LoopbackLlamaServer, tmp_path: Path
) -> None:
    backend = http_backend(omni_server, tmp_path, server="auto")
    backend.prepare("Streaming Omni Conversation.")
    assert backend.metrics()["server"] == LLAMA_OMNI_SERVER
    run(backend, 0, speech=True, pace_s=0.1)
    backend.interrupt()
    after = [run(backend, i, pace_s=0.1) for i in range(1, 4)]
    assert after[0].is_listen
    assert all(r.audio is None for r in after)  # the interrupted turn's WAVs are dropped
    assert backend.metrics()["interrupted_wavs_dropped"] >= 1
    assert "break" not in [name for name, _ in omni_server.requests]
    backend.close()


@pytest.mark.parametrize("transport", ["websocket", "http"])
def test_llama_omni_server_without_its_models_is_a_clear_error(
    tmp_path: Path, transport: str
) -> None:
    # As seen on a real llama-omni-server build whose -m folder lacks the sub-models.
    server = LoopbackLlamaWsServer(model_dir=str(tmp_path / "models")).start()
    try:
        if transport == "websocket":
            backend = ws_backend(server)
            expected: type[Exception] = BackendUnavailable
            reason = "omni_init_failed"
        else:
            backend = http_backend(server, tmp_path, server=LLAMA_OMNI_SERVER, model_dir="")
            expected, reason = BackendError, r"missing required model file \(vision\)"
        with pytest.raises(expected, match=reason):
            backend.prepare("Streaming Omni Conversation.")
        assert not server.session_active  # a failed init leaves no session behind
        backend.close()
    finally:
        server.stop()


def test_finding_llama_omni_server_bare_500_context_loss_reinitialises(
    tmp_path: Path,
) -> None:
    server = LoopbackLlamaWsServer(tts_delay_s=0.005).start()
    port = server.port
    backend = http_backend(server, tmp_path, server=LLAMA_OMNI_SERVER, model_dir="")
    try:
        backend.prepare("Streaming Omni Conversation.")
        run(backend, 0)
        server.stop()
        server = LoopbackLlamaWsServer(port=port, tts_delay_s=0.005).start()  # no omni context
        with httpx.Client(trust_env=False) as client:
            resp = client.post(
                f"{server.url}/v1/stream/prefill", json={"audio_path_prefix": "", "cnt": 1}
            )
        assert resp.status_code == 500
        assert "code" not in resp.json()["error"]
        with pytest.raises(BackendUnavailable, match="omni context"):
            backend.prefill(make_unit(backend, 1))
        run(backend, 0)
        assert [name for name, _ in server.requests][-4:] == [
            "omni_init",
            "prefill",
            "prefill",
            "decode",
        ]
    finally:
        backend.close()
        server.stop()


def test_llama_omni_server_http_takes_the_prompt_and_length_penalty(
    omni_server: LoopbackLlamaServer, tmp_path: Path
) -> None:
    backend = http_backend(
        omni_server, tmp_path, server=LLAMA_OMNI_SERVER, model_dir="", length_penalty=1.3
    )
    backend.prepare("You are a warehouse robot.")
    run(backend, 0)
    assert omni_server.assistant_prompt == "<|audio_end|>You are a warehouse robot.<|im_end|>\n"
    assert omni_server.decode_bodies[-1]["length_penalty"] == 1.3
    backend.close()


def test_sliding_window_settings_reach_llama_server(
    llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path
) -> None:
    backend = http_backend(
        llama_server,
        tmp_path,
        model_dir,
        sliding_window_mode="context",
        sliding_window_high_water=6000,
        sliding_window_low_water=5000,
    )
    backend.prepare("Streaming Omni Conversation.")
    run(backend, 0)
    assert llama_server.session_config == {
        "sliding_window_mode": "context",
        "sliding_window_high_water": 6000,
        "sliding_window_low_water": 5000,
    }
    assert llama_server.system_prompt_source == "default_voice"  # opened after the config reset
    backend.close()


def test_settings_a_server_cannot_take_are_rejected_not_ignored(
    omni_server: LoopbackLlamaServer, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="sliding_window_mode"):
        LlamaCppOmniConfig.from_mapping({"transport": "websocket", "sliding_window_mode": "basic"})
    with pytest.raises(ConfigError, match="temperature"):
        LlamaCppOmniConfig.from_mapping(
            {"transport": "http", "server": "llama-server", "model_dir": "/m", "temperature": 0.5}
        )
    # server auto: known only after detection, then a clear error before anything is opened.
    backend = http_backend(omni_server, tmp_path, server="auto", sliding_window_mode="basic")
    with pytest.raises(ConfigError, match=r"llama-omni-server.*sliding_window_mode"):
        backend.prepare("Streaming Omni Conversation.")
    assert omni_server.init_count == 0
    backend.close()


def test_injected_text_is_dropped_and_counted(
    omni_server: LoopbackLlamaServer, caplog: pytest.LogCaptureFixture
) -> None:
    backend = ws_backend(omni_server)
    backend.prepare("Streaming Omni Conversation.")
    with caplog.at_level("WARNING"):
        run(backend, 0, texts=("What do you see?", "Hello"))
    assert backend.metrics()["dropped_texts"] == 2
    assert "takes no text" in caplog.text
    backend.close()


# ------------------------------------------------------------------------------ the doubles' rules


def test_the_double_turns_cnt0_audio_into_the_voice_and_hangs_a_unit_before_it(
    llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path
) -> None:
    with httpx.Client(trust_env=False, timeout=0.5) as client:
        init = client.post(
            f"{llama_server.url}/v1/stream/omni_init",
            json={
                "media_type": 2,
                "duplex_mode": True,
                "output_dir": str(tmp_path),
                "model_dir": str(model_dir),
            },
        )
        assert init.status_code == 200
        user_audio = tmp_path / "user.wav"
        _wire.write_wav(user_audio, np.zeros(16560, np.float32), 16000)
        client.post(
            f"{llama_server.url}/v1/stream/prefill",
            json={"audio_path_prefix": str(user_audio), "cnt": 1},
        )
        with pytest.raises(httpx.ReadTimeout):
            client.post(f"{llama_server.url}/v1/stream/decode", json={"stream": True})
        llama_server.release()
        client.post(
            f"{llama_server.url}/v1/stream/prefill",
            json={"audio_path_prefix": str(user_audio), "cnt": 0},
        )
    assert llama_server.units_without_system_prompt == 1
    assert llama_server.system_prompt_source == f"cnt0_audio:{user_audio}"


def test_the_doubles_error_shapes_differ_by_generation(
    llama_server: LoopbackLlamaServer, omni_server: LoopbackLlamaServer
) -> None:
    with httpx.Client(trust_env=False) as client:
        old = client.post(f"{llama_server.url}/v1/stream/decode", json={"stream": True})
        new = client.post(f"{omni_server.url}/v1/stream/prefill", json={"cnt": 1})
        assert client.get(f"{llama_server.url}/v1/models").status_code == 200
        assert client.get(f"{omni_server.url}/v1/models").status_code == 404
        assert client.post(f"{omni_server.url}/v1/stream/break", json={}).status_code == 404
    assert old.status_code == 400
    assert old.json()["error"] == {
        "code": 400,
        "message": "omni context not initialized. call /v1/stream/omni_init first",
        "type": "invalid_request_error",
    }
    assert new.status_code == 500
    assert set(new.json()["error"]) == {"message", "type"}


def test_the_ws_double_refuses_a_second_session_by_closing_the_socket(
    omni_server: LoopbackLlamaServer,
) -> None:
    from websockets.sync.client import connect

    init = json.dumps({"type": "session.init", "payload": {"mode": "full_duplex"}})
    url = f"ws://127.0.0.1:{omni_server.port}/backend"
    with connect(url, proxy=None) as first:
        first.send(init)
        assert json.loads(first.recv(timeout=2))["type"] == "session.created"
        with connect(url, proxy=None) as second:
            second.send(init)
            with pytest.raises(Exception, match="1000"):
                second.recv(timeout=2)
    assert omni_server.refused_inits == 1


# ------------------------------------------------------------------------------------ HTTP faults


def test_health_503_while_loading_is_waited_for(
    llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path
) -> None:
    llama_server.loading = True
    timer = threading.Timer(0.2, lambda: setattr(llama_server, "loading", False))
    timer.start()
    backend = http_backend(llama_server, tmp_path, model_dir)
    backend.prepare("Streaming Omni Conversation.")
    timer.join()
    assert llama_server.initialized
    backend.close()


def test_server_down_raises_unavailable_naming_the_url_and_how_to_start_it(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    backend = LlamaCppOmniBackend(
        LlamaCppOmniConfig(
            url=url,
            transport="http",
            server="llama-server",
            model_dir="/m",
            work_dir=str(tmp_path),
            health_timeout_s=0.2,
            retries=0,
        )
    )
    with pytest.raises(BackendUnavailable) as excinfo:
        backend.prepare("Streaming Omni Conversation.")
    assert url in str(excinfo.value)
    assert "llama-omni-server" in str(excinfo.value)
    backend.close()


def test_decode_that_hangs_raises_backend_timeout_and_the_next_unit_recovers(
    llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path
) -> None:
    backend = http_backend(
        llama_server, tmp_path, model_dir, decode_timeout_s=0.3, unit_quiet_s=0.1
    )
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
    llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, model_dir)
    backend.prepare("Streaming Omni Conversation.")
    llama_server.fault = "malformed"
    backend.prefill(make_unit(backend, 0))
    with pytest.raises(BackendProtocolError, match="malformed JSON"):
        backend.generate()
    backend.close()


def test_connection_cut_mid_decode_raises_backend_unavailable(
    llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, model_dir)
    backend.prepare("Streaming Omni Conversation.")
    llama_server.fault = "drop"
    backend.prefill(make_unit(backend, 0, speech=True))
    with pytest.raises(BackendUnavailable):
        backend.generate()
    backend.close()


def test_server_error_500_on_prefill_is_a_backend_error(
    llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, model_dir)
    backend.prepare("Streaming Omni Conversation.")
    llama_server.fault = "error500"
    with pytest.raises(BackendError, match="stream_prefill failed"):
        backend.prefill(make_unit(backend, 0))
    backend.close()


def test_reset_clears_llama_server_and_prepare_reuses_its_context(
    llama_server: LoopbackLlamaServer, tmp_path: Path, model_dir: Path
) -> None:
    backend = http_backend(llama_server, tmp_path, model_dir)
    backend.prepare("Streaming Omni Conversation.")
    run(backend, 0, speech=True)
    run(backend, 1)
    backend.reset()
    backend.prepare("Streaming Omni Conversation.")
    results = [run(backend, 0, speech=True)] + [run(backend, i) for i in range(1, 4)]
    names = [name for name, _ in llama_server.requests]
    assert names.count("omni_init") == 1  # models are not reloaded
    assert names.count("reset") == 1
    assert names.count("update_session_config") == 1
    assert [p["cnt"] for p in llama_server.prefills if p["cnt"] <= 1] == [0, 1, 0, 1]
    assert speech_of(results).size > 0  # token2wav numbering carried on: still read
    backend.close()


def test_server_that_vanishes_mid_turn_is_reported_and_recovered_on_the_same_port(
    tmp_path: Path, model_dir: Path
) -> None:
    server = LoopbackLlamaServer(tts_delay_s=0.005).start()
    port = server.port
    backend = http_backend(server, tmp_path, model_dir, health_timeout_s=0.3)
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
        result = run(backend, 0, speech=True)  # re-opened: omni_init, cnt 0, users from 1
        assert not result.is_listen
        assert [p["cnt"] for p in server.prefills] == [0, 1]
    finally:
        backend.close()
        server.stop()


# ------------------------------------------------------------------------------------------ config


def test_config_rejects_an_unknown_transport_server_and_keys() -> None:
    with pytest.raises(ConfigError, match="transport"):
        LlamaCppOmniConfig.from_mapping({"transport": "grpc"})
    with pytest.raises(ConfigError, match="server"):
        LlamaCppOmniConfig.from_mapping({"server": "ollama"})
    with pytest.raises(ConfigError, match="unknown"):
        LlamaCppOmniConfig.from_mapping({"hostname": "x"})
    with pytest.raises(ConfigError):
        LlamaCppOmniConfig.from_mapping({"decode_timeout_s": 0})
    with pytest.raises(ConfigError, match="unit_quiet_s"):
        LlamaCppOmniConfig.from_mapping({"unit_quiet_s": 5.0, "decode_timeout_s": 2.0})
    with pytest.raises(ConfigError, match="low_water"):
        LlamaCppOmniConfig.from_mapping({"sliding_window_low_water": 5000})
    with pytest.raises(ConfigError, match="top_p"):
        LlamaCppOmniConfig.from_mapping({"top_p": 1.5})
    with pytest.raises(ConfigError, match="voice_audio"):
        LlamaCppOmniConfig.from_mapping({"transport": "websocket", "voice_audio": "/v.wav"})
    with pytest.raises(ConfigError, match="no WebSocket"):
        LlamaCppOmniConfig.from_mapping({"transport": "websocket", "server": "llama-server"})


def test_config_derives_http_and_ws_urls_from_one_base() -> None:
    config = LlamaCppOmniConfig(url="ws://10.0.0.5:9000/", transport="websocket")
    assert config.http_base == "http://10.0.0.5:9000"
    assert config.ws_url == "ws://10.0.0.5:9000/backend"


# ------------------------------------------------------------------ close with a call in flight
@pytest.mark.parametrize("generation", ["llama-server", "llama-omni-server"])
def test_close_from_another_thread_ends_a_hung_http_decode_at_once(
    generation: str,
    llama_server: LoopbackLlamaServer,
    omni_server: LoopbackLlamaServer,
    tmp_path: Path,
    model_dir: Path,
) -> None:
    # Before the fix httpx.Client.close() left the decode's blocking read running on the call's
    # thread until decode_timeout_s (then EBADF): a node's cleanup waited for it.
    if generation == "llama-server":
        server, backend = (
            llama_server,
            http_backend(
                llama_server, tmp_path, model_dir, decode_timeout_s=30.0, read_timeout_s=30.0
            ),
        )
    else:
        server, backend = omni_server, http_backend(
            omni_server, tmp_path, server=LLAMA_OMNI_SERVER, model_dir="",
            decode_timeout_s=30.0, read_timeout_s=30.0,
        )  # fmt: skip
    backend.prepare("You are a robot.")
    run(backend, 0)
    server.fault = "hang"
    backend.prefill(make_unit(backend, 1))
    outcome: list[BaseException] = []

    def decode() -> None:
        try:
            backend.generate()
        except BaseException as exc:  # inspected below
            outcome.append(exc)

    thread = threading.Thread(target=decode, daemon=True)
    thread.start()
    time.sleep(0.3)  # inside the decode's read (the server holds the answer)
    backend.close()
    thread.join(10.0)
    assert not thread.is_alive(), "the decode went on after close()"
    assert len(outcome) == 1
    assert isinstance(outcome[0], BackendUnavailable), outcome
