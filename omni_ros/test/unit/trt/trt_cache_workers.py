"""Process entry points for the concurrent-builder tests (importable by spawned children)."""

from __future__ import annotations

import time

from omni_ros.tensorrt.cache import EngineCache, Manifest, TensorInfo, sha256_bytes


def fake_manifest(engine: bytes, *, component: str = "audio", **changes: object) -> Manifest:
    """A manifest describing ``engine`` (fields as a GPU build would fill them; key computed)."""
    from omni_ros.tensorrt.cache import engine_key

    fields: dict[str, object] = dict(
        component=component,
        backend="reference",
        model_revision="reference-tiny-seed0",
        onnx_sha256="0" * 64,
        precision="fp16",
        profiles={"mel": {"min": [1, 80, 10], "opt": [1, 80, 100], "max": [1, 80, 104]}},
        inputs=(TensorInfo("mel", "float32", (1, 80, "frames")),),
        outputs=(TensorInfo("audio_tokens", "float32", (1, "tokens", 48)),),
        tensorrt_version="10.13.0.35",
        compute_capability="8.9",
        gpu_name="NVIDIA L4",
        engine_sha256=sha256_bytes(engine),
        created="2026-11-25T09:00:00+00:00",
    )
    fields.update(changes)
    fields["key"] = engine_key(
        onnx_sha256=str(fields["onnx_sha256"]),
        precision=str(fields["precision"]),
        profiles=fields["profiles"],  # type: ignore[arg-type]
        tensorrt_version=str(fields["tensorrt_version"]),
        compute_capability=str(fields["compute_capability"]),
    )
    return Manifest(**fields)  # type: ignore[arg-type]


def build_once(root: str, log_path: str, tag: str, start_at: float) -> bool:
    """Wait for a common start time, then get_or_build; every real build appends to ``log_path``."""
    cache = EngineCache(root)
    engine = (b"engine-from-" + tag.encode()) * 50_000
    manifest = fake_manifest(engine)

    def build() -> tuple[Manifest, bytes]:
        with open(log_path, "a") as f:
            f.write(tag + "\n")
        time.sleep(0.3)  # long enough that the other builder arrives while this one builds
        return manifest, engine

    while time.time() < start_at:
        time.sleep(0.005)
    _, built = cache.get_or_build("audio", manifest.key, build)
    return built
