"""RecordingTensorRTDouble: a test double of the ``tensorrt`` Python module API (10.x / 11.x).

TensorRT cannot be installed on these machines, so the code that drives it is tested against
this double, which (a) records every API call with its arguments, so tests assert the exact builder
sequence per version, and (b) really executes: its "engine" carries the parsed ONNX graph and runs
it with onnxruntime, reading inputs from and writing outputs to the raw addresses bound with
``set_tensor_address``. A runner that binds a wrong pointer, shape or dtype gets wrong numbers.

Version behaviour mirrored from the TensorRT docs: 11.x has no ``BuilderFlag.FP16/BF16`` (touching
them raises AttributeError, as on the real module); both deserialize only engines built by the same
version (else ``None``); ``set_input_shape`` returns False outside the optimization profile.
"""

from __future__ import annotations

import ctypes
import enum
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"TRT-DOUBLE\0"


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT32 = 3
    BOOL = 4
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class BuilderFlag10(enum.Enum):
    FP16 = 0
    BF16 = 17
    TF32 = 7


class BuilderFlag11(enum.Enum):
    TF32 = 7


_ONNX_TO_TRT = {
    1: DataType.FLOAT,
    10: DataType.HALF,
    16: DataType.BF16,
    7: DataType.INT64,
    6: DataType.INT32,
    9: DataType.BOOL,
}
_NP = {
    DataType.FLOAT: np.float32,
    DataType.HALF: np.float16,
    DataType.INT64: np.int64,
    DataType.INT32: np.int32,
    DataType.BOOL: np.bool_,
}


class _Logger:
    WARNING = "WARNING"
    INFO = "INFO"

    def __init__(self, severity: str = "WARNING") -> None:
        self.severity = severity


class RecordingTensorRTDouble:
    """Stands in for ``import tensorrt``; see the module docstring."""

    Logger = _Logger
    DataType = DataType
    TensorIOMode = TensorIOMode
    MemoryPoolType = MemoryPoolType
    NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag

    def __init__(
        self,
        version: str = "10.13.0.35",
        *,
        fail_build: bool = False,
        parse_errors: list[str] | None = None,
    ) -> None:
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.fail_build = fail_build
        self.parse_errors = parse_errors or []
        self.calls: list[tuple[Any, ...]] = []
        self.parsed_input_dtypes: dict[str, DataType] = {}
        self.deserialized = 0
        if self.major < 11:
            self.BuilderFlag = BuilderFlag10
        else:
            self.BuilderFlag = BuilderFlag11

    def record(self, *call: Any) -> None:
        self.calls.append(call)

    def names(self) -> list[str]:
        """The called API names, in order."""
        return [c[0] for c in self.calls]

    # --- builder side --------------------------------------------------------------------------
    def Builder(self, logger: Any) -> _Builder:
        self.record("Builder")
        return _Builder(self)

    def OnnxParser(self, network: _Network, logger: Any) -> _Parser:
        self.record("OnnxParser")
        return _Parser(self, network)

    # --- runtime side --------------------------------------------------------------------------
    def Runtime(self, logger: Any) -> _Runtime:
        self.record("Runtime")
        return _Runtime(self)


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx: bytes | None = None


class _Parser:
    def __init__(self, trt: RecordingTensorRTDouble, network: _Network) -> None:
        self.trt, self.network = trt, network
        self.errors: list[str] = []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        model = onnx.load(path)
        dtypes = {i.name: _ONNX_TO_TRT[i.type.tensor_type.elem_type] for i in model.graph.input}
        self.trt.parsed_input_dtypes = dtypes
        self.trt.record("OnnxParser.parse_from_file", path)
        if self.trt.parse_errors:
            self.errors = list(self.trt.parse_errors)
            return False
        self.network.onnx = Path(path).read_bytes()
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]


class _Profile:
    def __init__(self, trt: RecordingTensorRTDouble) -> None:
        self.trt = trt
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

    def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))
        self.trt.record("IOptimizationProfile.set_shape", name, tuple(min), tuple(opt), tuple(max))


class _TimingCache:
    def __init__(self, data: bytes) -> None:
        self.entries: list[str] = json.loads(data) if data else []

    def serialize(self) -> bytes:
        return json.dumps(self.entries).encode()

    def combine(self, other: _TimingCache, ignore_mismatch: bool) -> bool:
        self.entries += [e for e in other.entries if e not in self.entries]
        return True


