"""The networks of the ``reference`` backend: MiniCPM-o 4.5's shape of computation, random weights.

Everything here is built from configuration with seeded random initialisation (never
``from_pretrained``): it computes what the real model computes, at the same sizes for ``full``, but
what it says is meaningless. The backend logic (units, KV cache, listen/speak) lives in
:mod:`omni_ros.backends.reference`.

Component boundaries (the TensorRT helper exports these to ONNX; all are ``nn.Module``):

============  ==================================================  ==============================
component     input                                               output
============  ==================================================  ==============================
``vision``    pixel_values float32 ``[B, 3, S, S]`` (S = image    float32 ``[B, Q, H]``
              size, SigLIP normalisation: ``(x/255 - 0.5)/0.5``)
``audio``     log-mel float32 ``[1, n_mels, T]``, ``T <= 2 *``    float32 ``[1, ceil(T/2)//5, H]``
              ``audio_positions`` (100 frames per second)         (10 tokens per second)
``vocoder``   speech token ids int64 ``[1, N]``                   float32 ``[1, N * 960]`` (24 kHz)
============  ==================================================  ==============================

Q is ``vision_queries`` (64 in MiniCPM-o), H the LLM width. The LLM is a plain
``transformers.Qwen3ForCausalLM`` (``ReferenceModel.llm``) and the speech-token head
``ReferenceModel.speech_head`` maps LLM hidden states ``[1, n, H]`` to speech-token logits.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.whisper import modeling_whisper

# transformers' classes have untyped constructors and dynamic attributes: handle them as Any.
_HF: Any = transformers
_WhisperEncoder: Any = modeling_whisper.WhisperEncoder

#: Output audio rate and samples per speech token: 25 speech tokens per second at 24 kHz.
OUTPUT_SAMPLE_RATE = 24_000
SAMPLES_PER_SPEECH_TOKEN = 960
SPEECH_TOKENS_PER_S = OUTPUT_SAMPLE_RATE // SAMPLES_PER_SPEECH_TOKEN
#: Audio frontend: 16 kHz in, 10 ms hop -> 100 mel frames per second, Whisper pools x2 then x5.
INPUT_SAMPLE_RATE = 16_000
MEL_HOP = 160
MEL_N_FFT = 400
AUDIO_POOL = 5

# Byte-level vocabulary: ids 0-255 are bytes; the control tokens follow.
N_BYTES = 256
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<unit>",
    "</unit>",
    "<|listen|>",
    "<|speak|>",
    "<|chunk_eos|>",
    "<|turn_eos|>",
    "<|tts_bos|>",
    "<image>",
    "</image>",
    "<|audio_start|>",
    "<|audio_end|>",
)
TOKEN_IDS: dict[str, int] = {name: N_BYTES + i for i, name in enumerate(SPECIAL_TOKENS)}


@dataclass(frozen=True)
class ModelDims:
    """Every size of the reference networks. :func:`dims_for` gives the two presets."""

    # Vision: SigLIP + resampler.
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    vision_queries: int
    # Audio: Whisper encoder + pool + projector.
    n_mels: int
    audio_positions: int  # encoder positions per call (mel frames / 2)
    audio_hidden: int
    audio_layers: int
    audio_heads: int
    audio_ffn: int
    # LLM: Qwen3.
    vocab_size: int
    hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    head_dim: int
    llm_intermediate: int
    # Speech: token head + vocoder.
    speech_vocab: int
    speech_hidden: int
    speech_layers: int
    speech_heads: int
    speech_ffn: int
    vocoder_channels: int
    vocoder_strides: tuple[int, ...] = (8, 6, 4, 5)


def dims_for(size: str) -> ModelDims:
    """``tiny`` (CPU tests, a few ms per unit) or ``full`` (MiniCPM-o 4.5 sizes, GPU only)."""
    if size == "tiny":
        return ModelDims(
            image_size=56,
            patch_size=14,
            vision_hidden=64,
            vision_layers=2,
            vision_heads=2,
            vision_intermediate=128,
            vision_queries=16,
            n_mels=80,
            audio_positions=52,
            audio_hidden=64,
            audio_layers=2,
            audio_heads=2,
            audio_ffn=128,
            vocab_size=288,
            hidden=128,
            llm_layers=2,
            llm_heads=4,
            llm_kv_heads=2,
            head_dim=32,
            llm_intermediate=256,
            speech_vocab=256,
            speech_hidden=64,
            speech_layers=2,
            speech_heads=2,
            speech_ffn=128,
            vocoder_channels=32,
        )
    if size == "full":
        return ModelDims(
            # SigLIP-400M so400m-patch14 at 448 (1024 patches) + 64-query resampler.
            image_size=448,
            patch_size=14,
            vision_hidden=1152,
            vision_layers=27,
            vision_heads=16,
            vision_intermediate=4304,
            vision_queries=64,
            # Whisper-medium encoder, fed one unit (104 mel frames -> 52 positions) at a time.
            n_mels=80,
            audio_positions=52,
            audio_hidden=1024,
            audio_layers=24,
            audio_heads=16,
            audio_ffn=4096,
            # Qwen3-8B.
            vocab_size=151_936,
            hidden=4096,
            llm_layers=36,
            llm_heads=32,
            llm_kv_heads=8,
            head_dim=128,
            llm_intermediate=12_288,
            # ~0.3B speech-token decoder (18 decoder layers of width 1024) and a HiFi-GAN-sized vocoder.
            speech_vocab=6561,
            speech_hidden=1024,
            speech_layers=18,
            speech_heads=16,
            speech_ffn=4096,
            vocoder_channels=512,
        )
    raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")


# ------------------------------------------------------------------------------------- vision
class Resampler(nn.Module):
    """Q learned queries cross-attend to the vision patches and come out at LLM width."""

    def __init__(self, vision_hidden: int, hidden: int, queries: int, heads: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, hidden) * 0.02)
        self.kv_proj = nn.Linear(vision_hidden, hidden, bias=False)
        self.ln_q = nn.LayerNorm(hidden)
        self.ln_kv = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ln_post = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(patches))
        q = self.ln_q(self.query).unsqueeze(0).expand(patches.shape[0], -1, -1)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        result: torch.Tensor = self.proj(self.ln_post(out))
        return result


class VisionEncoder(nn.Module):
    """SigLIP vision tower + resampler: pixel_values ``[B, 3, S, S]`` -> ``[B, Q, H]`` float32."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.image_size = dims.image_size
        self.siglip: Any = _HF.SiglipVisionModel(
            _HF.SiglipVisionConfig(
                hidden_size=dims.vision_hidden,
                intermediate_size=dims.vision_intermediate,
                num_hidden_layers=dims.vision_layers,
                num_attention_heads=dims.vision_heads,
                image_size=dims.image_size,
                patch_size=dims.patch_size,
                vision_use_head=False,
            )
        )
        self.resampler = Resampler(
            dims.vision_hidden, dims.hidden, dims.vision_queries, max(1, dims.hidden // 64)
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.resampler.query.dtype
        patches = self.siglip(pixel_values=pixel_values.to(dtype)).last_hidden_state
        out: torch.Tensor = self.resampler(patches)
        return out.float()


# -------------------------------------------------------------------------------------- audio
class AudioEncoder(nn.Module):
    """Whisper encoder -> average pool 5 -> Linear-ReLU-Linear: mel ``[1, n_mels, T]`` -> ``[1, T', H]``.

    Whisper's forward insists on exactly ``2 * audio_positions`` mel frames, so a unit's
    ``T <= 2 * audio_positions`` frames are right-padded with the quietest value of the input and
    only the ``ceil(T / 2)`` positions that saw real frames are pooled (``T' = ceil(T/2) // 5``: 10 for
    the 100 frames of a 1 s unit).
    """

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.n_frames = 2 * dims.audio_positions
        self.encoder: Any = _WhisperEncoder(
            _HF.WhisperConfig(
                num_mel_bins=dims.n_mels,
                d_model=dims.audio_hidden,
                encoder_layers=dims.audio_layers,
                encoder_attention_heads=dims.audio_heads,
                encoder_ffn_dim=dims.audio_ffn,
                max_source_positions=dims.audio_positions,
            )
        )
        self.pool = nn.AvgPool1d(AUDIO_POOL, stride=AUDIO_POOL)
        self.projection = nn.Sequential(
            nn.Linear(dims.audio_hidden, dims.hidden),
            nn.ReLU(),
            nn.Linear(dims.hidden, dims.hidden),
        )

    def param_dtype(self) -> torch.dtype:
        """The dtype the encoder runs in (its parameters')."""
        return next(self.projection.parameters()).dtype

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        dtype = self.param_dtype()
        frames = mel.shape[-1]
        floor = mel.amin(dim=(1, 2), keepdim=True)
        pad = floor.expand(mel.shape[0], mel.shape[1], self.n_frames - frames)
        padded = torch.cat([mel, pad], dim=-1)
        hidden = self.encoder(padded.to(dtype)).last_hidden_state
        valid = hidden[:, : (frames + 1) // 2]
        pooled = self.pool(valid.transpose(1, 2)).transpose(1, 2)
        out: torch.Tensor = self.projection(pooled)
        return out.float()


class LogMel(nn.Module):
    """Whisper-style log-mel (n_fft 400, hop 160 at 16 kHz): ``n`` samples -> ``n // 160`` frames."""

    filters: torch.Tensor
    window: torch.Tensor

    def __init__(self, n_mels: int) -> None:
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        filters = mel_filter_bank(
            num_frequency_bins=1 + MEL_N_FFT // 2,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=8000.0,
            sampling_rate=INPUT_SAMPLE_RATE,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer(
            "filters", torch.tensor(filters.T, dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "window", torch.hann_window(MEL_N_FFT, dtype=torch.float32), persistent=False
        )

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """``audio`` float32 ``[n]`` -> log-mel ``[1, n_mels, n // 160]``."""
        spec = torch.stft(
            audio.float(), MEL_N_FFT, MEL_HOP, window=self.window, center=True, return_complex=True
        )
        power = spec[..., :-1].abs() ** 2  # the centred STFT has one frame too many
        mel = self.filters @ power
        log = torch.clamp(mel, min=1e-10).log10()
        log = torch.maximum(log, log.max() - 8.0)
        return ((log + 4.0) / 4.0).unsqueeze(0)


# ------------------------------------------------------------------------------------- speech
class SpeechTokenHead(nn.Module):
    """LLM hidden states ``[1, n, H]`` -> speech-token logits ``[1, T, V]`` (T learned queries).

    A transformer decoder: T query positions (25 per second of speech) attend to each other and to
    the hidden states of the tokens the LLM spoke in this unit.
    """

    max_tokens = 64

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.in_proj = nn.Linear(dims.hidden, dims.speech_hidden)
        self.queries = nn.Parameter(torch.randn(self.max_tokens, dims.speech_hidden) * 0.02)
        layer = nn.TransformerDecoderLayer(
            dims.speech_hidden,
            dims.speech_heads,
            dims.speech_ffn,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, dims.speech_layers)
        self.norm = nn.LayerNorm(dims.speech_hidden)
        self.out = nn.Linear(dims.speech_hidden, dims.speech_vocab)

    def forward(self, hidden: torch.Tensor, n_tokens: int) -> torch.Tensor:
        dtype = self.out.weight.dtype
        memory = self.in_proj(hidden.to(dtype))
        queries = self.queries[:n_tokens].unsqueeze(0).expand(hidden.shape[0], -1, -1)
        logits: torch.Tensor = self.out(self.norm(self.decoder(queries, memory)))
        return logits.float()


class Vocoder(nn.Module):
    """Speech token ids int64 ``[1, N]`` -> 24 kHz waveform float32 ``[1, N * 960]`` in [-1, 1].

    Embedding -> conv -> four transposed-conv upsamplers (x8, x6, x4, x5 = x960) each followed by a
    residual conv -> conv to one channel -> tanh.
    """

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        channels = dims.vocoder_channels
        self.strides = dims.vocoder_strides
        assert math.prod(self.strides) == SAMPLES_PER_SPEECH_TOKEN
        self.embed = nn.Embedding(dims.speech_vocab, channels)
        self.pre = nn.Conv1d(channels, channels, 7, padding=3)
        self.ups = nn.ModuleList()
        self.res = nn.ModuleList()
        for stride in self.strides:
            out = max(channels // 2, 8)
            self.ups.append(nn.ConvTranspose1d(channels, out, 2 * stride, stride, stride // 2))
            self.res.append(nn.Conv1d(out, out, 3, padding=1))
            channels = out
        self.post = nn.Conv1d(channels, 1, 7, padding=3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.pre(self.embed(tokens).transpose(1, 2))
        length = tokens.shape[-1]
        for stride, up, res in zip(self.strides, self.ups, self.res, strict=True):
            length = length * stride
            # kernel 2s / padding s//2 overshoots by s % 2 samples: crop to exactly length * s.
            x = up(nn.functional.leaky_relu(x, 0.1))[..., :length]
            x = x + res(nn.functional.leaky_relu(x, 0.1))
        y = self.post(nn.functional.leaky_relu(x, 0.1))
        # Random weights leave a DC offset (~0.1-0.2) that a real speaker turns into clicks at every
        # turn boundary: remove it per call (one call = one unit's speech).
        wave = torch.tanh(y - y.mean(dim=-1, keepdim=True))
        return wave[:, 0].float()


# --------------------------------------------------------------------------------------- whole
class ReferenceModel(nn.Module):
    """All reference networks: ``vision``, ``audio``, ``mel``, ``llm``, ``speech_head``, ``vocoder``."""

    def __init__(self, dims: ModelDims, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.dims = dims
        self.vision = VisionEncoder(dims)
        self.audio = AudioEncoder(dims)
        self.mel = LogMel(dims.n_mels)
        llm_config = _HF.Qwen3Config(
            vocab_size=dims.vocab_size,
            hidden_size=dims.hidden,
            intermediate_size=dims.llm_intermediate,
            num_hidden_layers=dims.llm_layers,
            num_attention_heads=dims.llm_heads,
            num_key_value_heads=dims.llm_kv_heads,
            head_dim=dims.head_dim,
            max_position_embeddings=40_960,
            tie_word_embeddings=False,
            # Our own sliding window (whole units, prompt kept) replaces Qwen's attention window.
            use_sliding_window=False,
            sliding_window=None,
        )
        llm_config._attn_implementation = attn_implementation
        self.llm: Any = _HF.Qwen3ForCausalLM(llm_config)
        self.speech_head = SpeechTokenHead(dims)
        self.vocoder = Vocoder(dims)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily make ``dtype`` the default, so big models are allocated in it directly."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    dims: ModelDims,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> ReferenceModel:
    """Build :class:`ReferenceModel` with seeded random weights directly on ``device`` in ``dtype``.

    The global RNG is forked, so building a model never disturbs the caller's random state. On the
    ``meta`` device nothing is allocated (used to check the full-size dimensions cheaply).
    """
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device), default_dtype(dtype):
            model = ReferenceModel(dims, attn_implementation)
    return model.eval()
