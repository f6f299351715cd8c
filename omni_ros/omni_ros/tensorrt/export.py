"""ONNX export of the accelerated components, checks, onnxruntime parity, and precision conversion.

The export uses ``torch.onnx.export`` with the TorchScript tracer (``dynamo=False``): the torch.export
based exporter needs ``onnxscript``, which this project does not depend on, and the tracer handles
the three components (static control flow) with dynamic batch / time axes. Every ONNX file is
written to a temporary name and moved into place, so a crashed export never leaves a half file
that a later build would hash and trust.

TensorRT 11 builds only strongly typed networks, so an fp16/bf16 engine needs an ONNX graph whose
float tensors already are fp16/bf16: :func:`convert_onnx_precision` rewrites initializers,
constants, casts and I/O of an fp32 export. TensorRT 10.x takes the fp32 graph plus a builder flag.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from omni_ros.core.errors import EngineError
from omni_ros.tensorrt.specs import (
    ComponentSpec,
    Shape,
    check_precision,
    flow_estimator_spec,
)

#: The lowest opset TensorRT 10/11's ONNX parser and our graphs (LayerNormalization) are tested with.
DEFAULT_OPSET = 17

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a spec dtype name."""
    return _TORCH_DTYPES[name]


def make_inputs(
    spec: ComponentSpec,
    shapes: Mapping[str, Shape] | str = "opt",
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """Example inputs for ``spec`` at ``shapes`` (or a profile point name), seeded.

    Floats are standard normal, except a ``mask`` (ones, its last frame zero when there are several,
    so masking is exercised) and a time ``t`` (uniform in [0, 1)); integers are uniform in
    [0, ``high``).
    """
    concrete = spec.profile_shapes(shapes) if isinstance(shapes, str) else dict(shapes)
    gen = torch.Generator().manual_seed(seed)
    tensors: list[torch.Tensor] = []
    for t in spec.inputs:
        shape = concrete[t.name]
        if t.dtype.startswith("int"):
            value = torch.randint(0, t.high, shape, generator=gen, dtype=torch_dtype(t.dtype))
        elif t.name == "mask":
            value = torch.ones(shape)
            if shape[-1] > 1:
                value[..., -1] = 0.0
        elif t.name == "t":
            value = torch.rand(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen)
        tensors.append(value.to(device))
    return tensors


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def export_onnx(
    module: nn.Module,
    spec: ComponentSpec,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    example_inputs: Sequence[torch.Tensor] | None = None,
) -> Path:
    """Export ``module`` (called as ``module(*inputs)``) to ONNX at ``path``, atomically.

    Args:
        module: The component in eval mode; its parameters' device is used for example inputs.
        spec: Names, dynamic axes and the profile whose ``opt`` shapes trace the graph.
        path: Destination ``.onnx`` file (parents are created).
        opset: ONNX opset (>= 17).
        example_inputs: Override the tracing inputs (must match ``spec``).

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        EngineError: the exporter failed (the message carries torch's reason).
    """
    if opset < DEFAULT_OPSET:
        raise EngineError(f"opset {opset} < {DEFAULT_OPSET}: TensorRT's parser needs 17+")
    path = Path(path)
    try:
        device = next(module.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    inputs = (
        tuple(example_inputs)
        if example_inputs is not None
        else tuple(make_inputs(spec, "opt", device=device))
    )
    tmp = _atomic_target(path)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer's deprecation notice and TracerWarnings about Python ints are expected here.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                inputs,
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                do_constant_folding=True,
            )
        os.replace(tmp, path)
    except Exception as exc:
        raise EngineError(f"ONNX export of {spec.name!r} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_onnx(path: str | Path, spec: ComponentSpec | None = None) -> None:
    """Run ``onnx.checker`` (full check, with strict shape inference) and compare I/O names.

    Raises:
        EngineError: the model is invalid or its inputs/outputs differ from ``spec``.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise EngineError(f"{path}: ONNX check failed: {exc}") from exc
    if spec is not None:
        model = onnx.load(str(path), load_external_data=False)
        inputs = [i.name for i in model.graph.input]
        outputs = [o.name for o in model.graph.output]
        if inputs != spec.input_names or outputs != spec.output_names:
            raise EngineError(
                f"{path}: I/O {inputs} -> {outputs} differ from the spec "
                f"{spec.input_names} -> {spec.output_names}"
            )


@dataclasses.dataclass(frozen=True)
class ParityResult:
    """torch vs onnxruntime on one set of input shapes."""

    shapes: dict[str, Shape]
    max_abs_error: float
    ok: bool


def onnxruntime_parity(
    module: nn.Module,
    spec: ComponentSpec,
    onnx_path: str | Path,
    shape_sets: Iterable[Mapping[str, Shape]],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    seed: int = 0,
) -> list[ParityResult]:
    """Run ``module`` (fp32, CPU) and the ONNX file (onnxruntime CPU) on the same inputs.

    Returns:
        One :class:`ParityResult` per shape set; ``ok`` means every output matched within
        ``atol + rtol * |torch|`` and had the same shape.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    results = []
    for shapes in shape_sets:
        inputs = make_inputs(spec, shapes, seed=seed)
        with torch.no_grad():
            expected = module(*inputs)
        expected_list = list(expected) if isinstance(expected, tuple) else [expected]
        feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)}
        got = session.run(spec.output_names, feeds)
        worst = 0.0
        ok = True
        for ref_t, out in zip(expected_list, got, strict=True):
            ref = ref_t.float().numpy()
            if ref.shape != out.shape:
                ok, worst = False, float("inf")
                break
            diff = np.abs(out.astype(np.float64) - ref)
            worst = max(worst, float(diff.max(initial=0.0)))
            ok = ok and bool(np.all(diff <= atol + rtol * np.abs(ref)))
        results.append(ParityResult(dict(shapes), worst, ok))
    return results


