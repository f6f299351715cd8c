"""Shared fixtures of the TensorRT tests: tiny components, their ONNX exports, a fake GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from omni_ros.tensorrt.cache import Environment

#: The machine the engines in these tests claim to be built on / run on (no GPU is needed).
FAKE_GPU = Environment(
    tensorrt_version="10.13.0.35", compute_capability="8.9", gpu_name="NVIDIA L4"
)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    # 2-core machine shared with other test runs.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny() -> dict[str, Any]:
    from omni_ros.tensorrt.tiny import tiny_components

    return tiny_components(seed=0)


@pytest.fixture(scope="session")
def exported(tiny: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from omni_ros.tensorrt.export import export_onnx

    out = tmp_path_factory.mktemp("onnx")
    return {name: export_onnx(m, spec, out / f"{name}.onnx") for name, (m, spec) in tiny.items()}


@pytest.fixture
def fake_gpu() -> Environment:
    return FAKE_GPU
