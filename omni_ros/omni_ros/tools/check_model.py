"""``omni-ros check-model``: the ``minicpmo`` adapter against a MiniCPM-o 4.5 remote-code folder.

What a team runs before pinning a new upstream revision. It needs no weights and no GPU: from the
remote code and tokenizer in ``--code DIR`` (a downloaded Hugging Face snapshot, weights not needed)
it builds the model with tiny random weights (a 2-layer Qwen3 LLM, tiny SigLIP, Whisper and TTS, the
real tokenizer vocabulary) on the CPU, then drives the real adapter
(:class:`~omni_ros.backends.minicpmo.MiniCPMOBackend`) through it and prints PASS/FAIL per check
and the per-unit time. Random weights decide nonsense, so the checks test mechanics (unit
accounting, caches, interrupts, result shapes), never what the model says.

The speech vocoder (stepaudio2 ``Token2wav``, which needs its asset files and CUDA) is replaced by
:class:`Token2wavDouble`, a named double: the audio lengths it yields follow the remote code's own
chunking and padding, not a real vocoder.

Security: this executes the Python files in DIR. It refuses to unless ``--trust-remote-code`` is
given, and, like the backend itself, it needs a ``--revision`` (the commit you reviewed; for a
Hugging Face cache snapshot folder it must be that folder's commit).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omni_ros.core.errors import BackendUnavailable, ConfigError, OmniError
from omni_ros.core.types import Unit, UnitResult

#: Files the remote code needs (``tokenizer.json`` may replace ``vocab.json`` + ``merges.txt``).
CODE_FILES = (
    "modeling_minicpmo.py",
    "configuration_minicpmo.py",
    "processing_minicpmo.py",
    "modeling_navit_siglip.py",
    "utils.py",
    "tokenization_minicpmo_fast.py",
    "tokenizer_config.json",
    "preprocessor_config.json",
)
#: What the remote code imports on the CPU (the vocoder's packages are not needed: it is a double).
CHECK_PACKAGES = {
    "torch": "torch",
    "transformers": "transformers (4.51.0, the remote code's pin)",
    "librosa": "librosa (imported by the remote code)",
    "soundfile": "soundfile (imported by the remote code)",
}
SAMPLE_RATE = 16_000
OUTPUT_RATE = 24_000
MAX_AUDIO_S = 10.0


@dataclass
class Check:
    """One PASS/FAIL line."""

    name: str
    passed: bool
    detail: str = ""


@dataclass
class Report:
    """Everything ``check-model`` found."""

    checks: list[Check] = field(default_factory=list)
    unit_ms: list[float] = field(default_factory=list)
    unit_cpu_ms: list[float] = field(default_factory=list)
    build_s: float = 0.0
    total_s: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)


# ----------------------------------------------------------------------------- vocoder double
class Token2wavDouble:
    """NOT stepaudio2's ``Token2wav``: a named double with the interface the remote code calls.

    ``set_stream_cache(path)`` (fails like the real one on a missing file), ``flow.pre_lookahead_len``
    and ``stream(tokens, prompt_wav, last_chunk)``, which returns int16 PCM bytes at 24 kHz: 960
    samples (40 ms, one 25 Hz speech token) per token it releases, holding back the lookahead unless
    ``last_chunk``. A quiet tone, so speech audio is non-zero.
    """

    SAMPLES_PER_TOKEN = OUTPUT_RATE // 25
    PRE_LOOKAHEAD = 3
    builds = 0

    def __init__(self) -> None:
        type(self).builds += 1
        self.flow = types.SimpleNamespace(pre_lookahead_len=self.PRE_LOOKAHEAD)
        self.cache: Any = None
        self.stream_cache: Any = None
        self.hift_cache_dict: Any = None
        self.voices: list[str] = []

    def set_stream_cache(self, prompt_wav_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        if not os.path.isfile(prompt_wav_path):
            raise FileNotFoundError(f"No such file or directory: {prompt_wav_path!r}")
        self.voices.append(prompt_wav_path)
        import torch

        # torch tensors: the remote code clones these with torch_clone_recursive (utils.py).
        return {"flow": torch.zeros(1)}, {"hift": torch.zeros(1)}

    def stream(
        self,
        tokens: list[int],
        prompt_wav: str | None = None,
        last_chunk: bool = False,
        return_waveform: bool = False,
    ) -> bytes:
        released = len(tokens) if last_chunk else max(0, len(tokens) - self.PRE_LOOKAHEAD)
        n = released * self.SAMPLES_PER_TOKEN
        t = np.arange(n, dtype=np.float64) / OUTPUT_RATE
        pcm = (0.1 * np.sin(2 * np.pi * 200.0 * t) * 32767).astype("<i2")
        return pcm.tobytes()


# ----------------------------------------------------------------------------- the remote code
def check_code_dir(code_dir: Path) -> None:
    """Raise :class:`ConfigError` naming every file the remote code needs that DIR lacks."""
    if not code_dir.is_dir():
        raise ConfigError(f"--code {str(code_dir)!r}: no such folder")
    missing = [name for name in CODE_FILES if not (code_dir / name).is_file()]
    has_tokenizer = (code_dir / "tokenizer.json").is_file() or (
        (code_dir / "vocab.json").is_file() and (code_dir / "merges.txt").is_file()
    )
    if not has_tokenizer:
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise ConfigError(
            f"--code {str(code_dir)!r} is not a MiniCPM-o 4.5 remote-code folder: it lacks "
            + ", ".join(missing)
        )


def import_remote_code(code_dir: Path) -> types.SimpleNamespace:
    """Import DIR's modules as one package (their relative imports need it); nothing is copied.

    The package name carries a hash of the folder path, so two folders never share modules.
    """
    check_code_dir(code_dir)
    digest = hashlib.sha256(str(code_dir.resolve()).encode()).hexdigest()[:12]
    name = f"_omni_ros_remote_minicpmo_{digest}"
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        package = importlib.util.module_from_spec(spec)
        package.__path__ = [str(code_dir.resolve())]
        sys.modules[name] = package
    try:
        return types.SimpleNamespace(
            configuration=importlib.import_module(f"{name}.configuration_minicpmo"),
            processing=importlib.import_module(f"{name}.processing_minicpmo"),
            tokenization=importlib.import_module(f"{name}.tokenization_minicpmo_fast"),
            modeling=importlib.import_module(f"{name}.modeling_minicpmo"),
        )
    except ImportError as exc:
        raise BackendUnavailable(
            f"the remote code in {str(code_dir)!r} does not import: {type(exc).__name__}: {exc}"
        ) from exc


def _tiny_config(code: types.SimpleNamespace, code_dir: Path, vocab: int) -> Any:
    """The folder's own config.json (token ids, options) with every size made tiny."""
    base: dict[str, Any] = {}
    config_file = code_dir / "config.json"
    if config_file.is_file():
        base = json.loads(config_file.read_text())
        for key in ("auto_map", "architectures", "torch_dtype", "quantization_config"):
            base.pop(key, None)
    tts = dict(base.get("tts_config") or {})
    tts.update(
        llm_dim=128,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_hidden_layers=2,
        num_key_value_heads=2,
        audio_tokenizer_type="s3tokenizer_step_audio",
    )
    # The TTS embeds the LLM's own token ids (MiniCPMODuplex._convert_results_to_tts_input).
    tts["num_text_tokens"] = max(int(tts.get("num_text_tokens", 0)), vocab)
    tts.setdefault("num_audio_tokens", 6562)
    tts.setdefault("audio_bos_token_id", vocab - 1)
    tts.setdefault("text_eos_token_id", vocab - 2)
    base.update(
        vocab_size=vocab,
        hidden_size=128,  # the resampler has hidden_size // 128 heads
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=16_384,
        vision_config={
            "hidden_size": 64,
            "image_size": 980,
            "intermediate_size": 128,
            "model_type": "siglip",
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "patch_size": 14,
        },
        audio_config={
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 256,  # the projector takes encoder_ffn_dim // 4 = d_model
            "num_mel_bins": 80,
            "max_source_positions": 1500,
            "decoder_layers": 1,
            "decoder_attention_heads": 2,
            "decoder_ffn_dim": 64,
        },
        tts_config=tts,
        attn_implementation="sdpa",
    )
    config = code.configuration.MiniCPMOConfig(**base)
    config._name_or_path = str(code_dir)
    return config


