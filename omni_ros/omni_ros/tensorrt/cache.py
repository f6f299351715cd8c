"""The engine cache: keys, manifests, atomic writes under a file lock, verification.

Layout (``tensorrt_engines/`` by default; engines are built locally and never committed)::

    <root>/
      <component>-<key12>/engine.plan      serialized engine (executable content)
      <component>-<key12>/manifest.json    what it was built from and for; written last
      .locks/<component>-<key12>.lock      fcntl lock file, one per entry
      .cache/timing-<trt>-sm<cc>.cache     TensorRT timing cache per version and GPU, shared by builds

The key is a sha256 over everything that makes an engine valid: the ONNX file's sha256, the
precision, the shape profiles, the TensorRT version and the GPU's compute capability. An entry is
complete only once ``manifest.json`` exists and its ``engine_sha256`` matches ``engine.plan``; both
files are written to a temporary name and moved into place with ``os.replace`` while the entry's
lock is held, so concurrent builders never leave (or read) a torn file, and only one of them builds.

An engine file is executable content: :func:`read_verified_engine` reads the bytes once, hashes
exactly those bytes, and hands them out only when every check passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from omni_ros.core.errors import EngineError

SCHEMA_VERSION = 1
ENGINE_FILE = "engine.plan"
MANIFEST_FILE = "manifest.json"
_LOCK_DIR = ".locks"

#: The default engine directory: ``$OMNI_ROS_ENGINE_DIR``, else ``omni_ros/tensorrt_engines/`` of the
#: source tree (an installed package has no writable place of its own: set the variable there).
DEFAULT_ENGINE_ROOT = Path(
    os.environ.get("OMNI_ROS_ENGINE_DIR")
    or Path(__file__).resolve().parents[2] / "tensorrt_engines"
)


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def engine_key(
    *,
    onnx_sha256: str,
    precision: str,
    profiles: Mapping[str, Any],
    tensorrt_version: str,
    compute_capability: str,
) -> str:
    """The cache key: sha256 over a canonical JSON of the inputs that make an engine valid."""
    payload = {
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "profiles": profiles,
        "tensorrt_version": tensorrt_version,
        "compute_capability": compute_capability,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return sha256_bytes(canonical.encode())


def entry_name(component: str, key: str) -> str:
    """Directory name of an entry: ``<component>-<first 12 hex digits of the key>``."""
    return f"{component}-{key[:12]}"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape (``-1`` / axis name for dynamic axes) of one engine I/O tensor."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What an engine was built from and for (``manifest.json``)."""

    component: str
    backend: str
    model_revision: str
    onnx_sha256: str
    precision: str
    profiles: dict[str, dict[str, list[int]]]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    tensorrt_version: str
    compute_capability: str
    gpu_name: str
    engine_sha256: str
    created: str
    key: str
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        """Pretty, stable JSON (sorted keys)."""
        data = dataclasses.asdict(self)
        for io in ("inputs", "outputs"):
            data[io] = [{**t, "shape": list(t["shape"])} for t in data[io]]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; raises :class:`EngineError` naming what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EngineError(f"manifest is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise EngineError("manifest is not a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise EngineError(
                f"manifest schema_version {version!r} != {SCHEMA_VERSION}: rebuild the engine"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data))
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise EngineError(f"manifest fields missing {missing} / unknown {unknown}")
        try:
            for io in ("inputs", "outputs"):
                data[io] = tuple(
                    TensorInfo(t["name"], t["dtype"], tuple(t["shape"])) for t in data[io]
                )
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise EngineError(f"manifest I/O entries are malformed: {exc}") from exc

    def expected_key(self) -> str:
        """The key recomputed from this manifest's own fields."""
        return engine_key(
            onnx_sha256=self.onnx_sha256,
            precision=self.precision,
            profiles=self.profiles,
            tensorrt_version=self.tensorrt_version,
            compute_capability=self.compute_capability,
        )


