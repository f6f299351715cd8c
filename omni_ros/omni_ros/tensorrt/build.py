"""Engine builds for TensorRT 10.x and 11.x, through one small adapter, cached and manifested.

Every call into the ``tensorrt`` module happens in :class:`TensorRTBuildAdapter`, which takes the
module as an argument: production code passes the real one (imported lazily), unit tests pass a
recording test double of the same API and assert the exact call sequence per version.

What differs between the versions (``tensorrt.__version__``):

* 10.x: networks are always explicit-batch (the flag is deprecated and ignored), so
  ``create_network(0)``; fp16/bf16 are *weakly typed* builder flags (``BuilderFlag.FP16/BF16``) on
  the fp32 ONNX graph, whose I/O stays fp32.
* 11.x: strong typing is always on and the precision flags are gone; the precision comes from the
  ONNX graph's dtypes, so fp16/bf16 builds parse a converted graph
  (:func:`omni_ros.tensorrt.export.convert_onnx_precision`) and the engine's float I/O is fp16/bf16.

Common: ``OnnxParser.parse_from_file`` (errors listed), a workspace memory-pool limit, one
optimization profile with min/opt/max per dynamic input, the timing cache loaded before and merged
back after the build, and ``build_serialized_network`` (``None`` -> :class:`EngineError`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omni_ros.core.errors import EngineError
from omni_ros.tensorrt.cache import (
    EngineCache,
    Environment,
    Manifest,
    TensorInfo,
    atomic_write_bytes,
    detect_environment,
    engine_key,
    sha256_bytes,
    sha256_file,
    utc_now_iso,
)
from omni_ros.tensorrt.specs import ComponentSpec, check_precision

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

#: Default workspace memory-pool limit (bytes); encoders of this size need far less.
DEFAULT_WORKSPACE_BYTES = 4 << 30


_NOT_INSTALLED = (
    "TensorRT is not installed (the PyPI 'tensorrt' wheels fetch the libraries from NVIDIA's "
    "index; install it from there or use an NGC container)"
)


def import_tensorrt() -> Any:
    """Import the real ``tensorrt`` module, or raise :class:`EngineError` saying how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError(f"{_NOT_INSTALLED}: {exc}") from exc
    if not hasattr(tensorrt, "__version__") or not hasattr(tensorrt, "Builder"):
        # Any directory named "tensorrt" on sys.path (a test folder of that name when
        # pytest puts its parent there) imports as an empty namespace package: that is not TensorRT.
        where = list(getattr(tensorrt, "__path__", []))
        raise EngineError(f"{_NOT_INSTALLED}: 'import tensorrt' found only the directory {where}")
    return tensorrt


def tensorrt_major(version: str) -> int:
    """The major version of a ``tensorrt.__version__`` string such as ``"10.13.0.35"``."""
    try:
        return int(str(version).split(".")[0])
    except ValueError as exc:
        raise EngineError(f"cannot parse the TensorRT version {version!r}") from exc


@dataclasses.dataclass(frozen=True)
class BuildRequest:
    """One engine build: the ONNX file to parse and how to build it."""

    onnx_path: Path
    spec: ComponentSpec
    precision: str
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    timing_cache_path: Path | None = None


