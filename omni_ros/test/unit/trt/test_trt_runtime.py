"""TrtRunner (verify before deserialize, bind every I/O tensor), fallbacks, backend swapping."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omni_ros.core.errors import EngineError
from omni_ros.tensorrt.build import build_component
from omni_ros.tensorrt.cache import ENGINE_FILE, MANIFEST_FILE, EngineCache, Environment
from omni_ros.tensorrt.export import make_inputs
from omni_ros.tensorrt.runtime import TrtRunner, accelerate_backend, load_component_or_fallback
from trt_recording_double import RecordingTensorRTDouble

VERSION = "10.13.0.35"
HERE = Environment(VERSION, "8.9", "NVIDIA L4")


@pytest.fixture(scope="module")
def engines(tiny: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 engines of the three tiny components, built through the double, in one cache."""
    cache = EngineCache(tmp_path_factory.mktemp("engines"))
    paths = {}
    for name, (module, spec) in tiny.items():
        result = build_component(
            module,
            spec,
            precision="fp32",
            cache=cache,
            backend="tiny",
            model_revision="tiny-seed0",
            trt=RecordingTensorRTDouble(VERSION),
            env=HERE,
        )
        paths[name] = result.path
    return paths


def _runner(path: Path, trt: RecordingTensorRTDouble | None = None, **kw: Any) -> TrtRunner:
    return TrtRunner(
        path, trt=trt or RecordingTensorRTDouble(VERSION), env=HERE, device="cpu", **kw
    )


@pytest.mark.parametrize(
    ("component", "shapes"),
    [
        ("audio", {"mel": (1, 80, 100)}),
        ("audio", {"mel": (1, 80, 208)}),
        (
            "vocoder",
            {
                "x": (2, 80, 7),
                "mask": (2, 1, 7),
                "mu": (2, 80, 7),
                "t": (2,),
                "spks": (2, 80),
                "cond": (2, 80, 7),
            },
        ),
        (
            "vocoder",
            {
                "x": (2, 80, 120),
                "mask": (2, 1, 120),
                "mu": (2, 80, 120),
                "t": (2,),
                "spks": (2, 80),
                "cond": (2, 80, 120),
            },
        ),
    ],
)
def test_runner_binds_every_tensor_and_computes_what_torch_computes(
    tiny, engines, component: str, shapes: dict[str, tuple[int, ...]]
):
    module, spec = tiny[component]
    trt = RecordingTensorRTDouble(VERSION)
    runner = _runner(engines[component], trt)
    inputs = make_inputs(spec, shapes, seed=3)
    got = runner(*inputs)
    with torch.no_grad():
        want = module(*inputs)
    assert got.shape == want.shape
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-4)
    bound = [c[1] for c in trt.calls if c[0] == "IExecutionContext.set_tensor_address"]
    assert sorted(bound) == sorted(spec.input_names + spec.output_names)
    set_shapes = {c[1]: c[2] for c in trt.calls if c[0] == "IExecutionContext.set_input_shape"}
    assert set_shapes == shapes
    assert trt.names()[-1] == "IExecutionContext.execute_async_v3"


def test_runner_casts_inputs_to_the_engine_dtype_and_outputs_back(tiny, engines):
    module, spec = tiny["audio"]
    (mel,) = make_inputs(spec, "opt")
    out = _runner(engines["audio"])(mel.double())
    assert out.dtype == torch.float64
    with torch.no_grad():
        assert torch.allclose(out.float(), module(mel), atol=1e-4)


def test_a_shape_outside_the_profile_is_an_engine_error(engines):
    runner = _runner(engines["audio"])
    with pytest.raises(EngineError, match="outside the engine's profile"):
        runner(torch.zeros(1, 80, 400))


def test_the_wrong_number_of_inputs_is_an_engine_error(engines):
    with pytest.raises(EngineError, match="takes 6 inputs"):
        _runner(engines["vocoder"])(torch.zeros(2, 80, 10))


