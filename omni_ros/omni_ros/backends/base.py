"""The one Protocol every model backend implements, and the ``BACKENDS`` name -> class table.

Call order per session::

    backend.prepare(system_prompt, ref_voice)      # once, and again after reset()
    loop every unit:
        backend.prefill(unit)                      # exactly one Unit
        result = backend.generate()                # exactly one UnitResult
    backend.interrupt()                            # any time between units: force listen, drop speech
    backend.reset()                                # back to before prepare()
    backend.close()                                # release GPU / sockets

Backends are NOT thread-safe: the Omni-Flow runner calls them from its single worker thread, except
``interrupt()``, which must be safe to call from another thread (it sets a flag that the next
prefill/generate honours). Third-party errors are converted to ``BackendError`` subtypes at this
boundary.

Rules every backend follows (checked by the shared contract suite, test/unit/backends/contract.py):

- Misuse raises ``StateError`` and changes nothing: ``prefill()``/``generate()`` before ``prepare()``
  (or after ``reset()``), ``generate()`` with no ``prefill()`` since the last ``generate()``.
  (The real MiniCPM-o API silently returns a listen there; adapters check for it themselves.)
- A unit whose ``sample_rate`` is not ``input_sample_rate`` or whose length is not exactly the unit
  length (``first_unit_ns`` for the first unit after ``prepare()``, else ``unit_ns``) raises a
  ``ConfigError`` (an ``OmniError`` and a ``ValueError``) before any state changes.
- A listen result has ``text == ""`` and ``audio is None`` (never an array of zeros).
- After ``interrupt()`` the next ``generate()`` returns a listen result and the interrupted turn's
  queued speech is gone.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from omni_ros.core.errors import ConfigError
from omni_ros.core.types import FloatArray, Unit, UnitResult


@runtime_checkable
class Backend(Protocol):
    """A duplex model driven one unit at a time."""

    name: ClassVar[str]
    #: Sample rate the backend wants in ``Unit.audio`` (MiniCPM-o: 16 kHz).
    input_sample_rate: int
    #: Sample rate of ``UnitResult.audio`` (MiniCPM-o: 24 kHz).
    output_sample_rate: int
    #: Length of every unit but the first, in nanoseconds (MiniCPM-o: 1.0 s).
    unit_ns: int
    #: Length of the first unit after prepare(), in nanoseconds (MiniCPM-o: 1.035 s).
    first_unit_ns: int

    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        """Start a session: system prompt and optional reference voice (mono float32 at input rate)."""
        ...

    def prefill(self, unit: Unit) -> None:
        """Feed exactly one unit of audio (+ frames, + injected text)."""
        ...

    def generate(self) -> UnitResult:
        """Decide listen/speak for the last prefilled unit and return its output."""
        ...

    def interrupt(self) -> None:
        """Force listen and drop queued speech (barge-in). Thread-safe."""
        ...

    def reset(self) -> None:
        """Forget the conversation (KV caches, turn state); prepare() must be called again."""
        ...

    def close(self) -> None:
        """Release resources. Idempotent."""
        ...


#: name -> "module:Class". Imported lazily, so choosing ``llamacpp_omni`` never imports torch.
BACKENDS: dict[str, str] = {
    "reference": "omni_ros.backends.reference:ReferenceBackend",
    "minicpmo": "omni_ros.backends.minicpmo:MiniCPMOBackend",
    "llamacpp_omni": "omni_ros.backends.llamacpp_omni:LlamaCppOmniBackend",
    "vllm_omni": "omni_ros.backends.vllm_omni:VllmOmniBackend",
}


def backend_class(name: str) -> type[Any]:
    """Return the backend class registered as ``name``.

    Raises:
        ConfigError: ``name`` is not in :data:`BACKENDS`.
    """
    try:
        target = BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    cls: type[Any] = getattr(module, class_name)
    return cls


def create_backend(name: str, params: Mapping[str, Any] | None = None) -> Backend:
    """Build backend ``name`` from a plain parameter mapping (validated by the backend's config)."""
    cls = backend_class(name)
    config = cls.config_class.from_mapping(dict(params or {}))
    backend: Backend = cls(config)
    return backend


def silence(n_samples: int) -> FloatArray:
    """``n_samples`` of float32 silence."""
    return np.zeros(int(n_samples), dtype=np.float32)
