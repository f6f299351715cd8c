"""Tiny, seeded stand-ins for the three accelerated components, built from the same classes.

MiniCPM-o 4.5 uses transformers' SigLIP vision tower (``vpm``) and a Whisper encoder (``apm``);
these modules build those classes with tiny configs and seeded random weights so that export,
onnxruntime parity and the engine pipeline run on a CPU in seconds. They are not the model: they
share its tensor boundaries (see :mod:`omni_ros.tensorrt.specs`) and its layer types.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omni_ros.tensorrt.specs import (
    ComponentSpec,
    audio_spec,
    flow_estimator_spec,
    vision_spec,
)


@dataclasses.dataclass(frozen=True)
class TinySizes:
    """Sizes of the tiny stand-ins (the LLM width ``hidden`` is what the projectors map to)."""

    hidden: int = 48
    vision_width: int = 32
    audio_width: int = 32
    layers: int = 2
    heads: int = 2
    image_size: int = 448
    patch_size: int = 14
    queries: int = 16
    n_mels: int = 80
    flow_width: int = 32


def _sincos_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table [grid*grid, width] (what MiniCPM's resampler adds)."""
    quarter = width // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = []
    for axis in (yy.reshape(-1), xx.reshape(-1)):
        angles = axis[:, None] * omega[None, :]
        out += [angles.sin(), angles.cos()]
    table = torch.cat(out, dim=1)
    return F.pad(table, (0, width - table.shape[1]))


class TinyResampler(nn.Module):
    """Perceiver-style resampler: learned queries cross-attend to the patch features."""

    def __init__(self, in_width: int, hidden: int, queries: int, heads: int, grid: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, hidden) * 0.02)
        self.kv_proj = nn.Linear(in_width, hidden, bias=False)
        self.ln_q = nn.LayerNorm(hidden)
        self.ln_kv = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ln_post = nn.LayerNorm(hidden)
        self.proj = nn.Parameter(torch.randn(hidden, hidden) / math.sqrt(hidden))
        self.register_buffer("pos", _sincos_2d(hidden, grid), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(features))
        q = self.ln_q(self.query).unsqueeze(0).expand(features.shape[0], -1, -1)
        out, _ = self.attn(q, kv + self.pos, kv, need_weights=False)
        result: torch.Tensor = self.ln_post(out) @ self.proj
        return result


