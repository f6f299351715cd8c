"""The builder's exact TensorRT call sequence for 10.x vs 11.x, via RecordingTensorRTDouble."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
from omni_ros.core.errors import EngineError
from omni_ros.tensorrt.build import BuildRequest, TensorRTBuildAdapter, build_component
from omni_ros.tensorrt.cache import EngineCache, Environment, Manifest, verify_entry
from trt_recording_double import DataType, MemoryPoolType, RecordingTensorRTDouble

GiB = 1 << 30


def _build(
    tiny: dict[str, Any],
    trt: RecordingTensorRTDouble,
    cache: EngineCache,
    precision: str,
    component: str = "audio",
) -> Any:
    module, spec = tiny[component]
    env = Environment(trt.__version__, "8.9", "NVIDIA L4")
    return build_component(
        module,
        spec,
        precision=precision,
        cache=cache,
        backend="tiny",
        model_revision="tiny-seed0",
        trt=trt,
        env=env,
        workspace_bytes=2 * GiB,
    )


def _builder_calls(trt: RecordingTensorRTDouble) -> list[tuple[Any, ...]]:
    # Paths differ per run; keep the API name and the arguments that matter.
    return [c[:1] if c[0] == "OnnxParser.parse_from_file" else c for c in trt.calls]


def expected_sequence(flag: Any | None) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = [
        ("Builder",),
        ("Builder.create_network", 0),
        ("OnnxParser",),
        ("OnnxParser.parse_from_file",),
        ("Builder.create_builder_config",),
        ("IBuilderConfig.set_memory_pool_limit", MemoryPoolType.WORKSPACE, 2 * GiB),
    ]
    if flag is not None:
        calls.append(("IBuilderConfig.set_flag", flag))
    calls += [
        ("Builder.create_optimization_profile",),
        ("IOptimizationProfile.set_shape", "mel", (1, 80, 100), (1, 80, 104), (1, 80, 208)),
        ("IBuilderConfig.add_optimization_profile",),
        ("IBuilderConfig.create_timing_cache", b""),
        ("IBuilderConfig.set_timing_cache", False),
        ("Builder.build_serialized_network",),
        ("IBuilderConfig.get_timing_cache",),
    ]
    return calls


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tensorrt_10_builds_the_fp32_graph_with_a_precision_flag(
    tiny, tmp_path: Path, precision: str
):
    trt = RecordingTensorRTDouble("10.13.0.35")
    result = _build(tiny, trt, EngineCache(tmp_path), precision)
    flag = trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16
    assert _builder_calls(trt) == expected_sequence(flag)
    assert trt.parsed_input_dtypes == {"mel": DataType.FLOAT}
    manifest = verify_entry(result.path).manifest
    assert manifest is not None
    assert [(t.name, t.dtype) for t in (*manifest.inputs, *manifest.outputs)] == [
        ("mel", "float32"),
        ("audio_tokens", "float32"),
    ]


@pytest.mark.parametrize(
    ("precision", "dtype", "name"),
    [("fp16", DataType.HALF, "float16"), ("bf16", DataType.BF16, "bfloat16")],
)
def test_tensorrt_11_builds_a_converted_graph_without_precision_flags(
    tiny, tmp_path: Path, precision: str, dtype: DataType, name: str
):
    trt = RecordingTensorRTDouble("11.1.0.2")
    assert not hasattr(trt.BuilderFlag, "FP16")  # removed in 11: touching it would raise
    result = _build(tiny, trt, EngineCache(tmp_path), precision)
    assert _builder_calls(trt) == expected_sequence(None)
    assert trt.parsed_input_dtypes == {"mel": dtype}
    parsed = next(c[1] for c in trt.calls if c[0] == "OnnxParser.parse_from_file")
    assert parsed.endswith(f"audio.{precision}.onnx")
    manifest = verify_entry(result.path).manifest
    assert manifest is not None
    assert manifest.inputs[0].dtype == name


@pytest.mark.parametrize("version", ["10.13.0.35", "11.1.0.2"])
def test_fp32_builds_set_no_precision_flag_on_either_version(tiny, tmp_path: Path, version: str):
    trt = RecordingTensorRTDouble(version)
    _build(tiny, trt, EngineCache(tmp_path), "fp32")
    assert _builder_calls(trt) == expected_sequence(None)
    assert trt.parsed_input_dtypes == {"mel": DataType.FLOAT}


def test_the_vocoder_gets_one_profile_entry_per_dynamic_input(tiny, tmp_path: Path):
    trt = RecordingTensorRTDouble("10.13.0.35")
    _build(tiny, trt, EngineCache(tmp_path), "fp16", component="vocoder")
    shapes = [c[1:] for c in trt.calls if c[0] == "IOptimizationProfile.set_shape"]
    assert shapes == [
        ("x", (2, 80, 4), (2, 80, 50), (2, 80, 200)),
        ("mask", (2, 1, 4), (2, 1, 50), (2, 1, 200)),
        ("mu", (2, 80, 4), (2, 80, 50), (2, 80, 200)),
        ("cond", (2, 80, 4), (2, 80, 50), (2, 80, 200)),
    ]


def test_manifest_records_the_build_and_this_machine(tiny, tmp_path: Path):
    trt = RecordingTensorRTDouble("10.13.0.35")
    result = _build(tiny, trt, EngineCache(tmp_path), "fp16")
    manifest = verify_entry(result.path, Environment("10.13.0.35", "8.9", "NVIDIA L4")).manifest
    assert isinstance(manifest, Manifest)
    assert (manifest.component, manifest.backend, manifest.model_revision) == (
        "audio",
        "tiny",
        "tiny-seed0",
    )
    assert (manifest.tensorrt_version, manifest.compute_capability, manifest.gpu_name) == (
        "10.13.0.35",
        "8.9",
        "NVIDIA L4",
    )
    assert manifest.profiles == {
        "mel": {"min": [1, 80, 100], "opt": [1, 80, 104], "max": [1, 80, 208]}
    }
    assert result.path.name == f"audio-{manifest.key[:12]}"


def test_a_second_build_is_served_from_the_cache(tiny, tmp_path: Path):
    cache = EngineCache(tmp_path)
    first = _build(tiny, RecordingTensorRTDouble("10.13.0.35"), cache, "fp16")
    trt = RecordingTensorRTDouble("10.13.0.35")
    second = _build(tiny, trt, cache, "fp16")
    assert (first.built, second.built, first.path) == (True, False, second.path)
    assert "Builder.build_serialized_network" not in trt.names()


def test_each_precision_and_version_gets_its_own_entry(tiny, tmp_path: Path):
    cache = EngineCache(tmp_path)
    paths = {
        _build(tiny, RecordingTensorRTDouble(v), cache, p).path
        for v in ("10.13.0.35", "11.1.0.2")
        for p in ("fp16", "bf16")
    }
    assert len(paths) == 4
    assert sorted(cache.entries()) == sorted(paths)


def test_the_timing_cache_is_loaded_and_merged_across_builds(tiny, tmp_path: Path):
    cache = EngineCache(tmp_path)
    _build(tiny, RecordingTensorRTDouble("10.13.0.35"), cache, "fp16")
    timing = cache.timing_cache_path("10.13.0.35", "8.9")
    assert timing.name == "timing-10.13.0.35-sm8.9.cache"
    first = timing.read_bytes()
    trt = RecordingTensorRTDouble("10.13.0.35")
    _build(tiny, trt, cache, "fp16", component="vocoder")
    loaded = [c[1] for c in trt.calls if c[0] == "IBuilderConfig.create_timing_cache"]
    assert loaded[0] == first  # the build started from the saved cache
    import json

    assert len(json.loads(timing.read_bytes())) == 2  # both builds' entries kept


def test_parser_errors_are_listed_in_the_engine_error(tiny, tmp_path: Path):
    trt = RecordingTensorRTDouble(
        "10.13.0.35", parse_errors=["node 3: Unsupported op Foo", "node 9: bad"]
    )
    with pytest.raises(EngineError, match="Unsupported op Foo\n  node 9: bad"):
        _build(tiny, trt, EngineCache(tmp_path), "fp16")


def test_a_failed_build_raises_and_leaves_no_entry(tiny, tmp_path: Path):
    cache = EngineCache(tmp_path)
    with pytest.raises(EngineError, match="failed to build 'audio'"):
        _build(tiny, RecordingTensorRTDouble("10.13.0.35", fail_build=True), cache, "fp16")
    assert cache.entries() == []


def test_tensorrt_older_than_10_is_refused():
    with pytest.raises(EngineError, match=r"10\.x or 11\.x is required"):
        TensorRTBuildAdapter(RecordingTensorRTDouble("8.6.1"))


def test_building_without_a_gpu_is_refused(tiny, tmp_path: Path):
    module, spec = tiny["audio"]
    with pytest.raises(EngineError, match="no CUDA GPU"):
        build_component(
            module,
            spec,
            precision="fp16",
            cache=EngineCache(tmp_path),
            backend="tiny",
            model_revision="x",
            trt=RecordingTensorRTDouble(),
            env=Environment("10.13.0.35", None, None),
        )


def test_adapter_builds_exactly_the_given_onnx_file(exported: dict[str, Path], tiny):
    trt = RecordingTensorRTDouble("11.1.0.2")
    _, spec = tiny["audio"]
    engine = TensorRTBuildAdapter(trt).build(BuildRequest(exported["audio"], spec, "fp32"))
    assert engine.endswith(exported["audio"].read_bytes())
    assert onnx.load_from_string(exported["audio"].read_bytes()).graph.input[0].name == "mel"