def utc_now_iso() -> str:
    """Creation stamp for manifests (informational only; never compared)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class Environment:
    """What an engine must match on this machine; ``None`` = not available here."""

    tensorrt_version: str | None
    compute_capability: str | None
    gpu_name: str | None


def detect_environment(trt: Any = None) -> Environment:
    """Probe TensorRT and the CUDA GPU lazily; missing pieces come back as ``None``.

    Args:
        trt: The ``tensorrt`` module in use (or a test double); default: try importing it.
    """
    trt_version: str | None = None
    if trt is not None:
        trt_version = str(trt.__version__)
    else:
        try:
            import tensorrt

            version = getattr(tensorrt, "__version__", None)  # None: a namespace package
            trt_version = str(version) if version is not None else None
        except ImportError:
            pass
    cc: str | None = None
    gpu: str | None = None
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            cc, gpu = f"{major}.{minor}", torch.cuda.get_device_name()
    except ImportError:
        pass
    return Environment(trt_version, cc, gpu)


# --- Files: atomic writes under a lock --------------------------------------------------------


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a mix.

    The bytes go to a temporary file in the same directory, are fsynced, and replace ``path`` with
    ``os.replace`` (atomic on POSIX within one file system); the directory is fsynced too, so the
    rename survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def file_lock(path: str | Path, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the ``with`` body.

    The lock is advisory and per open file, so it excludes other processes and other threads that
    take it through this function alike. ``timeout_s=None`` waits forever.

    Raises:
        EngineError: the lock was not acquired within ``timeout_s``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout_s is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise EngineError(
                            f"timed out after {timeout_s} s waiting for {path}"
                        ) from None
                    time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- Verification -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Outcome of verifying one entry: ``ok`` or the reasons it is stale / invalid."""

    path: Path
    manifest: Manifest | None
    reasons: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.reasons


def _check(
    path: Path,
    data: bytes | None,
    env: Environment | None,
    expected: Mapping[str, Any] | None,
) -> VerifyReport:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return VerifyReport(path, None, ("no manifest.json (incomplete or foreign entry)",))
    try:
        manifest = Manifest.from_json(manifest_path.read_text())
    except (EngineError, OSError) as exc:
        return VerifyReport(path, None, (str(exc),))
    reasons: list[str] = []
    if manifest.expected_key() != manifest.key:
        reasons.append("manifest key does not match its own fields (manifest edited)")
    if path.name != entry_name(manifest.component, manifest.key):
        reasons.append(f"directory name {path.name!r} does not match the manifest's key")
    if data is None:
        reasons.append(f"{ENGINE_FILE} is missing")
    elif sha256_bytes(data) != manifest.engine_sha256:
        reasons.append(f"{ENGINE_FILE} sha256 differs from the manifest (file altered): refused")
    if env is not None:
        current = {
            "tensorrt_version": env.tensorrt_version,
            "compute_capability": env.compute_capability,
            "gpu_name": env.gpu_name,
        }
        for name, value in current.items():
            built = getattr(manifest, name)
            if value is None:
                what = "TensorRT is not installed" if name == "tensorrt_version" else "no CUDA GPU"
                reasons.append(f"{what} here (engine built for {name} {built})")
            elif value != built:
                reasons.append(f"stale: built for {name} {built}, this machine has {value}")
    for name, value in (expected or {}).items():
        built = getattr(manifest, name, None)
        if built != value:
            reasons.append(f"mismatch: manifest {name} is {built!r}, expected {value!r}")
    return VerifyReport(path, manifest, tuple(reasons))


def verify_entry(
    path: str | Path,
    env: Environment | None = None,
    expected: Mapping[str, Any] | None = None,
) -> VerifyReport:
    """Check one entry: manifest schema and self-consistency, engine sha256, environment, fields.

    Args:
        path: The entry directory.
        env: Compare the TensorRT version, compute capability and GPU name with this machine's;
            ``None`` skips the environment checks (integrity only).
        expected: Further manifest fields that must equal the given values (``backend``,
            ``model_revision``, ``precision``, ``onnx_sha256``...).
    """
    path = Path(path)
    engine = path / ENGINE_FILE
    data = engine.read_bytes() if engine.is_file() else None
    return _check(path, data, env, expected)