def build_tiny_model(code_dir: Path, *, seed: int = 0) -> Any:
    """The remote code's ``MiniCPMO`` with tiny random weights, its processor, and the vocoder double.

    ``init_tts`` (which ``as_duplex`` calls) installs a :class:`Token2wavDouble` instead of stepaudio2.
    """
    import torch

    code = import_remote_code(code_dir)
    tokenizer = code.tokenization.MiniCPMOTokenizerFast.from_pretrained(str(code_dir))
    preprocessor = json.loads((code_dir / "preprocessor_config.json").read_text())
    image_processor = code.processing.MiniCPMVImageProcessor(**preprocessor)
    audio_processor = code.processing.MiniCPMAAudioProcessor(
        feature_size=80, sampling_rate=SAMPLE_RATE
    )
    processor = code.processing.MiniCPMOProcessor(
        image_processor=image_processor,
        audio_processor=audio_processor,
        tokenizer=tokenizer,
        audio_pool_step=preprocessor.get("audio_pool_step", 5),
    )
    torch.manual_seed(seed)
    model = code.modeling.MiniCPMO(_tiny_config(code, code_dir, len(tokenizer))).eval()
    model.processor = processor

    def init_tts(self: Any, *args: Any, **kwargs: Any) -> Token2wavDouble:
        self.tts.audio_tokenizer = Token2wavDouble()
        return self.tts.audio_tokenizer

    model.init_tts = types.MethodType(init_tts, model)
    return model