class TensorRTBuildAdapter:
    """The only code that calls the TensorRT builder API.

    Args:
        trt: The ``tensorrt`` module (or a test double with the same API).
        cache: Where the timing cache's lock lives (``None``: no locking).
    """

    def __init__(self, trt: Any, cache: EngineCache | None = None) -> None:
        self.trt = trt
        self.version = str(trt.__version__)
        self.major = tensorrt_major(self.version)
        if self.major < 10:
            raise EngineError(f"TensorRT {self.version} is too old: 10.x or 11.x is required")
        if self.major > 11:
            log.warning("TensorRT %s is newer than 11.x; building as for 11.x", self.version)
        self._cache = cache
        self.logger = trt.Logger(trt.Logger.WARNING)

    @property
    def strongly_typed(self) -> bool:
        return self.major >= 11

    def build(self, request: BuildRequest) -> bytes:
        """Parse, configure and build; returns the serialized engine.

        Raises:
            EngineError: parse errors (all listed), an unsupported precision for this version, or
                a failed build.
        """
        trt = self.trt
        precision = check_precision(request.precision)
        builder = trt.Builder(self.logger)
        # 10.x: explicit batch is implied (the flag is deprecated); 11.x: strong typing is implied.
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(request.onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineError(
                f"TensorRT {self.version} could not parse {request.onnx_path}:\n  "
                + "\n  ".join(errors or ["(no error reported)"])
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(request.workspace_bytes))
        if not self.strongly_typed and precision != "fp32":
            flag = {"fp16": trt.BuilderFlag.FP16, "bf16": trt.BuilderFlag.BF16}[precision]
            config.set_flag(flag)
        profile = builder.create_optimization_profile()
        for p in request.spec.profile:
            profile.set_shape(p.name, p.min, p.opt, p.max)
        config.add_optimization_profile(profile)
        cache_path = request.timing_cache_path
        with self._timing_lock():
            data = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
        timing_cache = config.create_timing_cache(data)
        config.set_timing_cache(timing_cache, False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(
                f"TensorRT {self.version} failed to build {request.spec.name!r} "
                f"({precision}); the TensorRT log above says why"
            )
        if cache_path is not None:
            self._save_timing_cache(config, cache_path)
        return bytes(memoryview(serialized))

    def _timing_lock(self) -> contextlib.AbstractContextManager[None]:
        return self._cache.lock("timing") if self._cache else contextlib.nullcontext()

    def _save_timing_cache(self, config: Any, path: Path) -> None:
        # Merge into whatever another build saved meanwhile instead of overwriting it.
        ours = config.get_timing_cache()
        with self._timing_lock():
            if path.is_file():
                merged = config.create_timing_cache(path.read_bytes())
                merged.combine(ours, True)
                data = merged.serialize()
            else:
                data = ours.serialize()
            atomic_write_bytes(path, bytes(memoryview(data)))


def engine_io(
    spec: ComponentSpec, precision: str, strongly_typed: bool
) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """The engine's I/O as recorded in the manifest (float I/O converts only when strongly typed)."""
    from omni_ros.tensorrt.specs import PRECISION_FLOAT_DTYPE

    target = PRECISION_FLOAT_DTYPE[precision] if strongly_typed else "float32"

    def info(t: Any) -> TensorInfo:
        dtype = target if t.dtype == "float32" else t.dtype
        return TensorInfo(t.name, dtype, tuple(t.shape))

    return tuple(info(t) for t in spec.inputs), tuple(info(t) for t in spec.outputs)


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """Where an engine landed and whether this call built it (or found it cached)."""

    component: str
    path: Path
    built: bool


class _Steps:
    """A rich progress display of named steps (a no-op when disabled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._progress: Any = None

    def __enter__(self) -> _Steps:
        if self.enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        if self._progress is None:
            yield
            return
        task = self._progress.add_task(text, total=1)
        yield
        self._progress.update(task, completed=1, description=f"[green]✓[/green] {text}")


def build_component(
    module: nn.Module,
    spec: ComponentSpec,
    *,
    precision: str,
    cache: EngineCache,
    backend: str,
    model_revision: str,
    trt: Any = None,
    env: Environment | None = None,
    work_dir: str | Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    show_progress: bool = False,
) -> BuildResult:
    """Export ``module`` to ONNX, check it, convert its precision if needed, and build + cache it.

    Args:
        module: The component (eval mode) called as ``module(*inputs)`` per ``spec``.
        spec: Its tensor boundary and shape profile.
        precision: ``fp32``, ``fp16`` or ``bf16``.
        cache: The engine cache to look in and store into.
        backend: Backend name recorded in the manifest.
        model_revision: Model revision recorded in the manifest (compared at load time).
        trt: The ``tensorrt`` module or a test double; default: the real one, imported now.
        env: This machine's environment; default: detected. A GPU is required.
        work_dir: Where ONNX files go; default: a temporary directory.
        workspace_bytes: Builder workspace memory-pool limit.
        show_progress: Show a rich progress display of the steps.

    Raises:
        EngineError: TensorRT or a GPU is missing, export/check failed, or the build failed.
    """
    from omni_ros.tensorrt.export import check_onnx, convert_onnx_precision, export_onnx

    precision = check_precision(precision)
    trt = trt if trt is not None else import_tensorrt()
    adapter = TensorRTBuildAdapter(trt, cache)
    env = env or detect_environment()
    if env.compute_capability is None:
        raise EngineError("no CUDA GPU: engines are built on the GPU they will run on")
    with contextlib.ExitStack() as stack, _Steps(show_progress) as steps:
        work = (
            Path(work_dir) if work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        with steps.step(f"{spec.name}: export ONNX (fp32)"):
            onnx_fp32 = export_onnx(module, spec, work / f"{spec.name}.fp32.onnx")
        with steps.step(f"{spec.name}: onnx.checker"):
            check_onnx(onnx_fp32, spec)
        onnx_path = onnx_fp32
        if adapter.strongly_typed and precision != "fp32":
            with steps.step(f"{spec.name}: convert ONNX to {precision} (strongly typed build)"):
                onnx_path = convert_onnx_precision(
                    onnx_fp32, work / f"{spec.name}.{precision}.onnx", precision
                )
        onnx_sha = sha256_file(onnx_path)
        profiles = spec.profile_json()
        key = engine_key(
            onnx_sha256=onnx_sha,
            precision=precision,
            profiles=profiles,
            tensorrt_version=adapter.version,
            compute_capability=env.compute_capability,
        )
        inputs, outputs = engine_io(spec, precision, adapter.strongly_typed)

        def build() -> tuple[Manifest, bytes]:
            timing = cache.timing_cache_path(adapter.version, env.compute_capability or "")
            request = BuildRequest(onnx_path, spec, precision, workspace_bytes, timing)
            engine = adapter.build(request)
            manifest = Manifest(
                component=spec.name,
                backend=backend,
                model_revision=model_revision,
                onnx_sha256=onnx_sha,
                precision=precision,
                profiles=profiles,
                inputs=inputs,
                outputs=outputs,
                tensorrt_version=adapter.version,
                compute_capability=env.compute_capability or "",
                gpu_name=env.gpu_name or "",
                engine_sha256=sha256_bytes(engine),
                created=utc_now_iso(),
                key=key,
            )
            return manifest, engine

        with steps.step(f"{spec.name}: build TensorRT {adapter.version} engine ({precision})"):
            path, built = cache.get_or_build(spec.name, key, build)
    log.info("%s engine %s: %s", spec.name, "built" if built else "cached", path)
    return BuildResult(spec.name, path, built)