def test_a_tampered_engine_is_refused_before_deserialization(engines, tmp_path: Path):
    import shutil

    entry = tmp_path / engines["audio"].name
    shutil.copytree(engines["audio"], entry)
    data = bytearray((entry / ENGINE_FILE).read_bytes())
    data[-10] ^= 0xFF
    (entry / ENGINE_FILE).write_bytes(bytes(data))
    trt = RecordingTensorRTDouble(VERSION)
    with pytest.raises(EngineError, match="file altered"):
        _runner(entry, trt)
    assert trt.deserialized == 0
    assert "Runtime.deserialize_cuda_engine" not in trt.names()


def test_an_engine_the_runtime_cannot_deserialize_is_an_engine_error(engines):
    # The manifest says 10.13 and so does `env`, but the loaded library is another build.
    trt = RecordingTensorRTDouble("10.13.0.99")
    with pytest.raises(EngineError, match="could not deserialize"):
        TrtRunner(engines["audio"], trt=trt, env=HERE, device="cpu")


def test_load_uses_tensorrt_when_the_engine_matches(engines):
    runner, status = load_component_or_fallback(
        "audio",
        engines["audio"].parent,
        trt=RecordingTensorRTDouble(VERSION),
        env=HERE,
        device="cpu",
    )
    assert runner is not None
    assert status.using == "tensorrt"
    assert status.level() == 0
    assert engines["audio"].name in status.reason


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        (
            Environment("11.1.0.2", "8.9", "NVIDIA L4"),
            "stale: built for tensorrt_version 10.13.0.35",
        ),
        (Environment(VERSION, "9.0", "NVIDIA H100"), "stale: built for compute_capability 8.9"),
    ],
)
def test_a_stale_engine_falls_back_to_torch_with_the_reason(
    engines, caplog, env: Environment, reason: str
):
    trt = RecordingTensorRTDouble(env.tensorrt_version or VERSION)
    with caplog.at_level(logging.WARNING):
        runner, status = load_component_or_fallback(
            "audio", engines["audio"].parent, trt=trt, env=env
        )
    assert runner is None
    assert status.using == "torch"
    assert status.level() == 1
    assert reason in status.reason
    assert trt.deserialized == 0
    assert any(
        "using the torch path" in r.getMessage() and reason in r.getMessage()
        for r in caplog.records
    )


def test_a_manifest_mismatch_falls_back_to_torch(engines):
    runner, status = load_component_or_fallback(
        "audio",
        engines["audio"].parent,
        trt=RecordingTensorRTDouble(VERSION),
        env=HERE,
        expected={"model_revision": "tiny-seed1"},
    )
    assert runner is None
    assert "model_revision is 'tiny-seed0', expected 'tiny-seed1'" in status.reason