# ----------------------------------------------------------------------------- scenarios
def make_unit(index: int, *, texts: tuple[str, ...] = (), seed: int = 0) -> Unit:
    """Unit ``index`` of a session: 1.035 s first, then 1 s; a voiced, speech-like signal."""
    n = 16_560 if index == 0 else 16_000
    start_ns = 0 if index == 0 else 1_035_000_000 + (index - 1) * 1_000_000_000
    rng = np.random.default_rng(seed * 1000 + index)
    t = np.arange(n) / SAMPLE_RATE + start_ns / 1e9
    phase = 2 * np.pi * np.cumsum(140.0 + 30.0 * np.sin(2 * np.pi * 0.7 * t)) / SAMPLE_RATE
    audio = 0.3 * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) * np.sin(phase)
    audio = audio + 0.01 * rng.standard_normal(n)
    return Unit(
        index=index,
        start_ns=start_ns,
        end_ns=start_ns + n * 1_000_000_000 // SAMPLE_RATE,
        audio=np.clip(audio, -1, 1).astype(np.float32),
        sample_rate=SAMPLE_RATE,
        texts=texts,
        user_speech=True,
    )


def well_formed(result: object) -> str:
    """What is wrong with ``result`` by the Backend contract's rules ("" when nothing is)."""
    if not isinstance(result, UnitResult):
        return f"generate() returned {type(result).__name__}"
    for stage, value in result.timings_ms.items():
        if not isinstance(value, float) or not math.isfinite(value) or value < 0:
            return f"timings_ms[{stage!r}] = {value!r}"
    if result.is_listen and (result.text or result.audio is not None):
        return "a listen unit carries text or audio"
    if result.audio is not None:
        audio = result.audio
        if audio.dtype != np.float32 or audio.ndim != 1 or audio.size == 0:
            return f"speech audio {audio.dtype} shape {audio.shape}"
        if not np.all(np.isfinite(audio)) or float(np.max(np.abs(audio))) > 1.0:
            return "speech audio not finite or outside [-1, 1]"
        if audio.size > MAX_AUDIO_S * OUTPUT_RATE:
            return f"{audio.size} samples of speech in one unit"
    return ""


