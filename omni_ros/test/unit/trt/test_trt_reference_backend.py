"""End to end on the CPU: the reference backend with its three components swapped for runners.

The engines are built by the real build path from the backend's own modules, through
RecordingTensorRTDouble (which executes the parsed ONNX graph from the bound buffers), and swapped in
with accelerate_backend. The accelerated backend must say what the torch backend says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omni_ros.tensorrt.build import build_component
from omni_ros.tensorrt.cache import EngineCache, Environment
from omni_ros.tensorrt.export import model_revision, reference_components
from omni_ros.tensorrt.runtime import accelerate_backend
from trt_recording_double import RecordingTensorRTDouble

reference = pytest.importorskip("omni_ros.backends.reference")
contract = pytest.importorskip("unit.backends.contract")

VERSION = "11.1.0.2"
HERE = Environment(VERSION, "8.9", "NVIDIA L4")
COMPONENTS = ["vision", "audio", "vocoder"]


def _backend() -> object:
    return reference.ReferenceBackend(
        reference.ReferenceConfig(size="tiny", seed=0, speak_schedule="LSE")
    )


def _run(backend: object, units: int = 3) -> list[object]:
    backend.prepare("You are a robot.")
    results = []
    for i in range(units):
        backend.prefill(contract.make_unit(backend, i, speech=True, frames=1))
        results.append(backend.generate())
    return results


def test_reference_backend_with_engines_says_what_the_torch_backend_says(tmp_path: Path):
    source = _backend()
    cache = EngineCache(tmp_path)
    for _name, (module, spec) in reference_components(source, COMPONENTS, max_slices=2).items():
        build_component(
            module,
            spec,
            precision="fp32",
            cache=cache,
            backend="reference",
            model_revision=model_revision(source),
            trt=RecordingTensorRTDouble(VERSION),
            env=HERE,
        )

    accelerated = _backend()
    trt = RecordingTensorRTDouble(VERSION)
    statuses = accelerate_backend(
        accelerated,
        tmp_path,
        COMPONENTS,
        trt=trt,
        env=HERE,
        expected={"model_revision": model_revision(accelerated)},
        device="cpu",
    )
    assert [s.using for s in statuses] == ["tensorrt"] * 3, [s.reason for s in statuses]

    want, got = _run(_backend()), _run(accelerated)
    # Every unit ran the audio and vision engines; the two speaking units ran the vocoder.
    assert trt.names().count("IExecutionContext.execute_async_v3") == 3 + 3 + 2
    assert [r.is_listen for r in got] == [r.is_listen for r in want] == [True, False, False]
    assert [r.text for r in got] == [r.text for r in want]
    for a, b in zip(got, want, strict=True):
        if b.audio is None:
            assert a.audio is None
        else:
            np.testing.assert_allclose(a.audio, b.audio, atol=1e-4)


def test_engines_of_another_seed_are_not_swapped_in(tmp_path: Path):
    source = _backend()
    cache = EngineCache(tmp_path)
    module, spec = reference_components(source, ["audio"])["audio"]
    build_component(
        module,
        spec,
        precision="fp32",
        cache=cache,
        backend="reference",
        model_revision=model_revision(source),
        trt=RecordingTensorRTDouble(VERSION),
        env=HERE,
    )
    other = reference.ReferenceBackend(reference.ReferenceConfig(size="tiny", seed=1))
    statuses = accelerate_backend(
        other,
        tmp_path,
        ["audio"],
        trt=RecordingTensorRTDouble(VERSION),
        env=HERE,
        expected={"model_revision": model_revision(other)},
        device="cpu",
    )
    assert statuses[0].using == "torch"
    assert "reference-tiny-seed1" in statuses[0].reason