def convert_onnx_precision(src: str | Path, dst: str | Path, precision: str) -> Path:
    """Rewrite an fp32 ONNX graph so that every float32 tensor is ``precision`` (fp16 / bf16).

    This is what a strongly typed build (TensorRT 11) needs: it takes each tensor's type from the
    graph. Initializers, ``Constant``/``ConstantOfShape`` values, ``Cast(to=float)``, graph I/O and
    value_info change; integer tensors (shapes, token ids) do not. ``fp32`` copies the file.

    Raises:
        EngineError: the converted graph fails ``onnx.checker`` (with strict type inference).
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    check_precision(precision)
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    if precision != "fp32":
        target = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16

        def convert_tensor(tensor: Any) -> None:
            if tensor.data_type != TensorProto.FLOAT:
                return
            array = numpy_helper.to_array(tensor)
            if precision == "fp16":
                new = numpy_helper.from_array(array.astype(np.float16), tensor.name)
            else:
                import ml_dtypes

                new = numpy_helper.from_array(array.astype(ml_dtypes.bfloat16), tensor.name)
            tensor.CopyFrom(new)

        def convert_graph(graph: Any) -> None:
            for init in graph.initializer:
                convert_tensor(init)
            for value in (*graph.input, *graph.output, *graph.value_info):
                tt = value.type.tensor_type
                if tt.elem_type == TensorProto.FLOAT:
                    tt.elem_type = target
            for node in graph.node:
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        convert_tensor(attr.t)
                    elif attr.type == onnx.AttributeProto.GRAPH:
                        convert_graph(attr.g)
                    elif attr.type == onnx.AttributeProto.GRAPHS:
                        for sub in attr.graphs:
                            convert_graph(sub)
                    elif (
                        node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT
                    ):
                        attr.i = target

        convert_graph(model.graph)
    tmp = _atomic_target(dst)
    try:
        onnx.save(model, str(tmp))
        try:
            # Opset-17 schemas omit bfloat16 for some ops (Conv, ...); TensorRT's parser accepts
            # them in strongly typed networks, so bf16 graphs get the structural check only.
            onnx.checker.check_model(str(tmp), full_check=precision != "bf16")
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise EngineError(f"{precision} conversion of {src} is invalid: {exc}") from exc
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


# --- Wrappers around the real MiniCPM-o 4.5 submodules (need the weights; GPU test only) ----------


def _patchify(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """[B,3,S,S] -> [B,3,patch,N*patch]: MiniCPM-V's ``reshape_by_patch`` layout for ``vpm``."""
    b, c = pixel_values.shape[:2]
    cols = torch.nn.functional.unfold(pixel_values, (patch, patch), stride=(patch, patch))
    n = cols.shape[-1]
    return (
        cols.reshape(b, c, patch, patch, n).permute(0, 1, 2, 4, 3).reshape(b, c, patch, n * patch)
    )


class MiniCPMOVisionSlice(nn.Module):
    """``vpm`` + ``resampler`` of MiniCPM-o 4.5 on whole 448x448 slices: [B,3,448,448] -> [B,64,H].

    Every slice is full size, so the patch attention mask is all ones and ``tgt_sizes`` is the
    constant patch grid; the vision tower runs in its own dtype (bf16) and the output is fp32.
    """

    def __init__(self, model: Any, image_size: int = 448, patch: int = 14) -> None:
        super().__init__()
        # The remote-code submodules are untyped: Any keeps mypy honest about what we know.
        self.vpm: Any = model.vpm
        self.resampler: Any = model.resampler
        self.patch = patch
        self.grid = image_size // patch

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b = pixel_values.shape[0]
        dtype = next(self.vpm.parameters()).dtype
        patches = _patchify(pixel_values, self.patch).to(dtype)
        n = self.grid * self.grid
        mask = torch.ones(b, 1, n, dtype=torch.bool, device=pixel_values.device)
        tgt = torch.tensor([[self.grid, self.grid]], dtype=torch.int32, device=pixel_values.device)
        tgt_sizes = tgt.expand(b, 2)
        features = self.vpm(
            patches, patch_attention_mask=mask, tgt_sizes=tgt_sizes
        ).last_hidden_state
        out: torch.Tensor = self.resampler(features, tgt_sizes)
        return out.float()