def read_verified_engine(
    path: str | Path,
    env: Environment | None,
    expected: Mapping[str, Any] | None = None,
) -> tuple[bytes, Manifest]:
    """Read an engine once and return its bytes only if those exact bytes pass every check.

    Hashing the bytes that will be deserialized (not the file again) closes the window in which
    the file could be swapped between verification and loading.

    Raises:
        EngineError: with every reason the entry is refused.
    """
    path = Path(path)
    engine = path / ENGINE_FILE
    data = engine.read_bytes() if engine.is_file() else None
    report = _check(path, data, env, expected)
    if not report.ok or data is None or report.manifest is None:
        raise EngineError(f"engine {path} refused: " + "; ".join(report.reasons))
    return data, report.manifest


# --- The cache ----------------------------------------------------------------------------------


class EngineCache:
    """Engines under one root directory; see the module docstring for the layout."""

    def __init__(self, root: str | Path = DEFAULT_ENGINE_ROOT, lock_timeout_s: float | None = None):
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s

    def timing_cache_path(self, tensorrt_version: str, compute_capability: str) -> Path:
        """The timing cache for one TensorRT version and GPU (timings do not transfer between them)."""
        return self.root / ".cache" / f"timing-{tensorrt_version}-sm{compute_capability}.cache"

    def entry_dir(self, component: str, key: str) -> Path:
        return self.root / entry_name(component, key)

    def lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        """The lock guarding entry (or file) ``name`` under this root."""
        return file_lock(self.root / _LOCK_DIR / f"{name}.lock", self.lock_timeout_s)

    def is_complete(self, component: str, key: str) -> bool:
        """True when the entry exists, is internally consistent and its engine hash matches."""
        path = self.entry_dir(component, key)
        report = verify_entry(path)
        return report.ok and report.manifest is not None and report.manifest.key == key

    def store(self, manifest: Manifest, engine: bytes) -> Path:
        """Write ``engine`` and ``manifest`` (engine first, manifest last) under the entry's lock."""
        if sha256_bytes(engine) != manifest.engine_sha256:
            raise EngineError("manifest engine_sha256 does not describe the engine bytes given")
        path = self.entry_dir(manifest.component, manifest.key)
        with self.lock(path.name):
            self._write(path, manifest, engine)
        return path

    def _write(self, path: Path, manifest: Manifest, engine: bytes) -> None:
        # A stale manifest from an earlier, interrupted build must not vouch for the new engine
        # while it is being replaced.
        (path / MANIFEST_FILE).unlink(missing_ok=True)
        atomic_write_bytes(path / ENGINE_FILE, engine)
        atomic_write_bytes(path / MANIFEST_FILE, manifest.to_json().encode())

    def get_or_build(
        self, component: str, key: str, build: Callable[[], tuple[Manifest, bytes]]
    ) -> tuple[Path, bool]:
        """Return the entry for ``key``, building it under the lock if it is not complete.

        Concurrent callers with the same key serialize on the entry lock: the first builds, the
        others find the complete entry and return it without building.

        Returns:
            ``(entry directory, built)`` where ``built`` says whether this call built it.
        """
        path = self.entry_dir(component, key)
        with self.lock(path.name):
            if self.is_complete(component, key):
                return path, False
            manifest, engine = build()
            if manifest.key != key or manifest.component != component:
                raise EngineError("the builder returned a manifest for another key/component")
            if sha256_bytes(engine) != manifest.engine_sha256:
                raise EngineError("the builder's manifest does not describe its engine bytes")
            self._write(path, manifest, engine)
        return path, True

    def entries(self) -> list[Path]:
        """Entry directories (anything but hidden ones), sorted by name."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def find(
        self,
        component: str,
        env: Environment | None = None,
        expected: Mapping[str, Any] | None = None,
    ) -> tuple[Path | None, list[VerifyReport]]:
        """The newest entry of ``component`` that verifies, plus the reports of all candidates."""
        reports = [
            verify_entry(p, env, expected)
            for p in self.entries()
            if p.name.startswith(f"{component}-")
        ]
        good = [r for r in reports if r.ok and r.manifest is not None]
        good.sort(key=lambda r: r.manifest.created if r.manifest else "", reverse=True)
        return (good[0].path if good else None), reports
