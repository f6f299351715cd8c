"""Engine cache: keys, manifests, atomic writes under a lock, verification, concurrent builders."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest
from omni_ros.core.errors import EngineError
from omni_ros.tensorrt.cache import (
    ENGINE_FILE,
    MANIFEST_FILE,
    EngineCache,
    Environment,
    Manifest,
    atomic_write_bytes,
    engine_key,
    file_lock,
    read_verified_engine,
    verify_entry,
)
from trt_cache_workers import build_once, fake_manifest

BASE = dict(
    onnx_sha256="1" * 64,
    precision="fp16",
    profiles={"mel": {"min": [1, 80, 10], "opt": [1, 80, 100], "max": [1, 80, 104]}},
    tensorrt_version="10.13.0.35",
    compute_capability="8.9",
)
CHANGED = {
    "onnx_sha256": "2" * 64,
    "precision": "bf16",
    "profiles": {"mel": {"min": [1, 80, 10], "opt": [1, 80, 100], "max": [1, 80, 208]}},
    "tensorrt_version": "11.1.0.2",
    "compute_capability": "9.0",
}


def test_key_is_stable_for_the_same_inputs():
    assert engine_key(**BASE) == engine_key(**dict(BASE))  # type: ignore[arg-type]
    assert len(engine_key(**BASE)) == 64  # type: ignore[arg-type]


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_key_changes_with_each_input(field: str):
    changed = {**BASE, field: CHANGED[field]}
    assert engine_key(**changed) != engine_key(**BASE)  # type: ignore[arg-type]


def test_manifest_round_trips_through_json():
    manifest = fake_manifest(b"plan")
    assert Manifest.from_json(manifest.to_json()) == manifest


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ('{"schema_version": 99}', "schema_version 99"),
        ('{"schema_version": 1}', "missing"),
    ],
)
def test_malformed_manifests_are_refused_with_the_reason(text: str, message: str):
    with pytest.raises(EngineError, match=message):
        Manifest.from_json(text)


def test_atomic_write_replaces_content_and_leaves_no_temporary_file(tmp_path: Path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path: Path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_file_lock_excludes_a_second_holder_until_released(tmp_path: Path):
    lock = tmp_path / "x.lock"
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with file_lock(lock):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    with pytest.raises(EngineError, match="timed out"), file_lock(lock, timeout_s=0.2):
        pass
    release.set()
    thread.join()
    with file_lock(lock, timeout_s=1.0):
        pass


def test_store_writes_an_entry_that_verifies(tmp_path: Path):
    cache = EngineCache(tmp_path)
    manifest = fake_manifest(b"plan-bytes")
    path = cache.store(manifest, b"plan-bytes")
    assert path.name == f"audio-{manifest.key[:12]}"
    assert sorted(p.name for p in path.iterdir()) == [ENGINE_FILE, MANIFEST_FILE]
    assert verify_entry(path).ok
    assert cache.is_complete("audio", manifest.key)


def test_store_refuses_a_manifest_that_does_not_describe_the_bytes(tmp_path: Path):
    with pytest.raises(EngineError, match="does not describe"):
        EngineCache(tmp_path).store(fake_manifest(b"a"), b"b")


def test_an_altered_engine_file_fails_verification(tmp_path: Path):
    path = EngineCache(tmp_path).store(fake_manifest(b"plan-bytes"), b"plan-bytes")
    (path / ENGINE_FILE).write_bytes(b"plan-bytEs")
    report = verify_entry(path)
    assert not report.ok
    assert any("file altered" in r for r in report.reasons)
    with pytest.raises(EngineError, match="refused"):
        read_verified_engine(path, None)


def test_an_edited_manifest_fails_its_own_key_check(tmp_path: Path):
    path = EngineCache(tmp_path).store(fake_manifest(b"plan"), b"plan")
    text = (path / MANIFEST_FILE).read_text().replace('"8.9"', '"9.0"')
    (path / MANIFEST_FILE).write_text(text)
    assert any("manifest edited" in r for r in verify_entry(path).reasons)


def test_an_entry_without_manifest_is_incomplete(tmp_path: Path):
    path = EngineCache(tmp_path).store(fake_manifest(b"plan"), b"plan")
    (path / MANIFEST_FILE).unlink()
    assert verify_entry(path).reasons == ("no manifest.json (incomplete or foreign entry)",)


@pytest.mark.parametrize(
    ("env", "expected_reason"),
    [
        (Environment("10.13.0.35", "8.9", "NVIDIA L4"), None),
        (
            Environment("10.14.1.48", "8.9", "NVIDIA L4"),
            "stale: built for tensorrt_version 10.13.0.35",
        ),
        (Environment("10.13.0.35", "9.0", "NVIDIA L4"), "stale: built for compute_capability 8.9"),
        (Environment("10.13.0.35", "8.9", "NVIDIA A10"), "stale: built for gpu_name NVIDIA L4"),
        (Environment(None, "8.9", "NVIDIA L4"), "TensorRT is not installed"),
        (Environment("10.13.0.35", None, None), "no CUDA GPU"),
    ],
)
def test_verification_compares_the_manifest_with_this_machine(
    tmp_path: Path, env: Environment, expected_reason: str | None
):
    path = EngineCache(tmp_path).store(fake_manifest(b"plan"), b"plan")
    report = verify_entry(path, env)
    if expected_reason is None:
        assert report.ok
    else:
        assert any(r.startswith(expected_reason) for r in report.reasons), report.reasons


def test_verification_compares_expected_manifest_fields(tmp_path: Path):
    path = EngineCache(tmp_path).store(fake_manifest(b"plan"), b"plan")
    report = verify_entry(path, expected={"model_revision": "reference-tiny-seed1"})
    assert report.reasons == (
        "mismatch: manifest model_revision is 'reference-tiny-seed0', expected 'reference-tiny-seed1'",
    )


def test_get_or_build_builds_once_then_serves_the_cached_entry(tmp_path: Path):
    cache = EngineCache(tmp_path)
    manifest = fake_manifest(b"plan")
    calls = []

    def build() -> tuple[Manifest, bytes]:
        calls.append(1)
        return manifest, b"plan"

    assert cache.get_or_build("audio", manifest.key, build)[1] is True
    assert cache.get_or_build("audio", manifest.key, build)[1] is False
    assert calls == [1]


def test_get_or_build_rebuilds_an_altered_entry(tmp_path: Path):
    cache = EngineCache(tmp_path)
    manifest = fake_manifest(b"plan")
    path = cache.store(manifest, b"plan")
    (path / ENGINE_FILE).write_bytes(b"evil")
    _, built = cache.get_or_build("audio", manifest.key, lambda: (manifest, b"plan"))
    assert built
    assert (path / ENGINE_FILE).read_bytes() == b"plan"


def test_two_builder_threads_build_once_and_never_tear_the_entry(tmp_path: Path):
    log = tmp_path / "builds.log"
    start = time.time() + 0.2
    results: list[bool] = []
    threads = [
        threading.Thread(
            target=lambda t=t: results.append(build_once(str(tmp_path / "c"), str(log), t, start))
        )
        for t in ("a", "b")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, True]
    assert len(log.read_text().splitlines()) == 1
    (entry,) = EngineCache(tmp_path / "c").entries()
    assert verify_entry(entry).ok


def test_two_builder_processes_build_once_and_never_tear_the_entry(tmp_path: Path):
    log = tmp_path / "builds.log"
    ctx = multiprocessing.get_context("spawn")
    start = time.time() + 3.0  # spawned interpreters need time to import
    with ctx.Pool(2) as pool:
        results = pool.starmap(
            build_once, [(str(tmp_path / "c"), str(log), tag, start) for tag in ("a", "b")]
        )
    assert sorted(results) == [False, True]
    (winner,) = log.read_text().split()
    (entry,) = EngineCache(tmp_path / "c").entries()
    assert verify_entry(entry).ok
    assert (entry / ENGINE_FILE).read_bytes().startswith(f"engine-from-{winner}".encode())


def test_find_prefers_an_entry_that_matches_this_machine(tmp_path: Path):
    cache = EngineCache(tmp_path)
    old = fake_manifest(b"old", tensorrt_version="10.9.0.34")
    cache.store(old, b"old")
    new = fake_manifest(b"new")
    cache.store(new, b"new")
    path, reports = cache.find("audio", Environment("10.13.0.35", "8.9", "NVIDIA L4"))
    assert path == cache.entry_dir("audio", new.key)
    assert len(reports) == 2