class MiniCPMOAudioUnit(nn.Module):
    """``apm`` + ``audio_projection_layer`` + ``audio_avg_pooler`` for one unit: [1,80,T] -> [1,T',H].

    This is the stateless encoder pass (no Whisper KV carried between units): the engine replaces
    the per-unit encoder call; the streaming KV reset at 1,500 positions stays in torch.
    """

    def __init__(self, model: Any, encoder_layer: int = -1) -> None:
        super().__init__()
        self.apm: Any = model.apm
        self.projection: Any = model.audio_projection_layer
        self.pool: Any = model.audio_avg_pooler
        self.encoder_layer = encoder_layer

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        dtype = next(self.apm.parameters()).dtype
        states = self.apm(mel.to(dtype), output_hidden_states=True).hidden_states[
            self.encoder_layer
        ]
        tokens = self.projection(states)
        pooled: torch.Tensor = self.pool(tokens.transpose(1, 2))
        return pooled.transpose(1, 2).float()


class MiniCPMOFlowEstimator(nn.Module):
    """One ODE step of ``tts.audio_tokenizer.flow``'s estimator (CosyVoice-style signature).

    The estimator's exact forward (and its streaming ``forward_chunk`` caches) is unverified without
    the weights: this wraps the cache-free ``estimator(x, mask, mu, t, spks, cond)`` call and casts
    to the estimator's dtype and back.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        flow = model.tts.audio_tokenizer.flow
        self.estimator: Any = (
            getattr(getattr(flow, "decoder", flow), "estimator", None) or flow.estimator
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
        dtype = next(self.estimator.parameters()).dtype
        args = [a.to(dtype) for a in (x, mask, mu, t, spks, cond)]
        out: torch.Tensor = self.estimator(*args)
        return out.float()


def minicpmo_components(
    model: Any, components: Sequence[str], *, max_slices: int = 10
) -> dict[str, tuple[nn.Module, ComponentSpec]]:
    """Wrappers + specs for the real model (LLM width read from ``model.llm.config.hidden_size``)."""
    from omni_ros.tensorrt.specs import audio_spec, vision_spec

    hidden = int(model.llm.config.hidden_size)
    table: dict[str, Any] = {
        "vision": lambda: (MiniCPMOVisionSlice(model), vision_spec(hidden, max_slices=max_slices)),
        "audio": lambda: (MiniCPMOAudioUnit(model), audio_spec(hidden)),
        "vocoder": lambda: (MiniCPMOFlowEstimator(model), flow_estimator_spec()),
    }
    return {name: table[name]() for name in components}


# --- The reference backend (seeded random weights; see omni_ros.backends.reference) -------------


def reference_components(
    backend: Any, components: Sequence[str], *, max_slices: int = 10
) -> dict[str, tuple[nn.Module, ComponentSpec]]:
    """``backend.model.vision/audio/vocoder`` with specs from the backend's dimensions.

    The audio encoder accepts up to ``2 * audio_positions`` mel frames (one unit, 104); the
    vocoder profile covers 1..52 speech tokens (two units' worth; 26 is one unit's maximum).
    """
    from omni_ros.tensorrt.specs import audio_spec, token_vocoder_spec, vision_spec

    dims = backend.dims
    model = backend.model
    table: dict[str, Any] = {
        "vision": lambda: (
            model.vision,
            vision_spec(
                dims.hidden,
                image_size=dims.image_size,
                queries=dims.vision_queries,
                max_slices=max_slices,
            ),
        ),
        "audio": lambda: (
            model.audio,
            audio_spec(dims.hidden, n_mels=dims.n_mels, frames=(10, 100, 2 * dims.audio_positions)),
        ),
        "vocoder": lambda: (model.vocoder, token_vocoder_spec(vocab=dims.speech_vocab)),
    }
    return {name: table[name]() for name in components}


def model_revision(backend: Any) -> str:
    """What identifies a backend's weights, recorded in manifests and required to match at load.

    The reference backend's weights are a function of (size, seed); for other backends the
    configured ``revision`` (or, failing that, the ``model`` path) is used.
    """
    config = getattr(backend, "config", None)
    if getattr(backend, "name", None) == "reference" and config is not None:
        return f"reference-{config.size}-seed{config.seed}"
    for attr in ("revision", "model"):
        value = getattr(config, attr, None)
        if value:
            return str(value)
    return "unknown"