class TinyVisionEncoder(nn.Module):
    """SiglipVisionModel + resampler: pixel_values [B,3,S,S] -> [B,Q,H] (batch = slices)."""

    def __init__(self, sizes: TinySizes) -> None:
        super().__init__()
        from transformers.models.siglip import SiglipVisionConfig, SiglipVisionModel

        config = SiglipVisionConfig(  # type: ignore[no-untyped-call]
            hidden_size=sizes.vision_width,
            intermediate_size=2 * sizes.vision_width,
            num_hidden_layers=sizes.layers,
            num_attention_heads=sizes.heads,
            image_size=sizes.image_size,
            patch_size=sizes.patch_size,
        )
        self.vpm: Any = SiglipVisionModel(config)
        grid = sizes.image_size // sizes.patch_size
        self.resampler = TinyResampler(
            sizes.vision_width, sizes.hidden, sizes.queries, sizes.heads, grid
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vpm(pixel_values=pixel_values).last_hidden_state
        tokens: torch.Tensor = self.resampler(features)
        return tokens


class TinyAudioEncoder(nn.Module):
    """Whisper encoder + projector + 5x average pool: mel [1,n_mels,T] -> [1,T',H].

    The stock ``WhisperEncoder.forward`` insists on 3000 mel frames; MiniCPM-o's ``apm`` subclass
    runs it on one unit (~100 frames) instead, slicing the position table. This forward does the
    same with the stock submodules (conv1, conv2, embed_positions, layers, layer_norm), and pools
    after projecting, in MiniCPM-o's order.
    """

    def __init__(self, sizes: TinySizes) -> None:
        super().__init__()
        from transformers.models.whisper import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        config = WhisperConfig(  # type: ignore[no-untyped-call]
            num_mel_bins=sizes.n_mels,
            d_model=sizes.audio_width,
            encoder_layers=sizes.layers,
            encoder_attention_heads=sizes.heads,
            encoder_ffn_dim=2 * sizes.audio_width,
            max_source_positions=1500,
        )
        self.apm: Any = WhisperEncoder(config)
        self.projection = nn.Sequential(
            nn.Linear(sizes.audio_width, sizes.hidden),
            nn.ReLU(),
            nn.Linear(sizes.hidden, sizes.hidden),
        )
        self.pool = nn.AvgPool1d(5, stride=5)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return whisper_unit_forward(self.apm, self.projection, self.pool, mel)


def whisper_unit_forward(
    apm: Any, projection: nn.Module, pool: nn.Module, mel: torch.Tensor
) -> torch.Tensor:
    """Encode one unit of mel with a Whisper encoder's submodules, project, then pool over time."""
    x = F.gelu(apm.conv1(mel))
    x = F.gelu(apm.conv2(x)).permute(0, 2, 1)
    x = x + apm.embed_positions.weight[: x.shape[1]]
    for layer in apm.layers:
        out = layer(x, attention_mask=None, layer_head_mask=None)
        x = out[0] if isinstance(out, tuple) else out
    x = apm.layer_norm(x)
    x = projection(x)
    pooled: torch.Tensor = pool(x.transpose(1, 2))
    return pooled.transpose(1, 2)


class TinyFlowEstimator(nn.Module):
    """A small transformer with the flow-matching estimator's signature.

    ``forward(x, mask, mu, t, spks, cond) -> velocity [B,n_mels,T]``: x, mu, the broadcast speaker
    vector and cond are stacked into 4*n_mels channels (the ``[2,320,T]`` layout of the real
    estimator's input), a sinusoidal embedding of the ODE time ``t`` is added, one masked
    self-attention block runs, and the result is projected back to n_mels channels.
    """

    freqs: torch.Tensor

    def __init__(self, sizes: TinySizes) -> None:
        super().__init__()
        width = sizes.flow_width
        self.heads = sizes.heads
        self.inp = nn.Conv1d(4 * sizes.n_mels, width, 1)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.out = nn.Conv1d(width, sizes.n_mels, 1)
        half = width // 2
        self.register_buffer(
            "freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / half), persistent=False
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
    ) -> torch.Tensor:
        stacked = torch.cat([x, mu, spks.unsqueeze(-1).expand_as(x), cond], dim=1)
        h = self.inp(stacked).transpose(1, 2)  # [B,T,W]
        angles = 1000.0 * t[:, None] * self.freqs[None, :]
        h = h + self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=-1)).unsqueeze(1)
        b, n, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, n, self.heads, w // self.heads).transpose(1, 2)

        scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(w // self.heads)
        # Padded frames (mask 0) must not be attended to.
        scores = scores + (1.0 - mask.unsqueeze(1)) * -1e4
        att = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(b, n, w)
        h = h + self.attn_out(att)
        h = h + self.ff(self.norm2(h))
        velocity: torch.Tensor = self.out(h.transpose(1, 2)) * mask
        return velocity


def tiny_components(
    seed: int = 0, sizes: TinySizes | None = None
) -> dict[str, tuple[nn.Module, ComponentSpec]]:
    """Build the three tiny components (eval mode, seeded) with their specs."""
    sizes = sizes or TinySizes()
    torch.manual_seed(seed)
    vision = TinyVisionEncoder(sizes).eval()
    audio = TinyAudioEncoder(sizes).eval()
    flow = TinyFlowEstimator(sizes).eval()
    return {
        "vision": (
            vision,
            vision_spec(
                sizes.hidden, image_size=sizes.image_size, queries=sizes.queries, max_slices=4
            ),
        ),
        "audio": (audio, audio_spec(sizes.hidden, n_mels=sizes.n_mels)),
        "vocoder": (flow, flow_estimator_spec(n_mels=sizes.n_mels, frames=(4, 50, 200))),
    }
