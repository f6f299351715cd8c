"""The reference backend's own components export with onnxruntime parity (tiny size, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omni_ros.tensorrt.export import (
    check_onnx,
    export_onnx,
    model_revision,
    onnxruntime_parity,
    reference_components,
)

SHAPES = {
    "vision": [{"pixel_values": (n, 3, 56, 56)} for n in (1, 2, 3)],
    "audio": [{"mel": (1, 80, t)} for t in (10, 57, 100, 104)],
    "vocoder": [{"token_ids": (1, n)} for n in (1, 7, 26, 52)],
}


@pytest.fixture(scope="module")
def reference_backend():
    reference = pytest.importorskip("omni_ros.backends.reference")
    return reference.ReferenceBackend(reference.ReferenceConfig(size="tiny", seed=0))


@pytest.mark.parametrize("component", ["vision", "audio", "vocoder"])
def test_reference_component_exports_and_matches_torch(
    component: str, reference_backend, tmp_path: Path
):
    module, spec = reference_components(reference_backend, [component])[component]
    path = export_onnx(module, spec, tmp_path / f"{component}.onnx")
    check_onnx(path, spec)
    results = onnxruntime_parity(module, spec, path, SHAPES[component], atol=1e-4)
    assert all(r.ok for r in results), [(r.shapes, r.max_abs_error) for r in results]


def test_reference_revision_names_size_and_seed(reference_backend):
    assert model_revision(reference_backend) == "reference-tiny-seed0"