class _Checker:
    def __init__(self, code_dir: Path, *, revision: str, units: int, seed: int) -> None:
        self.code_dir = code_dir
        self.revision = revision
        self.units = units
        self.seed = seed
        self.report = Report()
        self.tmp = tempfile.TemporaryDirectory(prefix="omni_ros_check_model_")
        self.voice = os.path.join(self.tmp.name, "voice.wav")
        self._write_voice()
        self.model: Any = None

    def _write_voice(self) -> None:
        from scipy.io import wavfile

        t = np.arange(SAMPLE_RATE * 2) / SAMPLE_RATE
        wavfile.write(
            self.voice, SAMPLE_RATE, (0.2 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
        )

    def check(self, name: str, passed: bool, detail: str = "") -> bool:
        self.report.checks.append(Check(name, bool(passed), detail))
        return bool(passed)

    @contextlib.contextmanager
    def scenario(self, name: str) -> Iterator[None]:
        """A scenario that raises is one FAIL with the error, and the others still run."""
        try:
            yield
        except Exception as exc:
            self.check(name, False, f"{type(exc).__name__}: {exc}")

    def backend(self, **overrides: Any) -> Any:
        from omni_ros.backends.minicpmo import MiniCPMOBackend, MiniCPMOConfig

        params: dict[str, Any] = {
            "model": str(self.code_dir),
            "revision": self.revision,
            "trust_remote_code": True,
            "device": "cpu",
            "force_listen_count": 0,
            # Greedy: deterministic, and it skips the 151k-token sort of top-p sampling (the
            # first session samples, as the default config does).
            "decode_mode": "greedy",
            "prepare_timeout_s": 120.0,
            "prefill_timeout_s": 60.0,
            "generate_timeout_s": 60.0,
        }
        params.update(overrides)
        return MiniCPMOBackend(MiniCPMOConfig.from_mapping(params), model=self.model)

    def run_unit(self, backend: Any, index: int, **kwargs: Any) -> UnitResult:
        started = time.perf_counter()
        cpu_started = time.process_time()
        backend.prefill(make_unit(index, seed=self.seed, **kwargs))
        result = backend.generate()
        self.report.unit_ms.append((time.perf_counter() - started) * 1000.0)
        self.report.unit_cpu_ms.append((time.process_time() - cpu_started) * 1000.0)
        problem = well_formed(result)
        if problem:
            raise AssertionError(f"unit {index}: {problem}")
        assert isinstance(result, UnitResult)
        return result

    # ---------------------------------------------------------------------------------- checks
    def run(self) -> Report:
        started = time.perf_counter()
        try:
            with self.scenario("load: tiny random-weight model from the remote code"):
                Token2wavDouble.builds = 0
                self.model = build_tiny_model(self.code_dir, seed=self.seed)
                self.report.build_s = time.perf_counter() - started
                backend = self.backend()
                self.check(
                    "load: tiny random-weight model from the remote code",
                    True,
                    f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.1f} M parameters, "
                    f"{self.report.build_s:.1f} s",
                )
                self.check(
                    "load: the vocoder is built once (as_duplex builds it)",
                    Token2wavDouble.builds == 1,
                    f"{Token2wavDouble.builds} build(s)",
                )
                backend.close()
            if self.model is None:
                return self.report
            for scenario in (
                self.units_without_voice,
                self.units_with_voice,
                self.api_facts,
                self.interrupt_mute,
                self.interrupt_reset,
                self.reset_forgets,
                self.ask,
                self.refused_settings,
                self.scripted_turn,
                self.turn_ending_in_a_listen,
            ):
                with self.scenario(scenario.__name__.replace("_", " ")):
                    scenario()
        finally:
            self.tmp.cleanup()
            self.report.total_s = time.perf_counter() - started
        return self.report

    def units_without_voice(self) -> None:
        backend = self.backend(decode_mode="sampling")
        try:
            backend.prepare("Streaming Omni Conversation.")
            results = [self.run_unit(backend, i) for i in range(self.units)]
            buffered = len(backend._duplex.audio_buffer)
            speech = [r for r in results if not r.is_listen]
            self.check(
                f"prepare without a voice: {self.units} units well-formed",
                True,
                f"{len(speech)} speech / {len(results) - len(speech)} listen",
            )
            self.check(
                "without a voice speech units carry no audio",
                all(r.audio is None for r in speech),
                f"{sum(r.audio is not None for r in speech)} with audio",
            )
            self.check(
                "the API keeps 80 samples buffered, no backlog grows",
                buffered == 80,
                f"{buffered} samples buffered after {self.units} units",
            )
        finally:
            backend.close()

    def units_with_voice(self) -> None:
        backend = self.backend(prompt_wav_path=self.voice)
        try:
            backend.prepare("Streaming Omni Conversation.")
            results = [self.run_unit(backend, i) for i in range(self.units)]
            lengths = [
                0 if r.audio is None else int(r.audio.size) for r in results if not r.is_listen
            ]
            first = next((i for i, r in enumerate(results) if not r.is_listen), None)
            detail = f"speech audio samples per unit: {lengths}"
            self.check(f"prepare with a voice: {self.units} units well-formed", True, detail)
            if first is not None:
                audio = results[first].audio
                self.check(
                    "the first speech unit of a turn returns 24,000 samples",
                    audio is not None and audio.size == OUTPUT_RATE,
                    f"{0 if audio is None else audio.size} samples",
                )
        finally:
            backend.close()
        missing = backend_error(lambda: self.backend(prompt_wav_path=self.voice + ".missing"))
        self.check(
            "a missing voice file is its own ConfigError",
            missing.startswith("ConfigError") and "prompt_wav_path" in missing,
            missing[:160],
        )

    def api_facts(self) -> None:
        """Facts of the raw API that the adapter relies on."""
        duplex = self.model.as_duplex(device="cpu")
        duplex.prepare(prefix_system_prompt="Streaming Omni Conversation.")
        before = duplex.decoder.get_cache_length()
        empty = duplex.streaming_prefill()
        after = duplex.decoder.get_cache_length()
        self.check(
            "API: a prefill with no input returns before feeding <unit>",
            empty["success"] is False and after == before,
            f"success={empty['success']}, KV {before} -> {after}",
        )
        duplex.streaming_prefill(audio_waveform=make_unit(0).audio)
        first_left = len(duplex.audio_buffer)
        duplex.streaming_generate(decode_mode="greedy")
        duplex.streaming_prefill(audio_waveform=make_unit(1).audio)
        second_left = len(duplex.audio_buffer)
        duplex.streaming_generate(decode_mode="greedy")
        self.check(
            "API: 16,480 of the first 16,560 samples consumed, 80 kept for good",
            first_left == 80 and second_left == 80,
            f"buffered after unit 0: {first_left}, after unit 1: {second_left}",
        )
        self.check(
            "API: decoder listen id vs loop listen id",
            True,
            f"decoder {duplex.decoder.listen_id}, loop {duplex.listen_token_id} "
            + (
                "(differ: listen_top_k / listen_prob_scale refused)"
                if duplex.decoder.listen_id != duplex.listen_token_id
                else "(same)"
            ),
        )
        duplex.set_session_stop()

    def _speak_then(self, backend: Any) -> int:
        """Run units until one is speech; returns the next unit index."""
        for index in range(self.units):
            if not self.run_unit(backend, index).is_listen:
                return index + 1
        raise AssertionError(f"no speech unit in {self.units} units")

    def interrupt_mute(self) -> None:
        backend = self.backend(prompt_wav_path=self.voice)
        try:
            backend.prepare("Streaming Omni Conversation.")
            index = self._speak_then(backend)
            backend.interrupt()
            after = self.run_unit(backend, index)
            rest = [self.run_unit(backend, i) for i in range(index + 1, index + 4)]
            self.check(
                "interrupt (mute): next unit is a listen that ends the turn",
                after.is_listen and after.end_of_turn,
                f"listen={after.is_listen} end_of_turn={after.end_of_turn}; then "
                f"{['listen' if r.is_listen else 'speech' for r in rest]} "
                f"({backend.speech_units_muted} muted)",
            )
        finally:
            backend.close()

    def interrupt_reset(self) -> None:
        backend = self.backend(prompt_wav_path=self.voice, interrupt_mode="reset")
        try:
            backend.prepare("Streaming Omni Conversation.")
            index = self._speak_then(backend)
            backend.interrupt()
            after = self.run_unit(backend, index)
            more = self.run_unit(backend, index + 1)
            self.check(
                "interrupt (reset): next unit is a listen that ends the turn, session re-prepared",
                after.is_listen and after.end_of_turn and backend._duplex.audio_chunk_idx == 2,
                f"listen={after.is_listen} end_of_turn={after.end_of_turn}, "
                f"API units since re-prepare: {backend._duplex.audio_chunk_idx}, "
                f"next unit {'listen' if more.is_listen else 'speech'}",
            )
        finally:
            backend.close()

    def _first_logits(self, backend: Any, *, texts: tuple[str, ...] = ()) -> Any:
        backend.prefill(make_unit(backend._caller_units, texts=texts, seed=self.seed))
        logits = backend._duplex.pending_logits.detach().clone()
        backend.generate()
        return logits

    def reset_forgets(self) -> None:
        backend = self.backend(decode_mode="greedy")
        try:
            backend.prepare("Streaming Omni Conversation.")
            fresh = self._first_logits(backend)
            for _ in range(3):
                self._first_logits(backend)
            backend.reset()
            backend.prepare("Streaming Omni Conversation.")
            again = self._first_logits(backend)
            delta = float((fresh - again).abs().max())
            # The raw API for comparison: prepare() alone keeps the Whisper streaming cache.
            duplex = backend._duplex
            for index in range(2):
                duplex.streaming_prefill(audio_waveform=make_unit(index + 1).audio)
                duplex.streaming_generate(decode_mode="greedy")
            duplex.prepare(prefix_system_prompt="Streaming Omni Conversation.")
            duplex.streaming_prefill(audio_waveform=make_unit(0, seed=self.seed).audio)
            raw = float((fresh - duplex.pending_logits).abs().max())
            duplex.streaming_generate(decode_mode="greedy")
            self.check(
                "reset: a fresh session decides the first unit as the first session did",
                delta == 0.0,
                f"max |logit difference| {delta:.3g} (API prepare() alone: {raw:.3g})",
            )
        finally:
            backend.close()

    def ask(self) -> None:
        backends = [self.backend(decode_mode="greedy") for _ in range(2)]
        try:
            logits: list[list[Any]] = []
            for n, backend in enumerate(backends):
                backend.prepare("Streaming Omni Conversation.")
                texts = ("Please describe what you see.",) if n else ()
                logits.append(
                    [
                        self._first_logits(backend),
                        self._first_logits(backend, texts=texts),
                        self._first_logits(backend),
                    ]
                )
            same_unit = float((logits[0][1] - logits[1][1]).abs().max())
            next_unit = float((logits[0][2] - logits[1][2]).abs().max())
            self.check(
                "Ask: injected text steers the next unit's decision (not its own)",
                same_unit == 0.0 and next_unit > 0.0,
                f"max |logit difference| in the unit carrying the text {same_unit:.3g}, "
                f"in the next unit {next_unit:.3g}",
            )
        finally:
            for backend in backends:
                backend.close()

    def _script_decoder(self, backend: Any, units: list[list[str]]) -> None:
        """Make the remote code's decoder sample these tokens, one list per unit (then listen).

        Random weights never end a turn; this drives the remote code's own duplex loop, TTS and
        vocoder chunking through a scripted turn. Only ``StreamDecoder.decode`` is replaced.
        """
        duplex = backend._duplex
        tokenizer = duplex.tokenizer
        queue: list[list[int]] = []
        for unit in units:
            ids: list[int] = []
            for token in unit:
                if token.startswith("<"):
                    ids.append(int(tokenizer.convert_tokens_to_ids(token)))
                else:
                    ids.extend(tokenizer.encode(" " + token, add_special_tokens=False))
            queue.append(ids)
        listen = [int(duplex.listen_token_id)]
        current: list[int] = []
        import torch

        def decode(logits: Any, **kwargs: Any) -> Any:
            nonlocal current
            if not current:
                current = queue.pop(0) if queue else list(listen)
            return torch.tensor([current.pop(0)], dtype=torch.long)

        duplex.decoder.decode = decode

    def scripted_turn(self) -> None:
        backend = self.backend(prompt_wav_path=self.voice)
        try:
            backend.prepare("Streaming Omni Conversation.")
            self._script_decoder(
                backend,
                [
                    ["<|speak|>", "Hello", "there", "<|chunk_eos|>"],
                    ["<|speak|>", "I", "see", "a", "cup", "<|chunk_eos|>"],
                    ["<|speak|>", "on", "the", "table", "<|turn_eos|>", "<|chunk_eos|>"],
                ],
            )
            results = [self.run_unit(backend, i) for i in range(4)]
            lengths = [0 if r.audio is None else int(r.audio.size) for r in results[:3]]
            ends = [r.end_of_turn for r in results]
            self.check(
                "scripted turn: speech, speech, last unit ends the turn, then listen",
                [r.is_listen for r in results] == [False, False, False, True]
                and ends == [False, False, True, False],
                f"texts {[r.text for r in results]}, end_of_turn {ends}",
            )
            self.check(
                "scripted turn: the last chunk of a turn is longer than one second",
                lengths[0] == OUTPUT_RATE and lengths[2] > OUTPUT_RATE,
                f"speech audio samples per unit: {lengths} (vocoder double)",
            )
        finally:
            backend.close()

    def turn_ending_in_a_listen(self) -> None:
        backend = self.backend(prompt_wav_path=self.voice)
        try:
            backend.prepare("Streaming Omni Conversation.")
            self._script_decoder(
                backend,
                [
                    ["<|speak|>", "Hello", "<|chunk_eos|>"],
                    ["<|speak|>", "goodbye", "now", "<|turn_eos|>", "<|listen|>"],
                ],
            )
            results = [self.run_unit(backend, i) for i in range(3)]
            closing = results[1]
            duplex = backend._duplex
            self.check(
                "<|turn_eos|><|listen|> in one unit: its words and end of turn are kept",
                not closing.is_listen
                and closing.end_of_turn
                and "goodbye" in closing.text
                and results[2].is_listen
                and duplex.tts_text_start_pos == 0
                and duplex.tts_past_key_values is None,
                f"unit 1: listen={closing.is_listen} text={closing.text!r} "
                f"end_of_turn={closing.end_of_turn}; TTS state reset: "
                f"{duplex.tts_text_start_pos == 0 and duplex.tts_past_key_values is None} "
                f"({backend.turn_ends_recovered} recovered)",
            )
        finally:
            backend.close()

    def refused_settings(self) -> None:
        for key, value in (("listen_top_k", 5), ("listen_prob_scale", 1.5)):
            error = backend_error(functools.partial(self.backend, **{key: value}))
            self.check(
                f"{key} with the wrong decoder listen id is refused",
                error.startswith("ConfigError") and key in error,
                error[:160],
            )


