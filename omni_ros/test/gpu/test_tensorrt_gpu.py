"""TensorRT engines on a real GPU: build, verify, run with torch CUDA buffers, swap into a backend.

Runs where CUDA and the ``tensorrt`` Python package (10.x or 11.x) are available; skips with the
reason otherwise (no machine of this project has TensorRT: its wheels download from NVIDIA's index).
With ``OMNI_ROS_MINICPMO_PATH`` set to a local MiniCPM-o 4.5 folder it also exports and builds the
real model's vision and audio components (the flow estimator wrapper is unverified: see export.py).

    pytest omni_ros/test/gpu/test_tensorrt_gpu.py -m gpu
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest


def _skip_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install tensorrt from NVIDIA's index)"
    try:
        from omni_ros.tensorrt.build import import_tensorrt, tensorrt_major

        major = tensorrt_major(import_tensorrt().__version__)
    except Exception as exc:
        return f"TensorRT does not import: {exc}"
    if major < 10:
        return f"TensorRT {major}.x found; 10.x or 11.x is required"
    return None


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason())),
]

COMPONENTS = ["vision", "audio", "vocoder"]


@pytest.fixture(scope="module")
def backend() -> Any:
    from omni_ros.backends.reference import ReferenceBackend, ReferenceConfig

    return ReferenceBackend(
        ReferenceConfig(size="tiny", seed=0, device="cuda", dtype="float32", speak_schedule="LSE")
    )


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def engines(
    request: pytest.FixtureRequest, backend: Any, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    from omni_ros.tensorrt.build import build_component
    from omni_ros.tensorrt.cache import EngineCache
    from omni_ros.tensorrt.export import model_revision, reference_components

    root = tmp_path_factory.mktemp(f"engines-{request.param}")
    cache = EngineCache(root)
    for _name, (module, spec) in reference_components(backend, COMPONENTS, max_slices=3).items():
        build_component(
            module,
            spec,
            precision=request.param,
            cache=cache,
            backend="reference",
            model_revision=model_revision(backend),
        )
    return request.param, root


def test_engines_match_torch_on_cuda_buffers(backend: Any, engines: tuple[str, Path]) -> None:
    import torch
    from omni_ros.tensorrt.export import make_inputs, reference_components
    from omni_ros.tensorrt.runtime import load_component_or_fallback

    precision, root = engines
    tolerance = 1e-3 if precision == "fp32" else 5e-2
    for name, (module, spec) in reference_components(backend, COMPONENTS).items():
        runner, status = load_component_or_fallback(name, root)
        assert runner is not None, status.reason
        for which in ("min", "opt", "max"):
            inputs = make_inputs(spec, which, device="cuda")
            with torch.no_grad():
                want = module(*inputs)
            got = runner(*inputs)
            torch.cuda.synchronize()
            scale = float(want.abs().max()) or 1.0
            assert float((got - want).abs().max()) <= tolerance * scale, (name, which)


def test_a_tampered_engine_is_refused_on_the_gpu(engines: tuple[str, Path], tmp_path: Path) -> None:
    import shutil

    from omni_ros.core.errors import EngineError
    from omni_ros.tensorrt.cache import ENGINE_FILE, EngineCache
    from omni_ros.tensorrt.runtime import TrtRunner

    _, root = engines
    entry = tmp_path / EngineCache(root).entries()[0].name
    shutil.copytree(EngineCache(root).entries()[0], entry)
    data = bytearray((entry / ENGINE_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (entry / ENGINE_FILE).write_bytes(bytes(data))
    with pytest.raises(EngineError, match="file altered"):
        TrtRunner(entry)


def test_accelerated_reference_backend_runs_units(engines: tuple[str, Path]) -> None:
    from omni_ros.backends.reference import ReferenceBackend, ReferenceConfig
    from omni_ros.tensorrt.runtime import accelerate_backend
    from unit.backends.contract import make_unit

    _, root = engines
    backend = ReferenceBackend(
        ReferenceConfig(size="tiny", seed=0, device="cuda", speak_schedule="LSE")
    )
    statuses = accelerate_backend(backend, root, COMPONENTS)
    assert all(s.using == "tensorrt" for s in statuses), [s.reason for s in statuses]
    backend.prepare("You are a robot.")
    for i in range(3):
        backend.prefill(make_unit(backend, i, speech=True, frames=1))
        result = backend.generate()
        assert result.is_listen == (i == 0)


@pytest.mark.skipif(
    not os.environ.get("OMNI_ROS_MINICPMO_PATH"),
    reason="set OMNI_ROS_MINICPMO_PATH to build the real model's engines",
)
def test_real_minicpmo_vision_and_audio_build_and_match(tmp_path: Path) -> None:
    import torch
    from omni_ros.tensorrt.build import build_component
    from omni_ros.tensorrt.cache import EngineCache
    from omni_ros.tensorrt.export import make_inputs, minicpmo_components
    from omni_ros.tensorrt.runtime import TrtRunner
    from transformers import AutoModel

    model = (
        AutoModel.from_pretrained(
            os.environ["OMNI_ROS_MINICPMO_PATH"],
            trust_remote_code=True,
            local_files_only=True,
            torch_dtype=torch.bfloat16,
            init_vision=True,
            init_audio=True,
            init_tts=False,
        )
        .eval()
        .cuda()
    )
    cache = EngineCache(tmp_path)
    for name, (module, spec) in minicpmo_components(
        model, ["vision", "audio"], max_slices=2
    ).items():
        result = build_component(
            module, spec, precision="bf16", cache=cache, backend="minicpmo", model_revision="local"
        )
        runner = TrtRunner(result.path)
        inputs = make_inputs(spec, "opt", device="cuda")
        with torch.no_grad():
            want = module(*inputs)
        got = runner(*inputs)
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert float(cos) > 0.99, name