class _Config:
    def __init__(self, trt: RecordingTensorRTDouble) -> None:
        self.trt = trt
        self.flags: list[Any] = []
        self.profiles: list[_Profile] = []
        self.timing_cache: _TimingCache | None = None

    def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
        self.trt.record("IBuilderConfig.set_memory_pool_limit", pool, size)

    def set_flag(self, flag: Any) -> None:
        self.flags.append(flag)
        self.trt.record("IBuilderConfig.set_flag", flag)

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        self.trt.record("IBuilderConfig.add_optimization_profile")
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        self.trt.record("IBuilderConfig.create_timing_cache", bytes(data))
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        self.trt.record("IBuilderConfig.set_timing_cache", ignore_mismatch)
        return True

    def get_timing_cache(self) -> _TimingCache | None:
        self.trt.record("IBuilderConfig.get_timing_cache")
        return self.timing_cache


class _Builder:
    def __init__(self, trt: RecordingTensorRTDouble) -> None:
        self.trt = trt

    def create_network(self, flags: int = 0) -> _Network:
        self.trt.record("Builder.create_network", flags)
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        self.trt.record("Builder.create_builder_config")
        return _Config(self.trt)

    def create_optimization_profile(self) -> _Profile:
        self.trt.record("Builder.create_optimization_profile")
        return _Profile(self.trt)

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
        self.trt.record("Builder.build_serialized_network")
        if self.trt.fail_build or network.onnx is None:
            return None
        if config.timing_cache is not None:
            config.timing_cache.entries.append(f"tactic-{len(network.onnx)}")
        header = json.dumps(
            {
                "version": self.trt.__version__,
                "flags": [f.name for f in config.flags],
                "profiles": {n: s for p in config.profiles for n, s in p.shapes.items()},
            }
        ).encode()
        return MAGIC + struct.pack("<I", len(header)) + header + network.onnx


class _Runtime:
    def __init__(self, trt: RecordingTensorRTDouble) -> None:
        self.trt = trt

    def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
        self.trt.record("Runtime.deserialize_cuda_engine", len(data))
        self.trt.deserialized += 1
        if not data.startswith(MAGIC):
            return None
        (size,) = struct.unpack("<I", data[len(MAGIC) : len(MAGIC) + 4])
        start = len(MAGIC) + 4
        header = json.loads(data[start : start + size])
        if header["version"] != self.trt.__version__:
            return None  # like TensorRT: engines are tied to the version that built them
        return _Engine(self.trt, header, data[start + size :])


class _Engine:
    def __init__(self, trt: RecordingTensorRTDouble, header: dict[str, Any], onnx_bytes: bytes):
        import onnx
        import onnxruntime as ort

        self.trt = trt
        self.profiles = {n: tuple(map(tuple, s)) for n, s in header["profiles"].items()}
        model = onnx.load_from_string(onnx_bytes)
        self.io: list[tuple[str, TensorIOMode, DataType]] = [
            (i.name, TensorIOMode.INPUT, _ONNX_TO_TRT[i.type.tensor_type.elem_type])
            for i in model.graph.input
        ] + [
            (o.name, TensorIOMode.OUTPUT, _ONNX_TO_TRT[o.type.tensor_type.elem_type])
            for o in model.graph.output
        ]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0]

    def _entry(self, name: str) -> tuple[str, TensorIOMode, DataType]:
        return next(e for e in self.io if e[0] == name)

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._entry(name)[1]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self._entry(name)[2]

    def create_execution_context(self) -> _Context:
        self.trt.record("ICudaEngine.create_execution_context")
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.trt = engine.trt
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.trt.record("IExecutionContext.set_input_shape", name, tuple(shape))
        profile = self.engine.profiles.get(name)
        if profile is not None:
            lo, _, hi = profile
            if len(shape) != len(lo) or any(
                not a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True)
            ):
                return False
        self.shapes[name] = tuple(shape)
        return True

    def _inputs(self) -> list[tuple[str, DataType]]:
        return [(n, d) for n, m, d in self.engine.io if m == TensorIOMode.INPUT]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        feeds = {n: np.zeros(self.shapes[n], _NP[d]) for n, d in self._inputs()}
        out = self.engine.session.run([name], feeds)[0]
        return tuple(out.shape)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.trt.record("IExecutionContext.set_tensor_address", name)
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.trt.record("IExecutionContext.execute_async_v3", stream_handle)
        feeds = {}
        for name, dtype in self._inputs():
            shape = self.shapes[name]
            count = int(np.prod(shape))
            nbytes = count * np.dtype(_NP[dtype]).itemsize
            raw = ctypes.string_at(self.addresses[name], nbytes)
            feeds[name] = np.frombuffer(raw, dtype=_NP[dtype]).reshape(shape)
        outputs = [n for n, m, _ in self.engine.io if m == TensorIOMode.OUTPUT]
        for name, value in zip(outputs, self.engine.session.run(outputs, feeds), strict=True):
            data = np.ascontiguousarray(value)
            ctypes.memmove(self.addresses[name], data.ctypes.data, data.nbytes)
        return True