def backend_error(build: Callable[[], Any]) -> str:
    """``"ExcType: message"`` of what building (and preparing) a backend raises, "" if nothing."""
    try:
        backend = build()
        try:
            backend.prepare("Streaming Omni Conversation.")
        finally:
            backend.close()
    except OmniError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def run_checks(code_dir: Path, *, revision: str, units: int = 10, seed: int = 0) -> Report:
    """Build the tiny model from ``code_dir`` and run every check (see the module docstring)."""
    from omni_ros.backends.minicpmo import MiniCPMOConfig, missing_runtime_packages

    # The backend's own gate (trust_remote_code + revision; a cache snapshot must be that commit).
    MiniCPMOConfig.from_mapping(
        {"model": str(code_dir), "revision": revision, "trust_remote_code": True}
    )
    missing = missing_runtime_packages(CHECK_PACKAGES)
    if missing:
        raise BackendUnavailable(
            "check-model needs the remote code's CPU packages: missing "
            + "; ".join(missing)
            + " (pip install -r requirements/minicpmo.txt)"
        )
    return _Checker(code_dir, revision=revision, units=max(10, units), seed=seed).run()


def format_report(report: Report) -> str:
    lines = []
    for check in report.checks:
        mark = "PASS" if check.passed else "FAIL"
        lines.append(f"{mark}  {check.name}" + (f"  [{check.detail}]" if check.detail else ""))
    for label, values in (("wall", report.unit_ms), ("CPU", report.unit_cpu_ms)):
        if values:
            ms = sorted(values)
            p95 = ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)]
            lines.append(
                f"per unit, {label} time (prefill + generate, tiny random weights): median "
                f"{statistics.median(ms):.0f} ms, p95 {p95:.0f} ms over {len(ms)} units"
            )
    passed = sum(c.passed for c in report.checks)
    lines.append(
        f"{passed} passed, {len(report.checks) - passed} failed "
        f"(model built in {report.build_s:.1f} s, {report.total_s:.1f} s in all)"
    )
    return "\n".join(lines)


