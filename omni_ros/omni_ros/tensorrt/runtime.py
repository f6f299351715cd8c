"""Run cached engines: :class:`TrtRunner`, the torch fallback, and swapping a backend's components.

Loading order matters for safety: the manifest and the engine's sha256 are verified on the exact
bytes read from disk *before* they reach ``deserialize_cuda_engine`` (an engine file is executable
content; a tampered or foreign one is refused and never loaded). Only then is the engine
deserialized, its I/O compared with the manifest, and an execution context created.

Buffers: torch CUDA tensors by default (their ``data_ptr()`` is bound with ``set_tensor_address``
and the engine is enqueued with ``execute_async_v3`` on the caller's current torch stream, so it
orders with the surrounding torch work without a sync). pycuda buffers are used only where torch is
absent: mixing pycuda contexts with torch is known to hang (NVIDIA/TensorRT#4608).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omni_ros.core.config import from_mapping
from omni_ros.core.errors import EngineError
from omni_ros.tensorrt.build import import_tensorrt
from omni_ros.tensorrt.cache import (
    DEFAULT_ENGINE_ROOT,
    EngineCache,
    Environment,
    Manifest,
    detect_environment,
    read_verified_engine,
)
from omni_ros.tensorrt.diagnostics import ComponentStatus
from omni_ros.tensorrt.specs import parse_components

log = logging.getLogger(__name__)

#: TensorRT ``DataType`` member name -> the dtype name used in specs and manifests.
_TRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "BOOL": "bool",
}


def _dtype_name(trt_dtype: Any) -> str:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    return _TRT_DTYPES.get(name, name.lower())


class TrtRunner:
    """A verified engine as a callable: ``runner(*inputs) -> output`` (or a tuple of outputs).

    Args:
        engine_dir: A cache entry (``engine.plan`` + ``manifest.json``).
        trt: The ``tensorrt`` module or a test double; default: the real one.
        env: This machine; default: detected. The manifest must match it.
        expected: Further manifest fields that must match (``backend``, ``model_revision``...).
        buffers: ``"torch"`` (default where torch imports), ``"pycuda"`` or ``"auto"``.
        device: torch device for the buffers (``"cuda"``; a CPU device serves test doubles only).

    Raises:
        EngineError: the entry fails verification (refused before loading), deserialization
            returns ``None`` (stale: rebuild), or the engine's I/O differs from its manifest.
    """

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        trt: Any = None,
        env: Environment | None = None,
        expected: Mapping[str, Any] | None = None,
        buffers: str = "auto",
        device: str = "cuda",
    ) -> None:
        self.trt = trt if trt is not None else import_tensorrt()
        self.path = Path(engine_dir)
        env = env or detect_environment(self.trt)
        data, self.manifest = read_verified_engine(self.path, env, expected)
        self.buffers = _choose_buffers(buffers)
        self.device = device
        self._lock = threading.Lock()
        logger = self.trt.Logger(self.trt.Logger.WARNING)
        self._runtime = self.trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineError(
                f"TensorRT {self.trt.__version__} could not deserialize {self.path} "
                "(built by another TensorRT or for another GPU?): rebuild it"
            )
        self._check_io(self.manifest)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"{self.path}: create_execution_context failed (out of GPU memory?)")

    @property
    def component(self) -> str:
        return self.manifest.component

    def _check_io(self, manifest: Manifest) -> None:
        mode_input = self.trt.TensorIOMode.INPUT
        engine_inputs: list[tuple[str, str]] = []
        engine_outputs: list[tuple[str, str]] = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            pair = (name, _dtype_name(self.engine.get_tensor_dtype(name)))
            (
                engine_inputs if self.engine.get_tensor_mode(name) == mode_input else engine_outputs
            ).append(pair)
        want_in = [(t.name, t.dtype) for t in manifest.inputs]
        want_out = [(t.name, t.dtype) for t in manifest.outputs]
        if sorted(engine_inputs) != sorted(want_in) or sorted(engine_outputs) != sorted(want_out):
            raise EngineError(
                f"{self.path}: engine I/O {engine_inputs} -> {engine_outputs} differs from its "
                f"manifest {want_in} -> {want_out}"
            )

    def __call__(self, *inputs: Any) -> Any:
        """Run the engine on the inputs in manifest order (torch tensors, or numpy for pycuda)."""
        if len(inputs) != len(self.manifest.inputs):
            raise EngineError(
                f"{self.component} engine takes {len(self.manifest.inputs)} inputs "
                f"({[t.name for t in self.manifest.inputs]}), got {len(inputs)}"
            )
        with self._lock:  # one execution context: calls must not interleave their bindings
            if self.buffers == "torch":
                return self._run_torch(inputs)
            return self._run_pycuda(inputs)

    def _set_input_shape(self, name: str, shape: Sequence[int]) -> None:
        if not self.context.set_input_shape(name, tuple(int(d) for d in shape)):
            raise EngineError(
                f"{self.component}: input {name!r} shape {tuple(shape)} is outside the engine's "
                f"profile {self.manifest.profiles.get(name)}"
            )

    def _output_shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise EngineError(f"{self.component}: output {name!r} shape unresolved: {shape}")
        return shape

    def _run_torch(self, inputs: Sequence[Any]) -> Any:
        import torch

        from omni_ros.tensorrt.export import torch_dtype

        caller_float = next((x.dtype for x in inputs if x.is_floating_point()), torch.float32)
        bound = []
        for info, x in zip(self.manifest.inputs, inputs, strict=True):
            t = x.to(device=self.device, dtype=torch_dtype(info.dtype)).contiguous()
            self._set_input_shape(info.name, t.shape)
            self.context.set_tensor_address(info.name, t.data_ptr())
            bound.append(t)
        outputs = []
        for info in self.manifest.outputs:
            out = torch.empty(
                self._output_shape(info.name), dtype=torch_dtype(info.dtype), device=self.device
            )
            self.context.set_tensor_address(info.name, out.data_ptr())
            outputs.append(out)
        device = torch.device(self.device)
        # The caller's current stream on the buffers' device: the engine then runs in order with the
        # torch work before and after it, with no synchronisation.
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        if not self.context.execute_async_v3(stream):
            raise EngineError(f"{self.component}: execute_async_v3 failed")
        # The caller's module returned its input float dtype; keep that contract.
        results = [o.to(caller_float) if o.is_floating_point() else o for o in outputs]
        del bound  # freed after enqueue: the caching allocator reuses them in stream order
        return results[0] if len(results) == 1 else tuple(results)

    def _run_pycuda(self, inputs: Sequence[Any]) -> Any:  # pragma: no cover - needs pycuda + GPU
        import numpy as np
        import pycuda.autoinit  # noqa: F401  (creates the CUDA context pycuda needs)
        import pycuda.driver as cuda

        def np_dtype(name: str) -> Any:
            if name == "bfloat16":
                import ml_dtypes

                return ml_dtypes.bfloat16
            return np.dtype(name)

        stream = cuda.Stream()
        keep = []
        for info, x in zip(self.manifest.inputs, inputs, strict=True):
            host = np.ascontiguousarray(np.asarray(x).astype(np_dtype(info.dtype)))
            dev = cuda.mem_alloc(max(host.nbytes, 1))
            cuda.memcpy_htod_async(dev, host, stream)
            self._set_input_shape(info.name, host.shape)
            self.context.set_tensor_address(info.name, int(dev))
            keep += [host, dev]
        results = []
        for info in self.manifest.outputs:
            host = cuda.pagelocked_empty(self._output_shape(info.name), np_dtype(info.dtype))
            dev = cuda.mem_alloc(max(host.nbytes, 1))
            self.context.set_tensor_address(info.name, int(dev))
            results.append((host, dev))
        if not self.context.execute_async_v3(stream.handle):
            raise EngineError(f"{self.component}: execute_async_v3 failed")
        for host, dev in results:
            cuda.memcpy_dtoh_async(host, dev, stream)
        stream.synchronize()
        arrays = [np.array(host) for host, _ in results]
        return arrays[0] if len(arrays) == 1 else tuple(arrays)


def _choose_buffers(buffers: str) -> str:
    if buffers not in ("auto", "torch", "pycuda"):
        raise EngineError(f"buffers must be auto, torch or pycuda, not {buffers!r}")
    if buffers != "auto":
        return buffers
    try:
        import torch  # noqa: F401
    except ImportError:
        return "pycuda"
    return "torch"


def _fallback(component: str, reason: str, engine: str = "") -> tuple[None, ComponentStatus]:
    log.warning("%s: using the torch path, not TensorRT: %s", component, reason)
    return None, ComponentStatus(component, "torch", reason, engine)


def load_component_or_fallback(
    component: str,
    engine_root: str | Path = DEFAULT_ENGINE_ROOT,
    *,
    trt: Any = None,
    env: Environment | None = None,
    expected: Mapping[str, Any] | None = None,
    device: str = "cuda",
) -> tuple[TrtRunner | None, ComponentStatus]:
    """Load the newest valid engine of ``component``, or say (log + status) why torch is used.

    Never raises for the expected failures: TensorRT missing, no engine, a stale engine (other
    TensorRT or GPU), a manifest mismatch, a tampered file, or a failed deserialization all give
    ``(None, status)`` with ``status.using == "torch"`` and the reason.
    """
    if trt is None:
        try:
            trt = import_tensorrt()
        except EngineError as exc:
            return _fallback(component, f"TensorRT is not installed ({exc})")
    env = env or detect_environment(trt)
    cache = EngineCache(engine_root)
    path, reports = cache.find(component, env, expected)
    if path is None:
        if not reports:
            return _fallback(
                component,
                f"no {component} engine under {cache.root}; run `omni-ros engines build`",
            )
        reason = "; ".join(f"{r.path.name}: {', '.join(r.reasons)}" for r in reports)
        return _fallback(component, reason, str(reports[0].path))
    try:
        runner = TrtRunner(path, trt=trt, env=env, expected=expected, device=device)
    except EngineError as exc:
        return _fallback(component, str(exc), str(path))
    manifest = runner.manifest
    reason = f"engine {path.name} (TensorRT {manifest.tensorrt_version}, {manifest.precision})"
    log.info("%s: using TensorRT %s", component, reason)
    return runner, ComponentStatus(component, "tensorrt", reason, str(path))


def accelerate_backend(
    backend: Any,
    engine_dir: str | Path,
    components: Iterable[str],
    *,
    trt: Any = None,
    env: Environment | None = None,
    expected: Mapping[str, Any] | None = None,
    device: str = "cuda",
) -> list[ComponentStatus]:
    """Swap each of ``components`` of ``backend`` for its verified engine, where one loads.

    Calls ``backend.replace_component(name, runner)`` per loaded engine. Engines must have been
    built for this backend (the manifest's ``backend`` equals ``backend.name``, plus ``expected``).

    Returns:
        One :class:`ComponentStatus` per component, for ``/diagnostics``.
    """
    components = list(components)
    replace = getattr(backend, "replace_component", None)
    if replace is None:
        return [
            _fallback(c, f"backend {type(backend).__name__} cannot swap components")[1]
            for c in components
        ]
    must_match = dict(expected or {})
    name = getattr(backend, "name", None)
    if isinstance(name, str):
        must_match.setdefault("backend", name)
    statuses = []
    for component in components:
        runner, status = load_component_or_fallback(
            component, engine_dir, trt=trt, env=env, expected=must_match, device=device
        )
        if runner is not None:
            try:
                replace(component, runner)
            except Exception as exc:  # the backend's own error: convert, keep its torch path
                runner, status = _fallback(
                    component, f"replace_component failed: {exc}", str(runner.path)
                )
        statuses.append(status)
    return statuses


@dataclasses.dataclass(frozen=True)
class TensorRTConfig:
    """The ``tensorrt`` parameters of a backend / node (build with :meth:`from_mapping`).

    Attributes:
        enabled: Swap components for engines where verified ones exist (torch otherwise).
        engine_dir: Engine cache root; empty = the default (``$OMNI_ROS_ENGINE_DIR`` or the
            package's ``tensorrt_engines/``).
        components: Comma-separated components to accelerate.
    """

    enabled: bool = False
    engine_dir: str = ""
    components: str = "vision,audio,vocoder"

    def __post_init__(self) -> None:
        parse_components(self.components)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> TensorRTConfig:
        return from_mapping(cls, mapping)


def maybe_accelerate(backend: Any, config: TensorRTConfig) -> list[ComponentStatus]:
    """:func:`accelerate_backend` when ``config.enabled``, requiring engines of this model revision.

    Returns:
        One status per configured component (all ``torch``, reason "disabled", when not enabled).
    """
    components = parse_components(config.components)
    if not config.enabled:
        return [ComponentStatus(c, "torch", "tensorrt.enabled is false") for c in components]
    from omni_ros.tensorrt.export import model_revision

    return accelerate_backend(
        backend,
        config.engine_dir or DEFAULT_ENGINE_ROOT,
        components,
        expected={"model_revision": model_revision(backend)},
    )
