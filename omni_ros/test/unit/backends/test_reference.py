"""The ``reference`` backend: the shared contract plus its own promises, with real tiny forward passes."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from omni_ros.backends.base import create_backend
from omni_ros.backends.reference import (
    ReferenceBackend,
    ReferenceConfig,
    cache_tensors,
    rotate_keys,
)
from omni_ros.backends.reference_model import TOKEN_IDS, build_model, dims_for
from omni_ros.core.errors import (
    BackendProtocolError,
    BackendUnavailable,
    ConfigError,
    StateError,
)
from omni_ros.core.types import Unit, UnitResult, VideoFrame
from unit.backends.contract import BackendContract, check_result, make_unit


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    # The test machine has two cores shared with other test runs.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_backend(**params: Any) -> ReferenceBackend:
    return ReferenceBackend(ReferenceConfig.from_mapping(params))


def run(
    backend: ReferenceBackend, n_units: int, start: int = 0, **unit_kwargs: Any
) -> list[UnitResult]:
    results = []
    for index in range(start, start + n_units):
        backend.prefill(make_unit(backend, index, **unit_kwargs))
        results.append(check_result(backend.generate()))
    return results


# -------------------------------------------------------------------------------------- contract
class TestReferenceScheduledContract(BackendContract):
    """The contract with a schedule that speaks, so interrupts hit a turn in progress."""

    @pytest.fixture
    def backend(self) -> Iterator[ReferenceBackend]:
        backend = make_backend(speak_schedule="SSSE")
        yield backend
        backend.close()


class TestReferenceFreeRunningContract(BackendContract):
    """The contract with listen/speak decided by the control-token logits alone."""

    @pytest.fixture
    def backend(self) -> Iterator[ReferenceBackend]:
        backend = make_backend(seed=7)
        yield backend
        backend.close()


# ----------------------------------------------------------------------------------- behaviour
def test_same_seed_gives_identical_results_and_another_seed_does_not() -> None:
    outputs = []
    for seed in (3, 3, 4):
        backend = make_backend(seed=seed, speak_schedule="LSE")
        backend.prepare("Streaming Omni Conversation.")
        outputs.append(run(backend, 6, speech=True, frames=1))
        backend.close()
    first, again, other = outputs
    for a, b in zip(first, again, strict=True):
        assert a.is_listen == b.is_listen
        assert a.text == b.text
        assert a.end_of_turn == b.end_of_turn
        assert (a.audio is None) == (b.audio is None)
        if a.audio is not None and b.audio is not None:
            np.testing.assert_array_equal(a.audio, b.audio)
    spoken = [r.audio for r in first if r.audio is not None]
    spoken_other = [r.audio for r in other if r.audio is not None]
    assert len(spoken) == len(spoken_other) > 0
    assert any(not np.array_equal(a, b) for a, b in zip(spoken, spoken_other, strict=True))


def test_sampling_mode_is_reproducible_with_the_same_seed() -> None:
    texts = []
    for _ in range(2):
        backend = make_backend(seed=11, decode_mode="sampling", speak_schedule="SSE")
        backend.prepare("hi")
        texts.append([r.text for r in run(backend, 6, speech=True)])
    assert texts[0] == texts[1]


def test_schedule_forces_speak_and_listen_whatever_the_logits_say() -> None:
    # A huge listen bias would make the model listen forever; the schedule overrides it.
    backend = make_backend(speak_schedule="L L S E", listen_bias=1e9)
    backend.prepare("hi")
    results = run(backend, 8, speech=True)
    assert [r.is_listen for r in results] == [True, True, False, False] * 2
    assert [r.end_of_turn for r in results] == [False, False, False, True] * 2


def test_listen_bias_decides_without_a_schedule() -> None:
    quiet = make_backend(listen_bias=1e9)
    quiet.prepare("hi")
    assert all(r.is_listen for r in run(quiet, 4, speech=True))
    chatty = make_backend(listen_bias=-1e9)
    chatty.prepare("hi")
    assert not run(chatty, 1, speech=True)[0].is_listen


def test_force_listen_units_silence_the_start_of_a_session() -> None:
    backend = make_backend(force_listen_units=2, speak_schedule="S")
    backend.prepare("hi")
    assert [r.is_listen for r in run(backend, 4)] == [True, True, False, False]


def test_a_turn_never_runs_longer_than_max_turn_units() -> None:
    backend = make_backend(listen_bias=-1e9, max_turn_units=3)
    backend.prepare("hi")
    run_length = 0
    for result in run(backend, 12):
        assert not result.is_listen
        run_length = 0 if result.end_of_turn else run_length + 1
        assert run_length < 3


def test_interrupt_closes_the_open_turn_and_the_schedule_resumes_after() -> None:
    backend = make_backend(speak_schedule="S")
    backend.prepare("hi")
    assert not run(backend, 1)[0].is_listen
    backend.interrupt()
    after = run(backend, 2, start=1)
    assert after[0].is_listen
    assert after[0].end_of_turn, "the interrupted turn is reported closed"
    assert not after[1].is_listen


def test_speaking_units_give_at_least_one_second_of_24khz_audio() -> None:
    backend = make_backend(speak_schedule="S")
    backend.prepare("hi")
    results = run(backend, 3, speech=True)
    assert backend.output_sample_rate == 24_000
    for result in results:
        assert result.audio is not None
        assert result.audio.size >= 24_000
        assert np.abs(result.audio).max() > 0.0
    # The 1.035 s first unit gets 26 speech tokens of 960 samples.
    assert results[0].audio is not None
    assert results[0].audio.size == 26 * 960


def test_speech_has_no_dc_offset_a_speaker_would_click_on() -> None:
    for seed in (0, 7):
        backend = make_backend(speak_schedule="S", seed=seed)
        backend.prepare("hi")
        for result in run(backend, 3, speech=True):
            assert result.audio is not None
            assert abs(float(result.audio.mean())) < 0.01
        backend.close()


def test_text_deltas_are_printable_strings() -> None:
    backend = make_backend(speak_schedule="SSE", max_speak_tokens_per_unit=12)
    backend.prepare("hi")
    spoken = [r.text for r in run(backend, 6) if not r.is_listen]
    assert spoken
    for text in spoken:
        assert isinstance(text, str)
        assert len(text) <= 12
        assert all(ch == "\n" or ch.isprintable() for ch in text)
    assert any(spoken)


def test_kv_cache_stays_within_the_sliding_window_and_keeps_the_prompt() -> None:
    window = 160
    backend = make_backend(
        speak_schedule="SSSEL", sliding_window_tokens=window, max_text_tokens_per_unit=16
    )
    backend.prepare("Streaming Omni Conversation.")
    prompt = backend.prompt_tokens
    prompt_keys = [k[:, :, :prompt].clone() for k, _ in cache_tensors(backend._session.cache)]
    appended = 0  # tokens each unit added, summed: far more than the window holds
    slides = 0
    for index in range(30):
        before = backend.kv_cache_tokens
        backend.prefill(make_unit(backend, index, frames=1, texts=("go",) if index == 9 else ()))
        appended += backend._session.spans[-1] if backend._session.spans else 0
        result = check_result(backend.generate())
        slides += backend.kv_cache_tokens < before
        assert prompt < backend.kv_cache_tokens <= window
        assert (result.audio is None) == result.is_listen
    assert appended > 3 * window
    assert slides > 0
    for kept, original in zip(cache_tensors(backend._session.cache), prompt_keys, strict=True):
        torch.testing.assert_close(kept[0][:, :, :prompt], original, rtol=0, atol=0)


def test_keep_tokens_slides_the_window_down_to_the_low_watermark() -> None:
    backend = make_backend(
        speak_schedule="L",
        sliding_window_tokens=200,
        sliding_window_keep_tokens=120,
        max_text_tokens_per_unit=8,
    )
    backend.prepare("hi")
    sizes = []
    for result_index in range(20):
        run(backend, 1, start=result_index)
        sizes.append(backend.kv_cache_tokens)
    assert max(sizes) <= 200
    drops = [a - b for a, b in itertools.pairwise(sizes) if b < a]
    assert drops, "the window slid"
    assert all(drop > 30 for drop in drops), "several units go at once, not one at a time"


def test_rotating_keys_back_equals_keys_at_the_earlier_position() -> None:
    backend = make_backend()
    rotary = backend.model.llm.model.rotary_emb
    head_dim = backend.dims.head_dim
    keys = torch.randn(1, 2, 5, head_dim)

    def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = rotary(x, positions[None])
        half = head_dim // 2
        rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        out: torch.Tensor = x * cos[:, None] + rotated_half * sin[:, None]
        return out

    positions = torch.arange(300, 305)
    shift = 217
    at_p = rope(keys, positions)
    cos, sin = rotary(keys, torch.tensor([[shift]]))
    back = rotate_keys(at_p, cos[0], sin[0])
    torch.testing.assert_close(back, rope(keys, positions - shift), rtol=1e-4, atol=1e-4)


def test_frames_of_any_size_are_resized_to_the_vision_input() -> None:
    backend = make_backend(max_frames_per_unit=4)
    seen: list[tuple[int, ...]] = []
    vision = backend.model.vision

    def spy(pixels: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(pixels.shape))
        out: torch.Tensor = vision(pixels)
        return out

    backend.replace_component("vision", spy)
    backend.prepare("hi")
    unit = make_unit(backend, 0)
    shapes = [(448, 448), (1, 1), (1080, 1920), (3, 999)]
    frames = tuple(
        VideoFrame(stamp_ns=i, rgb=np.full((*shape, 3), 40 * i, dtype=np.uint8))
        for i, shape in enumerate(shapes)
    )
    backend.prefill(
        Unit(0, unit.start_ns, unit.end_ns, unit.audio, unit.sample_rate, frames=frames)
    )
    check_result(backend.generate())
    size = backend.dims.image_size
    assert seen == [(4, 3, size, size)]


def test_more_frames_than_the_limit_keeps_the_newest() -> None:
    backend = make_backend(max_frames_per_unit=1)
    seen: list[torch.Tensor] = []
    vision = backend.model.vision

    def spy(pixels: torch.Tensor) -> torch.Tensor:
        seen.append(pixels)
        out: torch.Tensor = vision(pixels)
        return out

    backend.replace_component("vision", spy)
    backend.prepare("hi")
    unit = make_unit(backend, 0)
    frames = tuple(
        VideoFrame(stamp_ns=i, rgb=np.full((20, 20, 3), value, dtype=np.uint8))
        for i, value in enumerate((0, 255))
    )
    backend.prefill(
        Unit(0, unit.start_ns, unit.end_ns, unit.audio, unit.sample_rate, frames=frames)
    )
    assert len(seen) == 1
    assert seen[0].shape[0] == 1
    assert float(seen[0].min()) == pytest.approx(1.0)  # the white frame, (255/255 - 0.5) / 0.5


def test_a_replaced_vocoder_is_used_and_its_output_is_checked() -> None:
    backend = make_backend(speak_schedule="S")

    def silent(tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(1, tokens.shape[1] * 960, dtype=torch.float16)

    backend.replace_component("vocoder", silent)
    backend.prepare("hi")
    result = run(backend, 1)[0]
    assert result.audio is not None
    assert result.audio.dtype == np.float32
    assert not result.audio.any()

    wrong: Callable[[torch.Tensor], torch.Tensor] = lambda tokens: torch.zeros(1, 10)  # noqa: E731
    backend.replace_component("vocoder", wrong)
    backend.prefill(make_unit(backend, 1))
    with pytest.raises(BackendProtocolError):
        backend.generate()


def test_replace_component_rejects_unknown_names() -> None:
    backend = make_backend()
    with pytest.raises(ConfigError):
        backend.replace_component("llm", lambda x: x)


def test_component_modules_have_the_documented_shapes() -> None:
    backend = make_backend()
    model = backend.model
    dims = backend.dims
    with torch.inference_mode():
        vision = model.vision(torch.rand(2, 3, dims.image_size, dims.image_size))
        first = model.audio(model.mel(torch.zeros(16_560)))
        later = model.audio(torch.randn(1, dims.n_mels, 100))
        wave = model.vocoder(torch.randint(0, dims.speech_vocab, (1, 25)))
    assert vision.shape == (2, dims.vision_queries, dims.hidden)
    assert vision.dtype == torch.float32
    assert first.shape == (1, 10, dims.hidden)
    assert later.shape == (1, 10, dims.hidden)
    assert wave.shape == (1, 25 * 960)
    assert wave.dtype == torch.float32
    assert float(wave.abs().max()) <= 1.0


def test_mel_frontend_gives_100_frames_per_second() -> None:
    backend = make_backend()
    with torch.inference_mode():
        mel = backend.model.mel(torch.zeros(16_000))
    assert mel.shape == (1, backend.dims.n_mels, 100)


def test_full_config_has_minicpmo_dimensions_on_the_meta_device() -> None:
    dims = dims_for("full")
    assert (dims.image_size, dims.patch_size, dims.vision_hidden, dims.vision_layers) == (
        448,
        14,
        1152,
        27,
    )
    assert (dims.audio_hidden, dims.audio_layers, dims.audio_heads) == (1024, 24, 16)
    assert (dims.hidden, dims.llm_layers, dims.llm_heads, dims.llm_kv_heads) == (4096, 36, 32, 8)
    assert dims.llm_intermediate == 12_288
    model = build_model(dims, seed=0, device="meta")

    def millions(module: Any) -> float:
        return float(sum(p.numel() for p in module.parameters())) / 1e6

    assert 8_000 < millions(model.llm) < 8_400  # Qwen3-8B
    assert 400 < millions(model.vision.siglip) < 450  # SigLIP-400M
    assert 290 < millions(model.audio.encoder) < 320  # Whisper-medium encoder
    assert 250 < millions(model.speech_head) < 350  # ~0.3B speech decoder
    assert next(model.llm.parameters()).device.type == "meta"


def test_injected_text_enters_the_kv_cache() -> None:
    plain = make_backend(speak_schedule="L")
    told = make_backend(speak_schedule="L")
    for backend in (plain, told):
        backend.prepare("hi")
    plain.prefill(make_unit(plain, 0))
    told.prefill(make_unit(told, 0, texts=("look left",)))
    # <|im_start|> "user\n" text <|im_end|>
    assert told.kv_cache_tokens - plain.kv_cache_tokens == 2 + len("user\n") + len("look left")


def test_reference_voice_extends_the_fixed_prompt() -> None:
    backend = make_backend()
    backend.prepare("hi")
    without = backend.prompt_tokens
    voice = np.sin(np.arange(48_000) * 0.05).astype(np.float32) * 0.3
    backend.prepare("hi", ref_voice=voice)
    # 3 s of audio -> 10 tokens per second, plus <|audio_start|> and <|audio_end|>.
    assert backend.prompt_tokens - without == 2 + 30
    run(backend, 2)


def test_non_finite_samples_are_sanitised_not_fatal() -> None:
    backend = make_backend(speak_schedule="S")
    backend.prepare("hi")
    unit = make_unit(backend, 0)
    audio = unit.audio.copy()
    audio[::100] = np.nan
    backend.prefill(Unit(0, unit.start_ns, unit.end_ns, audio, unit.sample_rate))
    result = check_result(backend.generate())
    assert result.audio is not None


def test_prefill_twice_without_generate_raises_state_error() -> None:
    backend = make_backend()
    backend.prepare("hi")
    backend.prefill(make_unit(backend, 0))
    with pytest.raises(StateError):
        backend.prefill(make_unit(backend, 1))


def test_using_a_closed_backend_raises_state_error() -> None:
    backend = make_backend()
    backend.close()
    with pytest.raises(StateError):
        backend.prepare("hi")


def test_a_prompt_that_leaves_no_room_for_a_unit_is_a_config_error() -> None:
    backend = make_backend(sliding_window_tokens=100)
    with pytest.raises(ConfigError, match="sliding_window_tokens"):
        backend.prepare("hi")


def test_create_backend_builds_the_reference_by_name() -> None:
    backend = create_backend("reference", {"seed": 5, "speak_schedule": "SE"})
    assert isinstance(backend, ReferenceBackend)
    assert backend.config.speak_schedule == "SE"


@pytest.mark.parametrize(
    "params",
    [
        {"size": "huge"},
        {"speak_schedule": "LX"},
        {"speak_schedule": " "},
        {"dtype": "bfloat16"},  # half precision needs cuda
        {"device": "tpu"},
        {"decode_mode": "beam"},
        {"max_speak_tokens_per_unit": 0},
        {"sliding_window_tokens": 100, "sliding_window_keep_tokens": 200},
        {"seed": "zero"},
        {"unknown_key": 1},
    ],
)
def test_bad_config_values_are_config_errors(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ReferenceConfig.from_mapping(params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_a_gpu_is_reported_as_unavailable() -> None:
    backend = make_backend(device="cuda")
    with pytest.raises(BackendUnavailable, match="CUDA"):
        backend.prepare("hi")


def test_listen_units_feed_the_listen_token_into_the_next_prefill() -> None:
    backend = make_backend(speak_schedule="L")
    backend.prepare("hi")
    run(backend, 1)
    assert backend._session.pending_ids == [TOKEN_IDS["<|listen|>"]]


def test_a_scheduled_listen_in_mid_turn_closes_the_turn() -> None:
    backend = make_backend(speak_schedule="SL")
    backend.prepare("hi")
    spoken, heard = run(backend, 2)
    assert not spoken.is_listen
    assert not spoken.end_of_turn
    assert heard.is_listen
    assert heard.end_of_turn


def test_an_interrupt_arriving_while_speech_is_made_turns_that_unit_into_a_listen() -> None:
    backend = make_backend(speak_schedule="S")
    vocoder = backend.model.vocoder
    calls = 0

    def vocoder_then_barge_in(tokens: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 2:
            backend.interrupt()  # as if the session's thread barged in right now
        out: torch.Tensor = vocoder(tokens)
        return out

    backend.replace_component("vocoder", vocoder_then_barge_in)
    backend.prepare("hi")
    first, cut, resumed = run(backend, 3)
    assert not first.is_listen
    assert cut.is_listen
    assert cut.audio is None
    assert cut.text == ""
    assert cut.end_of_turn
    assert not resumed.is_listen, "the interrupt was consumed by the unit it cut"