def add_subparser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``omni-ros check-model``."""
    p = sub.add_parser(
        "check-model",
        help="run the minicpmo adapter against a MiniCPM-o remote-code folder (tiny random weights, CPU)",
    )
    p.add_argument("--code", required=True, help="folder with the remote code and tokenizer")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="execute the Python files in --code (required: only for a folder you trust)",
    )
    p.add_argument(
        "--revision",
        default="",
        help="the commit of the remote code you reviewed (required, as for the backend)",
    )
    p.add_argument("--units", type=int, default=10, help="units per session (at least 10)")
    p.add_argument("--seed", type=int, default=0, help="random-weight seed")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")

    def run(args: argparse.Namespace) -> int:
        code_dir = Path(args.code).expanduser()
        if not args.trust_remote_code:
            raise ConfigError(
                f"check-model executes the Python files in {str(code_dir)!r}; pass "
                "--trust-remote-code (and --revision <commit you reviewed>) if you trust them"
            )
        if not args.revision.strip():
            raise ConfigError(
                "check-model needs --revision: the commit (40 hex digits) whose remote code you "
                "reviewed, as the minicpmo backend does"
            )
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        report = run_checks(code_dir, revision=args.revision, units=args.units, seed=args.seed)
        print(format_report(report))
        return 0 if report.passed else 1

    p.set_defaults(func=run)
