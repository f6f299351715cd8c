"""The ``minicpmo`` backend (real adapter code) against ``DuplexApiDouble``, a test double of the
MiniCPM-o 4.5 duplex API that follows the model's own code (citations in the double). No weights, no
GPU: the remote code itself runs in test_minicpmo_conformance.py (opt-in) and the real model in
test/gpu/."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from omni_ros.backends import minicpmo as minicpmo_module
from omni_ros.backends.base import create_backend
from omni_ros.backends.minicpmo import (
    FIRST_UNIT_SAMPLES,
    UNIT_SAMPLES,
    MiniCPMOBackend,
    MiniCPMOConfig,
    load_pretrained,
    preflight_runtime_packages,
)
from omni_ros.core.errors import (
    BackendError,
    BackendProtocolError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    StateError,
)
from omni_ros.core.types import Unit, UnitResult, VideoFrame
from PIL import Image
from unit.backends.contract import BackendContract, check_result, make_unit
from unit.backends.duplex_api_double import (
    FIRST_UNIT_TAKEN,
    LAST_CHUNK_EXTRA_SAMPLES,
    LISTEN,
    OUTPUT_UNIT_SAMPLES,
    DuplexApiDouble,
    Fault,
    ModelDouble,
    Speak,
)

HUB_ID = "openbmb/MiniCPM-o-4_5"
REVISION = "0123456789abcdef0123456789abcdef01234567"
PROMPT = "Streaming Omni Conversation."

#: A long scripted turn: the model keeps talking unless something closes the turn.
LONG_TURN: tuple[Speak, ...] = (
    Speak("Hello,"),
    Speak("I can"),
    Speak("see a"),
    Speak("red cup"),
    Speak("on the"),
    Speak("table."),
    Speak("Anything else?", end_of_turn=True),
)


def _voice_file() -> str:
    """A real WAV file for ``prompt_wav_path`` (the backend checks that the voice exists)."""
    from scipy.io import wavfile

    path = os.path.join(tempfile.gettempdir(), f"omni_ros_test_voice_{os.getpid()}.wav")
    if not os.path.isfile(path):
        wavfile.write(path, 16_000, np.zeros(16_000, dtype=np.float32))
    return path


def make_config(**overrides: Any) -> MiniCPMOConfig:
    params: dict[str, Any] = {
        "model": HUB_ID,
        "revision": REVISION,
        "trust_remote_code": True,
        "force_listen_count": 0,
        "prompt_wav_path": _voice_file(),
        "generate_timeout_s": 5.0,
        "prefill_timeout_s": 5.0,
        "prepare_timeout_s": 5.0,
    }
    params.update(overrides)
    return MiniCPMOConfig.from_mapping(params)


def make_backend(
    script: tuple[Any, ...] = LONG_TURN,
    duplex_class: type[DuplexApiDouble] = DuplexApiDouble,
    **overrides: Any,
) -> tuple[MiniCPMOBackend, DuplexApiDouble, ModelDouble]:
    model = ModelDouble(duplex_class=duplex_class, script=script)
    backend = MiniCPMOBackend(make_config(**overrides), model=model)
    assert model.duplex is not None
    return backend, model.duplex, model


@pytest.fixture
def made() -> Iterator[tuple[MiniCPMOBackend, DuplexApiDouble, ModelDouble]]:
    backend, duplex, model = make_backend()
    yield backend, duplex, model
    duplex.release.set()
    backend.close()


def run(backend: MiniCPMOBackend, index: int, **kwargs: Any) -> UnitResult:
    backend.prefill(make_unit(backend, index, **kwargs))
    return check_result(backend.generate())


# ------------------------------------------------------------------------------------ contract
class TestMiniCPMOContract(BackendContract):
    """The shared contract, HF remote-code API, interrupts closed by muting the cut turn."""

    @pytest.fixture
    def backend(self) -> Iterator[MiniCPMOBackend]:
        backend, duplex, _ = make_backend()
        yield backend
        duplex.release.set()
        backend.close()


class TestMiniCPMOResetOnInterruptContract(BackendContract):
    """The shared contract with ``interrupt_mode: reset``."""

    @pytest.fixture
    def backend(self) -> Iterator[MiniCPMOBackend]:
        backend, duplex, _ = make_backend(interrupt_mode="reset")
        yield backend
        duplex.release.set()
        backend.close()


# -------------------------------------------------------------------------------------- config
def test_config_without_trust_remote_code_says_which_parameters_to_set() -> None:
    with pytest.raises(ConfigError) as excinfo:
        MiniCPMOConfig.from_mapping({"model": HUB_ID, "revision": REVISION})
    message = str(excinfo.value)
    assert "trust_remote_code: true" in message
    assert "revision" in message


def test_config_without_revision_for_a_hub_id_says_to_pin_one() -> None:
    with pytest.raises(ConfigError) as excinfo:
        MiniCPMOConfig.from_mapping({"model": HUB_ID, "trust_remote_code": True})
    assert "`revision`" in str(excinfo.value)
    with pytest.raises(ConfigError):
        MiniCPMOConfig.from_mapping({"model": HUB_ID, "trust_remote_code": True, "revision": " "})


def test_config_for_a_local_folder_needs_trust_and_a_pinned_revision(tmp_path: Any) -> None:
    with pytest.raises(ConfigError) as excinfo:
        MiniCPMOConfig.from_mapping({"model": str(tmp_path)})
    assert "trust_remote_code: true" in str(excinfo.value)
    assert str(tmp_path) in str(excinfo.value)
    with pytest.raises(ConfigError, match="revision is required"):
        MiniCPMOConfig.from_mapping({"model": str(tmp_path), "trust_remote_code": True})
    config = MiniCPMOConfig.from_mapping(
        {"model": str(tmp_path), "trust_remote_code": True, "revision": REVISION}
    )
    assert config.is_local
    assert config.revision == REVISION


def test_a_cache_snapshot_folder_must_be_the_pinned_revision(tmp_path: Any) -> None:
    snapshot = tmp_path / "models--openbmb--MiniCPM-o-4_5" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    with pytest.raises(ConfigError, match="snapshot"):
        MiniCPMOConfig.from_mapping(
            {"model": str(snapshot), "trust_remote_code": True, "revision": "cd" * 20}
        )
    config = MiniCPMOConfig.from_mapping(
        {"model": str(snapshot), "trust_remote_code": True, "revision": "AB" * 20}
    )
    assert config.is_local


def test_config_without_a_model_names_the_parameter() -> None:
    with pytest.raises(ConfigError, match="model"):
        MiniCPMOConfig.from_mapping({"trust_remote_code": True, "revision": REVISION})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("variant", "fp8"),
        ("attn_implementation", "eager"),
        ("sliding_window_mode", "huge"),
        ("decode_mode", "beam"),
        ("interrupt_mode", "ignore"),
        ("generate_timeout_s", 0.0),
        ("top_p", 1.5),
        ("top_k", "20"),
        ("no_such_parameter", 1),
    ],
)
def test_config_rejects_bad_values(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        make_config(**{key: value})


def test_create_backend_validates_the_config_before_loading_anything() -> None:
    with pytest.raises(ConfigError, match="trust_remote_code"):
        create_backend("minicpmo", {"model": HUB_ID, "revision": REVISION})


def test_default_loader_rejects_a_missing_local_folder(tmp_path: Any) -> None:
    missing = str(tmp_path / "no_weights_here")
    config = MiniCPMOConfig.from_mapping(
        {"model": missing, "trust_remote_code": True, "revision": REVISION}
    )
    with pytest.raises(ConfigError, match="no such folder"):
        load_pretrained(config)


def test_default_loader_without_cuda_is_unavailable_with_the_reason() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailable, match="CUDA is not available"):
        load_pretrained(make_config(device="cuda"))


def test_default_loader_offline_without_cached_weights_is_unavailable(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("transformers")
    monkeypatch.setattr(minicpmo_module, "preflight_runtime_packages", lambda: None)
    # An empty cache: local_files_only must fail fast instead of downloading.
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackendUnavailable, match="local_files_only"):
        load_pretrained(make_config(device="cpu"))


def test_the_preflight_names_every_missing_package_in_one_error() -> None:
    with pytest.raises(BackendUnavailable) as excinfo:
        preflight_runtime_packages(
            {
                "json": "json",
                "omni_ros_no_such_accelerate": "accelerate (transformers 4.51 from_pretrained ...)",
                "omni_ros_no_such_librosa": "librosa (imported by the remote code)",
            }
        )
    message = str(excinfo.value)
    assert "accelerate" in message
    assert "librosa" in message
    assert "json" not in message.split("missing Python packages:")[1].split(".")[0]
    assert "requirements/minicpmo.txt" in message


def test_the_default_loader_runs_the_preflight_before_the_remote_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # transformers 4.51.0 without accelerate fails inside from_pretrained with
    # "NameError: name 'init_empty_weights' is not defined"; the preflight says why first.
    transformers = pytest.importorskip("transformers")
    monkeypatch.setitem(
        minicpmo_module.RUNTIME_PACKAGES, "omni_ros_no_such_accelerate", "accelerate (...)"
    )

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("from_pretrained ran before the preflight")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", from_pretrained)
    with pytest.raises(BackendUnavailable, match=r"missing Python packages:.*accelerate"):
        load_pretrained(make_config(device="cpu"))


def test_loading_builds_the_vocoder_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # as_duplex() builds it (modeling_minicpmo.py:2525); the loader must not build it too.
    transformers = pytest.importorskip("transformers")
    model = ModelDouble()
    monkeypatch.setattr(minicpmo_module, "preflight_runtime_packages", lambda: None)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: model)
    backend = MiniCPMOBackend(make_config(device="cpu"))
    assert model.init_tts_calls == 1
    backend.close()
    assert load_pretrained(make_config(device="cpu"), build_vocoder=True) is model
    assert model.init_tts_calls == 2  # the TensorRT exporter's call, which never calls as_duplex


# ------------------------------------------------------------------------------------- loading
def test_as_duplex_gets_the_window_and_force_listen_settings() -> None:
    backend, duplex, model = make_backend(
        sliding_window_mode="context", context_max_units=12, force_listen_count=2, device="cuda:1"
    )
    assert model.init_tts_calls == 1
    (call,) = model.as_duplex_calls
    assert call["device"] == "cuda:1"
    assert call["sliding_window_mode"] == "context"
    assert call["context_max_units"] == 12
    assert call["force_listen_count"] == 2
    assert call["chunk_ms"] == 1000
    assert call["first_chunk_ms"] == 1035
    assert duplex.force_listen_count == 2
    backend.close()


def test_sliding_window_off_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    backend, _, _ = make_backend(sliding_window_mode="off")
    assert any("sliding_window_mode is off" in r.getMessage() for r in caplog.records)
    backend.close()


def test_missing_minicpmo_utils_is_unavailable_with_an_install_hint() -> None:
    model = ModelDouble(as_duplex_error=ModuleNotFoundError("No module named 'stepaudio2'"))
    with pytest.raises(BackendUnavailable) as excinfo:
        MiniCPMOBackend(make_config(), model=model)
    assert "minicpmo-utils" in str(excinfo.value)
    assert "pip install" in str(excinfo.value)


def test_model_loader_is_called_with_the_config() -> None:
    seen: list[MiniCPMOConfig] = []

    def loader(config: MiniCPMOConfig) -> ModelDouble:
        seen.append(config)
        return ModelDouble()

    config = make_config()
    backend = MiniCPMOBackend(config, model_loader=loader)
    assert seen == [config]
    backend.close()


def test_a_model_without_as_duplex_is_refused_naming_the_supported_api() -> None:
    class UnifiedModel:  # the official demo's model: a DuplexCapability, no as_duplex()
        duplex = DuplexApiDouble()

    with pytest.raises(BackendProtocolError, match=r"as_duplex.*DuplexCapability"):
        MiniCPMOBackend(make_config(), model=UnifiedModel())


def test_length_penalty_of_the_demo_api_is_not_a_parameter() -> None:
    # Only the demo's DuplexCapability took it; that API is not supported (no text_list, and it
    # needs finalize_unit() after every generate).
    with pytest.raises(ConfigError, match="length_penalty"):
        make_config(length_penalty=1.1)


@pytest.mark.parametrize(("key", "value"), [("listen_top_k", 5), ("listen_prob_scale", 1.5)])
def test_listen_settings_that_act_on_the_wrong_token_are_refused(key: str, value: Any) -> None:
    # The decoder's listen id is <|im_end|> but the loop listens on <|listen|> (utils.py:1172,
    # modeling_minicpmo.py:2563): with listen_top_k every unit would be speech.
    with pytest.raises(ConfigError, match=f"{key}.*<\\|im_end\\|>.*<\\|listen\\|>"):
        make_backend(**{key: value})


class _FixedDecoderModel(ModelDouble):
    """An upstream whose decoder listens on <|listen|> (the same id as the duplex loop)."""

    def as_duplex(self, device: Any = None, **kwargs: Any) -> DuplexApiDouble:
        duplex = super().as_duplex(device, **kwargs)
        duplex.decoder.listen_id = duplex.listen_token_id
        return duplex


def test_listen_top_k_is_passed_on_when_the_decoder_listens_on_the_right_token() -> None:
    backend = MiniCPMOBackend(
        make_config(listen_top_k=5), model=_FixedDecoderModel(script=(LISTEN,) * 3)
    )
    backend.prepare(PROMPT)
    assert run(backend, 0).is_listen
    backend.close()


def test_the_double_returns_before_feeding_unit_when_a_prefill_has_no_input() -> None:
    # modeling_minicpmo.py:2849-2854 return before <unit> is fed at :2864 (measured: KV 8 -> 8).
    duplex = DuplexApiDouble()
    duplex.prepare(prompt_wav_path=None)
    before = duplex.kv_tokens
    assert duplex.streaming_prefill()["success"] is False
    assert duplex.kv_tokens == before
    assert duplex.stray_unit_tokens == 0


def test_the_double_reproduces_why_listen_top_k_is_refused() -> None:
    # The double itself, driven directly: with the ids differing every unit is speech.
    duplex = DuplexApiDouble(script=(LISTEN,) * 4)
    duplex.prepare(prompt_wav_path=None)
    for _ in range(3):
        duplex.streaming_prefill(audio_waveform=np.zeros(FIRST_UNIT_SAMPLES, np.float32))
        assert duplex.streaming_generate(listen_top_k=5)["is_listen"] is False


def test_generate_gets_the_configured_sampling_arguments() -> None:
    backend, duplex, _ = make_backend(top_k=7, temperature=0.3, decode_mode="greedy")
    backend.prepare(PROMPT)
    run(backend, 0)
    (call,) = duplex.method_calls("streaming_generate")
    assert call["top_k"] == 7
    assert call["temperature"] == 0.3
    assert call["decode_mode"] == "greedy"
    backend.close()


# ------------------------------------------------------------------------------------- prepare
def test_prompt_is_passed_unwrapped_because_the_api_wraps_it(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare("You are a helpful robot.")
    (call,) = duplex.method_calls("prepare")
    assert call["prefix_system_prompt"] == "You are a helpful robot."
    assert duplex.wrapped_prompt == "<|im_start|>system\nYou are a helpful robot.<|im_end|>"


def test_ref_voice_is_embedded_and_becomes_the_tts_voice_file() -> None:
    backend, duplex, _ = make_backend(prompt_wav_path=None)
    voice = (0.1 * np.sin(np.arange(8000) / 10.0)).astype(np.float32)
    backend.prepare(PROMPT, ref_voice=voice)
    (call,) = duplex.method_calls("prepare")
    np.testing.assert_array_equal(call["ref_audio"], voice)
    path = call["prompt_wav_path"]
    assert path is not None
    assert os.path.exists(path)
    backend.close()
    assert not os.path.exists(path), "the temporary voice file outlived close()"


def test_without_any_voice_speech_units_are_text_only() -> None:
    backend, _, _ = make_backend(prompt_wav_path=None)
    backend.prepare(PROMPT)
    results = [run(backend, i) for i in range(3)]
    assert [r.text for r in results] == ["Hello,", "I can", "see a"]
    assert all(r.audio is None and not r.is_listen for r in results)
    backend.close()


def test_ref_audio_path_is_read_at_16_khz_and_used_as_the_voice(tmp_path: Any) -> None:
    from scipy.io import wavfile

    path = tmp_path / "voice.wav"
    tone = (8000 * np.sin(np.arange(24_000) / 5.0)).astype(np.int16)
    wavfile.write(path, 24_000, tone)
    backend, duplex, _ = make_backend(prompt_wav_path=None, ref_audio_path=str(path))
    backend.prepare(PROMPT)
    (call,) = duplex.method_calls("prepare")
    assert call["prompt_wav_path"] == str(path)
    ref = call["ref_audio"]
    assert ref.dtype == np.float32
    assert abs(ref.size - 16_000) <= 2  # 1 s at 24 kHz -> 1 s at 16 kHz
    assert 0.2 < float(np.max(np.abs(ref))) <= 1.0  # int16 scaled to [-1, 1], not left raw
    backend.close()


# ------------------------------------------------------------------------------- unit feeding
def test_units_are_delivered_as_16560_then_16000_samples_and_no_backlog_builds(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    for index in range(12):
        run(backend, index, speech=index % 2 == 0)
        # The API takes 16,480 of the first 16,560 and keeps 80 for good: a constant, no backlog.
        assert duplex.backlog_samples == FIRST_UNIT_SAMPLES - FIRST_UNIT_TAKEN
    assert duplex.delivered_audio_lengths == [FIRST_UNIT_SAMPLES] + [UNIT_SAMPLES] * 11
    assert duplex.consumed_unit_lengths == [FIRST_UNIT_TAKEN] + [UNIT_SAMPLES] * 11
    assert duplex.max_backlog_samples == 80
    assert duplex.short_unit_pads == 0
    assert duplex.audio_not_enough == 0
    assert duplex.non_float32_audio_calls == 0


def test_a_first_unit_must_be_16560_samples(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    with pytest.raises(ConfigError, match="16560"):
        backend.prefill(make_unit(backend, 1))  # a 1.0 s unit where the 1.035 s one is due
    assert duplex.method_calls("streaming_prefill") == []
    run(backend, 0)


def test_after_a_lost_first_unit_the_next_unit_is_left_padded_to_16560(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    duplex.set_break_event()  # the first unit is refused (success False, no side effects)
    run(backend, 0)
    second = make_unit(backend, 1, speech=True)
    backend.prefill(second)
    check_result(backend.generate())
    delivered = duplex.method_calls("streaming_prefill")[1]["audio_waveform"]
    assert delivered.size == FIRST_UNIT_SAMPLES
    assert not np.any(delivered[: FIRST_UNIT_SAMPLES - UNIT_SAMPLES])
    np.testing.assert_array_equal(delivered[FIRST_UNIT_SAMPLES - UNIT_SAMPLES :], second.audio)
    assert backend.first_units_padded == 1
    assert duplex.consumed_unit_lengths == [FIRST_UNIT_TAKEN]
    assert duplex.max_backlog_samples == 80


def test_a_first_length_unit_later_is_rejected_before_it_reaches_the_model(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    run(backend, 0)
    with pytest.raises(ConfigError, match="16000"):
        backend.prefill(make_unit(backend, 0))
    assert len(duplex.method_calls("streaming_prefill")) == 1
    run(backend, 1)
    assert duplex.max_backlog_samples == FIRST_UNIT_SAMPLES - FIRST_UNIT_TAKEN


def test_audio_is_handed_over_as_clipped_finite_float32(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    good = make_unit(backend, 0)
    loud = good.audio.astype(np.float64) * 10.0
    loud[5] = np.nan
    backend.prefill(Unit(0, good.start_ns, good.end_ns, loud, good.sample_rate))  # type: ignore[arg-type]
    check_result(backend.generate())
    delivered = duplex.method_calls("streaming_prefill")[0]["audio_waveform"]
    assert delivered.dtype == np.float32
    assert np.all(np.isfinite(delivered))
    assert float(np.max(np.abs(delivered))) <= 1.0


def test_two_prefills_without_generate_raise_instead_of_queueing(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    backend.prefill(make_unit(backend, 0))
    with pytest.raises(StateError, match="generate"):
        backend.prefill(make_unit(backend, 1))
    assert len(duplex.method_calls("streaming_prefill")) == 1
    assert duplex.prefills_without_generate == 0


def test_frames_become_newest_rgb_pil_images_about_448_square(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    base = make_unit(backend, 0)
    rng = np.random.default_rng(0)
    old = VideoFrame(stamp_ns=1, rgb=rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    new = VideoFrame(stamp_ns=2, rgb=rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8))
    unit = Unit(0, base.start_ns, base.end_ns, base.audio, base.sample_rate, frames=(old, new))
    backend.prefill(unit)
    check_result(backend.generate())
    frames = duplex.method_calls("streaming_prefill")[0]["frame_list"]
    assert len(frames) == 1  # max_frames_per_unit = 1: the newest
    (image,) = frames
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    width, height = image.size
    assert width * height <= 448 * 448 * 1.01
    assert abs(width / height - 1920 / 1080) < 0.01


def test_small_frames_are_not_upscaled_and_keep_their_pixels(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    base = make_unit(backend, 0)
    rgb = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    unit = Unit(0, base.start_ns, base.end_ns, base.audio, 16_000, frames=(VideoFrame(0, rgb),))
    backend.prefill(unit)
    check_result(backend.generate())
    (image,) = duplex.method_calls("streaming_prefill")[0]["frame_list"]
    np.testing.assert_array_equal(np.asarray(image), rgb)


def test_injected_text_becomes_the_text_list(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    run(backend, 0, texts=("What do you see?",))
    assert duplex.method_calls("streaming_prefill")[0]["text_list"] == ["What do you see?"]
    assert duplex.texts_seen == ["What do you see?"]


def test_injected_text_steers_the_next_units_decision_not_its_own() -> None:
    # The text is fed after the audio, whose feed produced this unit's logits
    # (modeling_minicpmo.py:3097, :3115-3140; measured: identical logits with and without it).
    backend, duplex, _ = make_backend(script=(LISTEN,) * 6)
    duplex.replies["Say hello."] = Speak("Hello!", end_of_turn=True)
    backend.prepare(PROMPT)
    assert run(backend, 0).is_listen
    assert run(backend, 1, texts=("Say hello.",)).is_listen  # its own decision is already made
    reply = run(backend, 2)
    assert not reply.is_listen
    assert reply.text == "Hello!"
    assert reply.end_of_turn
    backend.close()


def test_the_text_of_a_unit_lost_to_a_break_is_fed_with_the_next_unit(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    run(backend, 0)
    duplex.set_break_event()  # set by someone else: the next unit is lost on purpose
    lost = run(backend, 1, texts=("Stop.",))
    assert lost.is_listen
    run(backend, 2, texts=("Now turn left.",))
    texts = [c["text_list"] for c in duplex.method_calls("streaming_prefill")]
    assert texts == [None, ["Stop."], ["Stop.", "Now turn left."]]
    assert duplex.texts_seen == ["Stop.", "Now turn left."]
    assert backend.texts_carried == 1


# ------------------------------------------------------------------------------------- results
def test_listen_units_drop_the_24000_zeros_and_speech_audio_is_float32() -> None:
    backend, _, _ = make_backend(script=(LISTEN, *LONG_TURN))
    backend.prepare(PROMPT)
    listen = run(backend, 0)
    assert listen.is_listen
    assert listen.audio is None
    # The first speech unit of a turn is force-flushed and left-padded to one second
    # (modeling_minicpmo.py:3348-3350, :3609-3612): it already carries 24,000 samples.
    first = run(backend, 1)
    assert not first.is_listen
    assert first.text == "Hello,"
    assert first.audio is not None
    assert first.audio.dtype == np.float32
    assert first.audio.size == OUTPUT_UNIT_SAMPLES
    middle = [run(backend, i) for i in range(2, 7)]
    assert [r.audio.size for r in middle] == [OUTPUT_UNIT_SAMPLES] * 5  # type: ignore[union-attr]
    # The last unit of a turn flushes the vocoder's lookahead too (:3588-3595): longer, unpadded.
    last = run(backend, 7)
    assert last.end_of_turn
    assert last.audio is not None
    assert last.audio.size == OUTPUT_UNIT_SAMPLES + LAST_CHUNK_EXTRA_SAMPLES
    backend.close()


def test_a_turn_ending_in_a_listen_unit_keeps_its_words_and_its_end_of_turn() -> None:
    # <|turn_eos|> then <|listen|> in one unit: the API returns a bare listen (text "",
    # end_of_turn False: modeling_minicpmo.py:3300-3315) and skips the TTS turn reset.
    script = (Speak("Hi"), Speak("there.", then_listen=True), LISTEN, Speak("Next."))
    backend, duplex, _ = make_backend(script=script)
    backend.prepare(PROMPT)
    results = [run(backend, i) for i in range(4)]
    closing = results[1]
    assert not closing.is_listen
    assert closing.text == "there."
    assert closing.end_of_turn
    assert closing.audio is None  # the vocoder never ran for those words
    assert results[2].is_listen
    assert not results[2].end_of_turn
    assert results[3].text == "Next."
    assert backend.turn_ends_recovered == 1
    assert duplex.stale_tts_turns == 0  # the next turn's TTS starts fresh
    backend.close()


def test_end_of_turn_is_reported_and_the_next_turn_starts_fresh() -> None:
    script = (Speak("Hi."), Speak("Bye.", end_of_turn=True), LISTEN, Speak("Again."))
    backend, _, _ = make_backend(script=script)
    backend.prepare(PROMPT)
    results = [run(backend, i) for i in range(4)]
    assert [r.end_of_turn for r in results] == [False, True, False, False]
    assert [r.is_listen for r in results] == [False, False, True, False]
    backend.close()


def test_force_listen_count_units_are_listen() -> None:
    backend, _, _ = make_backend(force_listen_count=3)
    backend.prepare(PROMPT)
    results = [run(backend, i) for i in range(4)]
    assert [r.is_listen for r in results] == [True, True, True, False]
    assert results[3].text == "Hello,"
    backend.close()


def test_costs_in_seconds_become_timings_in_milliseconds() -> None:
    model = ModelDouble(script=LONG_TURN, cost_s=0.25)
    backend = MiniCPMOBackend(make_config(), model=model)
    backend.prepare(PROMPT)
    result = run(backend, 0, frames=1)
    timings = result.timings_ms
    assert timings["llm"] == pytest.approx(250.0)
    assert timings["token2wav"] == pytest.approx(250.0)
    assert timings["generate_total"] == pytest.approx(1000.0)
    assert timings["prefill_audio_feed"] == pytest.approx(250.0)
    assert timings["prefill_total"] == pytest.approx(1500.0)
    assert timings["prefill_call"] >= 0.0
    assert timings["generate_call"] >= 0.0
    assert all(isinstance(v, float) for v in timings.values())
    backend.close()


def _drop(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda r: {k: v for k, v in r.items() if k != key}


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda r: {**r, key: value}


@pytest.mark.parametrize(
    "mutator",
    [
        _drop("is_listen"),
        _drop("n_tts_tokens"),
        _set("is_listen", "yes"),
        _set("text", None),
        _set("end_of_turn", 1),
        _set("cost_llm", "fast"),
        _set("cost_all", float("nan")),
        _set("n_tokens", 1.5),
        _set("current_time", True),
        _set("audio_waveform", [0.0, 0.1]),
        lambda r: {**r, "is_listen": False, "audio_waveform": np.zeros((2, 100), np.float32)},
        lambda r: {**r, "is_listen": False, "audio_waveform": np.full(10, np.nan, np.float32)},
        lambda r: tuple(r.items()),
        lambda r: None,
    ],
    ids=[
        "no-is_listen",
        "no-n_tts_tokens",
        "is_listen-str",
        "text-None",
        "end_of_turn-int",
        "cost-str",
        "cost-nan",
        "n_tokens-float",
        "current_time-bool",
        "audio-list",
        "audio-2d",
        "audio-nan",
        "tuple",
        "None",
    ],
)
def test_malformed_generate_results_raise_backend_protocol_error(
    made: Any, mutator: Callable[[dict[str, Any]], Any]
) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    duplex.result_mutator = mutator
    backend.prefill(make_unit(backend, 0))
    with pytest.raises(BackendProtocolError):
        backend.generate()
    # The next unit works again once the API behaves.
    duplex.result_mutator = None
    run(backend, 1)


def test_a_torch_tensor_audio_is_accepted_as_numpy(made: Any) -> None:
    torch = pytest.importorskip("torch")
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    duplex.result_mutator = lambda r: {
        **r,
        "is_listen": False,
        "text": "hi",
        "audio_waveform": torch.full((1, 240), 0.5, dtype=torch.bfloat16),
    }
    result = run(backend, 0)
    assert result.audio is not None
    assert result.audio.shape == (240,)
    assert result.audio.dtype == np.float32


# ------------------------------------------------------------------------------ success False
def test_a_prefill_refused_for_another_reason_is_a_protocol_error_naming_it(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    duplex.prefill_result_mutator = lambda r: {**r, "success": False, "reason": "audio too short"}
    with pytest.raises(BackendProtocolError, match="audio too short"):
        backend.prefill(make_unit(backend, 0))
    duplex.prefill_result_mutator = None
    # Whether the API consumed the audio is unknown now (here it did): feeding on could misalign
    # the 16,560/16,000 accounting, so the backend insists on a fresh session.
    with pytest.raises(BackendUnavailable, match="reset"):
        backend.prefill(make_unit(backend, 1))
    backend.reset()
    backend.prepare(PROMPT)
    run(backend, 0)
    run(backend, 1)
    assert duplex.max_backlog_samples == FIRST_UNIT_SAMPLES - FIRST_UNIT_TAKEN


def test_an_exception_in_prefill_requires_a_new_session(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    duplex.faults["streaming_prefill"] = Fault(exception=RuntimeError("cuDNN failure"), times=1)
    with pytest.raises(BackendError, match="cuDNN"):
        backend.prefill(make_unit(backend, 0))
    with pytest.raises(BackendUnavailable, match="prepare"):
        backend.prefill(make_unit(backend, 1))
    backend.prepare(PROMPT)  # prepare() alone starts a clean session too
    run(backend, 0)


def test_a_break_set_by_someone_else_loses_one_unit_and_is_then_cleared(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    run(backend, 0)
    duplex.set_break_event()
    backend.prefill(make_unit(backend, 1))  # success False, no side effects
    lost = check_result(backend.generate())
    assert lost.is_listen
    assert backend.units_lost_to_interrupt == 1
    assert len(duplex.method_calls("streaming_generate")) == 1  # not called for the lost unit
    run(backend, 2)
    assert not duplex.is_break_set()
    assert duplex.delivered_audio_lengths == [FIRST_UNIT_SAMPLES, UNIT_SAMPLES]


def test_a_session_stop_set_outside_is_unavailable_until_prepare(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    duplex.set_session_stop()
    with pytest.raises(BackendUnavailable, match="prepare"):
        backend.prefill(make_unit(backend, 0))
    backend.reset()
    backend.prepare(PROMPT)
    run(backend, 0)


# ---------------------------------------------------------------------------------- interrupt
def test_interrupt_sets_the_break_and_the_next_unit_is_a_listen_that_clears_it(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    assert not run(backend, 0).is_listen
    backend.interrupt()
    assert duplex.is_break_set(), "the model must stop at once, not at the next unit"
    after = run(backend, 1, speech=True)
    assert after.is_listen
    assert after.end_of_turn, "the cut turn is closed for the session"
    assert after.audio is None
    assert after.text == ""
    assert not duplex.is_break_set()
    # The user's barge-in audio reached the model.
    assert duplex.delivered_audio_lengths == [FIRST_UNIT_SAMPLES, UNIT_SAMPLES]


def test_the_rest_of_a_cut_turn_is_muted_until_the_model_ends_it(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    run(backend, 0)
    backend.interrupt()
    # The HF API cannot switch to listen mid-turn: the double keeps speaking for 6 more units.
    muted = [run(backend, i) for i in range(1, 7)]
    assert all(r.is_listen and r.audio is None and r.text == "" for r in muted)
    assert [r.end_of_turn for r in muted] == [True] + [False] * 5
    assert backend.speech_units_muted == 6
    assert run(backend, 7).is_listen  # the script ran out: the model's own listen unit
    duplex.script.append(Speak("New turn."))
    fresh = run(backend, 8)
    assert not fresh.is_listen
    assert fresh.text == "New turn."


def test_interrupt_between_prefill_and_generate_is_honoured_before_generate(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    run(backend, 0)
    backend.prefill(make_unit(backend, 1))
    backend.interrupt()
    result = check_result(backend.generate())
    assert result.is_listen
    assert not duplex.is_break_set()
    assert duplex.break_noops == 0, "generate ran with the break cleared, so the unit counted"


def test_interrupt_mode_reset_reprepares_and_feeds_the_unit_as_a_first_unit() -> None:
    backend, duplex, _ = make_backend(interrupt_mode="reset")
    backend.prepare(PROMPT)
    run(backend, 0)
    run(backend, 1)
    backend.interrupt()
    after = run(backend, 2, speech=True)
    assert after.is_listen
    assert after.end_of_turn
    assert duplex.prepare_count == 2
    assert duplex.delivered_audio_lengths == [FIRST_UNIT_SAMPLES, UNIT_SAMPLES, FIRST_UNIT_SAMPLES]
    assert duplex.max_backlog_samples == FIRST_UNIT_SAMPLES - FIRST_UNIT_TAKEN
    backend.close()


def test_reset_clears_the_whisper_streaming_cache_the_api_keeps() -> None:
    # MiniCPMODuplex.prepare never clears model.audio_past_key_values (only reset_session does:
    # modeling_minicpmo.py:176-178); measured: the same first unit after two fresh sessions
    # differed by 0.78 in max logit.
    backend, duplex, model = make_backend()
    backend.prepare(PROMPT)
    run(backend, 0)
    run(backend, 1)
    assert model.audio_past_key_values is not None
    backend.reset()
    assert model.audio_past_key_values is None
    backend.prepare(PROMPT)
    run(backend, 0)
    assert duplex.stale_encoder_cache_units == 0
    backend.close()


def test_a_new_prepare_alone_also_starts_without_the_old_encoder_cache(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    run(backend, 0)
    backend.prepare(PROMPT)  # a new session without reset()
    run(backend, 0)
    assert duplex.stale_encoder_cache_units == 0


def test_reset_then_prepare_prefills_the_prompt_and_voice_once(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    run(backend, 0)
    backend.reset()
    backend.prepare(PROMPT)
    assert duplex.prepare_count == 2  # the first session's and the new one's, nothing between
    run(backend, 0)


def test_a_missing_voice_file_is_a_config_error_naming_it_not_the_weights() -> None:
    backend, duplex, _ = make_backend(prompt_wav_path="/no/such/voice.wav")
    with pytest.raises(ConfigError, match=r"prompt_wav_path.*voice file") as excinfo:
        backend.prepare(PROMPT)
    assert "weights" not in str(excinfo.value)
    assert duplex.method_calls("prepare") == []
    backend.close()


def test_an_unreadable_voice_at_the_vocoder_is_not_blamed_on_the_weights(made: Any) -> None:
    backend, duplex, _ = made
    duplex.faults["prepare"] = Fault(exception=FileNotFoundError("voice.wav"), times=1)
    with pytest.raises(BackendUnavailable) as excinfo:
        backend.prepare(PROMPT)
    assert "weights" not in str(excinfo.value)


# ------------------------------------------------------------------------------ faults, timeouts
@pytest.mark.parametrize(
    ("exception", "expected"),
    [
        (RuntimeError("CUDA error: an illegal memory access"), BackendUnavailable),
        (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), BackendUnavailable),
        (ValueError("Unknown decode_mode: x"), BackendProtocolError),
        (KeyError("audio_waveform"), BackendProtocolError),
    ],
)
def test_an_exception_inside_the_api_becomes_a_backend_error(
    made: Any, exception: Exception, expected: type[BackendError]
) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    duplex.faults["streaming_generate"] = Fault(exception=exception, times=1)
    backend.prefill(make_unit(backend, 0))
    with pytest.raises(expected) as excinfo:
        backend.generate()
    assert excinfo.value.__cause__ is exception
    run(backend, 1)


def test_a_hung_generate_times_out_and_the_backend_refuses_calls_until_reset() -> None:
    backend, duplex, _ = make_backend(generate_timeout_s=0.2)
    try:
        backend.prepare(PROMPT)
        run(backend, 0)
        duplex.faults["streaming_generate"] = Fault(hang=True, times=1)
        backend.prefill(make_unit(backend, 1))
        with pytest.raises(BackendTimeout, match="reset"):
            backend.generate()
        with pytest.raises(BackendUnavailable, match="reset"):
            backend.prefill(make_unit(backend, 2))
        with pytest.raises(BackendUnavailable):
            backend.prepare(PROMPT)
        # reset() waits for the stuck call; it is still stuck, so reset fails too.
        with pytest.raises(BackendTimeout):
            backend.reset()
        duplex.release.set()
        backend.reset()
        backend.prepare(PROMPT)
        run(backend, 0)
        run(backend, 1)
        assert duplex.reentrant_calls == 0, "a call ran while the stuck one was still inside"
    finally:
        duplex.release.set()
        backend.close()


def test_a_hung_prefill_times_out_too() -> None:
    backend, duplex, _ = make_backend(prefill_timeout_s=0.2)
    try:
        backend.prepare(PROMPT)
        duplex.faults["streaming_prefill"] = Fault(hang=True, times=1)
        with pytest.raises(BackendTimeout, match="streaming_prefill"):
            backend.prefill(make_unit(backend, 0))
    finally:
        duplex.release.set()
        backend.close()


def test_calls_after_close_raise_state_error(made: Any) -> None:
    backend, duplex, _ = made
    backend.prepare(PROMPT)
    backend.close()
    assert duplex.is_session_stop_set()
    with pytest.raises(StateError, match="closed"):
        backend.prefill(make_unit(backend, 0))
    with pytest.raises(StateError):
        backend.prepare(PROMPT)
