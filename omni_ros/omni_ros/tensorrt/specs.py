"""What an accelerated component looks like at its tensor boundary: names, dtypes, shape profiles.

A :class:`ComponentSpec` is the single description shared by every stage: the ONNX export names its
inputs/outputs and dynamic axes from it, the engine builder turns its profile into TensorRT
optimization profiles, the cache hashes the profile into the engine key, and the runtime checks the
engine's I/O against it. This module imports nothing heavy (no torch, no onnx, no tensorrt), so the
cache and the CLI can use it on any machine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from omni_ros.core.errors import ConfigError

#: Components this package knows how to accelerate (the ``--components`` vocabulary).
COMPONENTS: tuple[str, ...] = ("vision", "audio", "vocoder")

#: Engine precisions. ``fp32`` is allowed for debugging parity on the GPU.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")

#: dtype names used in specs and manifests (numpy/torch spelling).
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "int64", "int32", "bool")

#: The float dtype an engine of each precision exchanges when its ONNX graph is converted.
PRECISION_FLOAT_DTYPE: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

Dim = int | str
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One named input or output tensor.

    Attributes:
        name: The tensor name in ONNX and in the engine.
        dtype: One of :data:`DTYPES` (the fp32 export's dtype; converted graphs swap float32).
        shape: Dimensions; a ``str`` names a dynamic axis (``"batch"``, ``"frames"``).
        high: For integer inputs, the exclusive upper bound of valid values (example inputs).
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    high: int = 2

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"tensor {self.name!r}: dtype {self.dtype!r} not in {DTYPES}")

    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> axis name for every dynamic dimension."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclasses.dataclass(frozen=True)
class ProfileShape:
    """TensorRT optimization-profile shapes of one input: smallest, tuned-for and largest."""

    name: str
    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise ConfigError(f"profile {self.name!r}: min/opt/max ranks differ")
        for lo, mid, hi in zip(self.min, self.opt, self.max, strict=True):
            if not 0 < lo <= mid <= hi:
                raise ConfigError(
                    f"profile {self.name!r}: need 0 < min <= opt <= max per axis, got "
                    f"{self.min} / {self.opt} / {self.max}"
                )

    def as_json(self) -> dict[str, list[int]]:
        """A JSON-friendly form (lists, fixed key order) used in manifests and cache keys."""
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """The tensor boundary of one accelerated component.

    Attributes:
        name: One of :data:`COMPONENTS`.
        inputs: Input tensors, in the order the torch module's ``forward`` takes them.
        outputs: Output tensors, in the order the module returns them.
        profile: One :class:`ProfileShape` per input that has a dynamic axis.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profile: tuple[ProfileShape, ...]

    def __post_init__(self) -> None:
        if self.name not in COMPONENTS:
            raise ConfigError(f"unknown component {self.name!r}; known: {COMPONENTS}")
        by_name = {t.name: t for t in self.inputs}
        for p in self.profile:
            spec = by_name.get(p.name)
            if spec is None:
                raise ConfigError(f"{self.name}: profile names unknown input {p.name!r}")
            if len(spec.shape) != len(p.opt):
                raise ConfigError(f"{self.name}: profile rank of {p.name!r} != input rank")
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, int) and not p.min[axis] == p.opt[axis] == p.max[axis] == dim:
                    raise ConfigError(
                        f"{self.name}: profile of {p.name!r} varies static axis {axis} (= {dim})"
                    )
        missing = [
            t.name
            for t in self.inputs
            if t.dynamic_axes() and t.name not in {p.name for p in self.profile}
        ]
        if missing:
            raise ConfigError(f"{self.name}: dynamic inputs without a profile: {missing}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes`` argument."""
        axes = {t.name: t.dynamic_axes() for t in (*self.inputs, *self.outputs)}
        return {name: a for name, a in axes.items() if a}

    def profile_shapes(self, which: str) -> dict[str, Shape]:
        """Concrete input shapes at ``which`` in ("min", "opt", "max"); static inputs as declared."""
        if which not in ("min", "opt", "max"):
            raise ValueError(which)
        shapes: dict[str, Shape] = {}
        by_profile = {p.name: p for p in self.profile}
        for t in self.inputs:
            p = by_profile.get(t.name)
            shapes[t.name] = getattr(p, which) if p else tuple(int(d) for d in t.shape)
        return shapes

    def profile_json(self) -> dict[str, dict[str, list[int]]]:
        """Profiles keyed by input name (sorted), as stored in manifests and hashed into keys."""
        return {p.name: p.as_json() for p in sorted(self.profile, key=lambda p: p.name)}


def profile_from_json(data: Mapping[str, Any]) -> tuple[ProfileShape, ...]:
    """Inverse of :meth:`ComponentSpec.profile_json`."""
    return tuple(
        ProfileShape(name, tuple(v["min"]), tuple(v["opt"]), tuple(v["max"]))
        for name, v in data.items()
    )


def parse_components(text: str | Sequence[str]) -> tuple[str, ...]:
    """Parse ``"vision,audio"`` (or a list) into known component names, order kept, no repeats."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for raw in items:
        name = raw.strip()
        if not name:
            continue
        if name not in COMPONENTS:
            raise ConfigError(f"unknown component {name!r}; choose from {', '.join(COMPONENTS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ConfigError(f"no component given; choose from {', '.join(COMPONENTS)}")
    return tuple(names)


def check_precision(precision: str) -> str:
    """Return ``precision`` if known, else raise :class:`ConfigError`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return precision


# --- Spec factories for the model boundaries described in docs/BACKEND_MINICPMO.md -----------------


def vision_spec(
    hidden: int, *, image_size: int = 448, queries: int = 64, max_slices: int = 10
) -> ComponentSpec:
    """Vision encoder + resampler on whole slices: pixels [slices,3,S,S] -> tokens [slices,Q,H].

    MiniCPM-o cuts an image into at most 9 slices plus the overview (``max_slice_nums``), so the
    profile covers 1..``max_slices`` slices and is tuned for one (the usual camera frame).
    """
    return ComponentSpec(
        name="vision",
        inputs=(TensorSpec("pixel_values", "float32", ("slices", 3, image_size, image_size)),),
        outputs=(TensorSpec("vision_tokens", "float32", ("slices", queries, hidden)),),
        profile=(
            ProfileShape(
                "pixel_values",
                (1, 3, image_size, image_size),
                (1, 3, image_size, image_size),
                (max_slices, 3, image_size, image_size),
            ),
        ),
    )


def audio_spec(
    hidden: int, *, n_mels: int = 80, frames: tuple[int, int, int] = (100, 104, 208)
) -> ComponentSpec:
    """Audio encoder + projector for one unit: mel [1,n_mels,T] -> tokens [1,T',H].

    MiniCPM-o feeds 102 mel frames for the first unit and 104 after (100 + 2-frame margins); the
    default profile covers up to two units so a backlog can be encoded in one call.
    """
    lo, opt, hi = frames
    return ComponentSpec(
        name="audio",
        inputs=(TensorSpec("mel", "float32", (1, n_mels, "frames")),),
        outputs=(TensorSpec("audio_tokens", "float32", (1, "tokens", hidden)),),
        profile=(ProfileShape("mel", (1, n_mels, lo), (1, n_mels, opt), (1, n_mels, hi)),),
    )


def flow_estimator_spec(
    *, n_mels: int = 80, batch: int = 2, frames: tuple[int, int, int] = (10, 100, 1000)
) -> ComponentSpec:
    """The token2wav flow-matching estimator (one ODE step): the CosyVoice-style signature
    ``estimator(x, mask, mu, t, spks, cond) -> velocity`` with batch 2 for classifier-free guidance.
    """
    lo, opt, hi = frames

    def mel(name: str) -> TensorSpec:
        return TensorSpec(name, "float32", (batch, n_mels, "frames"))

    def mel_profile(name: str, channels: int) -> ProfileShape:
        return ProfileShape(
            name, (batch, channels, lo), (batch, channels, opt), (batch, channels, hi)
        )

    return ComponentSpec(
        name="vocoder",
        inputs=(
            mel("x"),
            TensorSpec("mask", "float32", (batch, 1, "frames")),
            mel("mu"),
            TensorSpec("t", "float32", (batch,)),
            TensorSpec("spks", "float32", (batch, n_mels)),
            mel("cond"),
        ),
        outputs=(TensorSpec("velocity", "float32", (batch, n_mels, "frames")),),
        profile=(
            mel_profile("x", n_mels),
            mel_profile("mask", 1),
            mel_profile("mu", n_mels),
            mel_profile("cond", n_mels),
        ),
    )


def token_vocoder_spec(
    *, vocab: int, samples_per_token: int = 960, tokens: tuple[int, int, int] = (1, 26, 52)
) -> ComponentSpec:
    """A token -> waveform vocoder (the reference backend's): ids [1,N] -> samples [1,N*960]."""
    lo, opt, hi = tokens
    return ComponentSpec(
        name="vocoder",
        inputs=(TensorSpec("token_ids", "int64", (1, "tokens"), high=vocab),),
        outputs=(TensorSpec("waveform", "float32", (1, "samples")),),
        profile=(ProfileShape("token_ids", (1, lo), (1, opt), (1, hi)),),
    )
