"""ONNX export of the tiny components (SigLIP / Whisper classes) and of the reference backend's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from omni_ros.core.errors import EngineError
from omni_ros.tensorrt.export import (
    MiniCPMOAudioUnit,
    MiniCPMOVisionSlice,
    _patchify,
    check_onnx,
    convert_onnx_precision,
    export_onnx,
    make_inputs,
    onnxruntime_parity,
)
from omni_ros.tensorrt.specs import vision_spec
from torch import nn


def _flow_shapes(frames: int) -> dict[str, tuple[int, ...]]:
    return {
        "x": (2, 80, frames),
        "mask": (2, 1, frames),
        "mu": (2, 80, frames),
        "t": (2,),
        "spks": (2, 80),
        "cond": (2, 80, frames),
    }


SHAPE_SETS: dict[str, list[dict[str, tuple[int, ...]]]] = {
    "vision": [{"pixel_values": (n, 3, 448, 448)} for n in (1, 2, 3)],
    "audio": [{"mel": (1, 80, t)} for t in (100, 104, 150, 208)],
    "vocoder": [_flow_shapes(t) for t in (4, 50, 173)],
}


@pytest.mark.parametrize("component", ["vision", "audio", "vocoder"])
def test_export_passes_onnx_checker_and_matches_torch_at_several_shapes(
    component: str, tiny: dict[str, Any], exported: dict[str, Path]
):
    module, spec = tiny[component]
    check_onnx(exported[component], spec)
    results = onnxruntime_parity(
        module, spec, exported[component], SHAPE_SETS[component], atol=1e-4
    )
    assert [r.shapes for r in results] == SHAPE_SETS[component]
    bad = [(r.shapes, r.max_abs_error) for r in results if not r.ok]
    assert not bad, bad


def test_exported_vision_graph_keeps_the_slice_axis_dynamic(exported: dict[str, Path]):
    model = onnx.load(str(exported["vision"]))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "slices"
    assert [d.dim_value for d in dims[1:]] == [3, 448, 448]


def test_exported_audio_output_has_ten_tokens_per_unit(
    tiny: dict[str, Any], exported: dict[str, Path]
):
    import onnxruntime as ort

    _, spec = tiny["audio"]
    session = ort.InferenceSession(str(exported["audio"]), providers=["CPUExecutionProvider"])
    (mel,) = make_inputs(spec, {"mel": (1, 80, 104)})
    (tokens,) = session.run(None, {"mel": mel.numpy()})
    assert tokens.shape == (1, 10, 48)


def test_parity_detects_a_graph_that_differs_from_the_module(
    tiny: dict[str, Any], exported: dict[str, Path]
):
    module, spec = tiny["audio"]
    other = type(module)(
        __import__("omni_ros.tensorrt.tiny", fromlist=["TinySizes"]).TinySizes()
    ).eval()
    results = onnxruntime_parity(other, spec, exported["audio"], SHAPE_SETS["audio"][:1])
    assert not results[0].ok


@pytest.mark.parametrize("component", ["vision", "audio", "vocoder"])
def test_fp16_conversion_makes_every_float_tensor_half_and_stays_close_to_torch(
    component: str, tiny: dict[str, Any], exported: dict[str, Path], tmp_path: Path
):
    import onnxruntime as ort

    module, spec = tiny[component]
    path = convert_onnx_precision(exported[component], tmp_path / "half.onnx", "fp16")
    model = onnx.load(str(path))
    floats = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert floats == []
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    options = ort.SessionOptions()
    # onnxruntime's CPU graph optimizer crashes on some fp16 fusions; plain kernels run fine.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = make_inputs(spec, "opt", seed=1)
    feeds = {t.name: x.numpy().astype(np.float16) for t, x in zip(spec.inputs, inputs, strict=True)}
    (got,) = session.run(None, feeds)
    with torch.no_grad():
        ref = module(*inputs).numpy()
    scale = float(np.abs(ref).max())
    assert float(np.abs(got.astype(np.float32) - ref).max()) < 0.02 * scale


def test_bf16_conversion_keeps_integer_tensors(tmp_path: Path):
    from omni_ros.tensorrt.specs import token_vocoder_spec

    class Lookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(16, 4)

        def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
            return self.embed(token_ids).sum(-1)

    spec = token_vocoder_spec(vocab=16, tokens=(1, 4, 8))
    src = export_onnx(Lookup().eval(), spec, tmp_path / "lookup.onnx")
    model = onnx.load(str(convert_onnx_precision(src, tmp_path / "bf16.onnx", "bf16")))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    assert model.graph.initializer[0].data_type == onnx.TensorProto.BFLOAT16


def test_check_onnx_rejects_io_names_that_differ_from_the_spec(exported: dict[str, Path]):
    with pytest.raises(EngineError, match="differ from the spec"):
        check_onnx(exported["audio"], vision_spec(48))


def test_a_failed_export_raises_engine_error_and_leaves_no_file(
    tiny: dict[str, Any], tmp_path: Path
):
    _, spec = tiny["vision"]

    class Broken(nn.Module):
        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    with pytest.raises(EngineError, match="boom"):
        export_onnx(Broken(), spec, tmp_path / "v.onnx")
    assert list(tmp_path.iterdir()) == []


def test_patchify_lays_patches_out_like_minicpm_v_reshape_by_patch():
    image = torch.arange(2 * 3 * 28 * 28, dtype=torch.float32).reshape(2, 3, 28, 28)
    out = _patchify(image, 14)
    assert out.shape == (2, 3, 14, 4 * 14)
    # Patch n (row-major over the 2x2 grid) occupies columns n*14 .. n*14+13.
    for n, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        patch = image[:, :, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14]
        assert torch.equal(out[:, :, :, n * 14 : (n + 1) * 14], patch)


class MiniCPMOModelDouble(nn.Module):
    """Stands in for MiniCPM-o's submodules, recording the arguments the wrappers pass."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, Any] = {}
        outer = self

        class Vpm(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.w = nn.Parameter(torch.ones(1, dtype=torch.bfloat16))

            def forward(
                self, x: torch.Tensor, patch_attention_mask: torch.Tensor, tgt_sizes: torch.Tensor
            ) -> Any:
                outer.seen["vpm"] = (
                    x.shape,
                    x.dtype,
                    patch_attention_mask.shape,
                    tgt_sizes.tolist(),
                )
                n = patch_attention_mask.shape[-1]
                return type(
                    "Out", (), {"last_hidden_state": torch.zeros(x.shape[0], n, 8, dtype=x.dtype)}
                )()

        class Apm(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.w = nn.Parameter(torch.ones(1))

            def forward(self, mel: torch.Tensor, output_hidden_states: bool) -> Any:
                t = (mel.shape[-1] + 1) // 2
                states = (torch.zeros(1, t, 4), torch.ones(1, t, 4))
                return type("Out", (), {"hidden_states": states})()

        self.vpm = Vpm()
        self.resampler = lambda x, tgt: torch.zeros(x.shape[0], 64, 6, dtype=x.dtype)
        self.apm = Apm()
        self.audio_projection_layer = nn.Linear(4, 6)
        self.audio_avg_pooler = nn.AvgPool1d(5, stride=5)


def test_minicpmo_vision_wrapper_passes_full_slices_with_a_constant_grid():
    model = MiniCPMOModelDouble()
    out = MiniCPMOVisionSlice(model)(torch.zeros(3, 3, 448, 448))
    shape, dtype, mask_shape, tgt = model.seen["vpm"]
    assert shape == (3, 3, 14, 1024 * 14)
    assert dtype == torch.bfloat16
    assert mask_shape == (3, 1, 1024)
    assert tgt == [[32, 32]] * 3
    assert out.shape == (3, 64, 6)
    assert out.dtype == torch.float32


def test_minicpmo_audio_wrapper_projects_the_last_layer_then_pools_by_five():
    model = MiniCPMOModelDouble()
    out = MiniCPMOAudioUnit(model)(torch.zeros(1, 80, 104))
    assert out.shape == (1, 10, 6)
    expected = model.audio_projection_layer(torch.ones(1, 4))  # last hidden state is all ones
    assert torch.allclose(out[0, 0], expected[0], atol=1e-6)