def test_missing_tensorrt_falls_back_to_torch(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    runner, status = load_component_or_fallback("vision", tmp_path)
    assert runner is None
    assert status.using == "torch"
    assert status.reason.startswith("TensorRT is not installed")


def test_no_engine_falls_back_to_torch_and_says_how_to_build_one(tmp_path: Path):
    runner, status = load_component_or_fallback(
        "vision", tmp_path, trt=RecordingTensorRTDouble(VERSION), env=HERE
    )
    assert runner is None
    assert "omni-ros engines build" in status.reason


def test_an_edited_manifest_falls_back_to_torch(engines, tmp_path: Path):
    import shutil

    entry = tmp_path / engines["audio"].name
    shutil.copytree(engines["audio"], entry)
    text = (entry / MANIFEST_FILE).read_text().replace('"fp32"', '"fp16"')
    (entry / MANIFEST_FILE).write_text(text)
    runner, status = load_component_or_fallback(
        "audio", tmp_path, trt=RecordingTensorRTDouble(VERSION), env=HERE
    )
    assert runner is None
    assert "manifest edited" in status.reason


class ComponentSwapBackendDouble:
    """Stands in for a backend's replace_component API (records what it was given)."""

    name = "tiny"

    def __init__(self) -> None:
        self.replaced: dict[str, Any] = {}

    def replace_component(self, name: str, fn: Any) -> None:
        self.replaced[name] = fn


def test_accelerate_backend_swaps_each_verified_component(tiny, engines):
    backend = ComponentSwapBackendDouble()
    statuses = accelerate_backend(
        backend,
        engines["audio"].parent,
        ["audio", "vocoder"],
        trt=RecordingTensorRTDouble(VERSION),
        env=HERE,
        device="cpu",
    )
    assert [(s.component, s.using) for s in statuses] == [
        ("audio", "tensorrt"),
        ("vocoder", "tensorrt"),
    ]
    module, spec = tiny["audio"]
    (mel,) = make_inputs(spec, "opt", seed=5)
    with torch.no_grad():
        assert torch.allclose(backend.replaced["audio"](mel), module(mel), atol=1e-4)


def test_accelerate_backend_only_uses_engines_built_for_that_backend(engines):
    backend = ComponentSwapBackendDouble()
    backend.name = "reference"  # the engines were built for backend "tiny"
    statuses = accelerate_backend(
        backend,
        engines["audio"].parent,
        ["audio"],
        trt=RecordingTensorRTDouble(VERSION),
        env=HERE,
        device="cpu",
    )
    assert statuses[0].using == "torch"
    assert "manifest backend is 'tiny'" in statuses[0].reason
    assert backend.replaced == {}


def test_accelerate_backend_keeps_torch_when_the_backend_cannot_swap(engines):
    statuses = accelerate_backend(object(), engines["audio"].parent, ["audio"])
    assert statuses[0].using == "torch"
    assert "cannot swap" in statuses[0].reason


def test_maybe_accelerate_is_a_no_op_when_disabled():
    from omni_ros.tensorrt.runtime import TensorRTConfig, maybe_accelerate

    backend = ComponentSwapBackendDouble()
    statuses = maybe_accelerate(backend, TensorRTConfig.from_mapping({"components": "audio"}))
    assert [(s.component, s.using, s.reason) for s in statuses] == [
        ("audio", "torch", "tensorrt.enabled is false")
    ]
    assert backend.replaced == {}


def test_tensorrt_config_rejects_unknown_keys_and_components():
    from omni_ros.core.errors import ConfigError
    from omni_ros.tensorrt.runtime import TensorRTConfig

    with pytest.raises(ConfigError, match="unknown TensorRTConfig parameter"):
        TensorRTConfig.from_mapping({"enable": True})
    with pytest.raises(ConfigError, match="unknown component"):
        TensorRTConfig.from_mapping({"components": "llm"})


def test_an_engine_whose_io_differs_from_its_manifest_is_an_engine_error(engines, tmp_path: Path):
    import dataclasses
    import shutil

    from omni_ros.tensorrt.cache import Manifest, TensorInfo

    entry = tmp_path / engines["audio"].name
    shutil.copytree(engines["audio"], entry)
    manifest = Manifest.from_json((entry / MANIFEST_FILE).read_text())
    wrong = dataclasses.replace(manifest, inputs=(TensorInfo("mel", "float16", (1, 80, "frames")),))
    (entry / MANIFEST_FILE).write_text(wrong.to_json())
    with pytest.raises(EngineError, match="differs from its manifest"):
        _runner(entry)


def test_a_directory_named_tensorrt_on_sys_path_counts_as_not_installed(
    monkeypatch, tmp_path: Path
):
    from omni_ros.tensorrt.build import import_tensorrt
    from omni_ros.tensorrt.cache import detect_environment

    (tmp_path / "tensorrt").mkdir()
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        import_tensorrt()
    assert detect_environment().tensorrt_version is None
    _, status = load_component_or_fallback("audio", tmp_path)
    assert status.reason.startswith("TensorRT is not installed")
