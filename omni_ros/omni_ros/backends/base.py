"""The backend registry (``REGISTRY``) and the contract's shared checks.

The Protocol every model backend implements is :class:`omni_ros.core.backend.Backend` (the core
calls it; it is re-exported here).

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
from typing import Any

import numpy as np

from omni_ros.core.backend import Backend
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError
from omni_ros.core.types import FloatArray, Unit

__all__ = ["BACKENDS", "BACKEND_CHOICES", "MODEL_PARAMETER", "REGISTRY", "Backend"]

#: The one list of backends: name -> ("module:Class", the config field a launch file's
#: ``model:=`` argument sets). Classes are imported lazily, so choosing ``llamacpp_omni`` never
#: imports torch. Everything else that lists backends derives from this table.
REGISTRY: dict[str, tuple[str, str]] = {
    "reference": ("omni_ros.backends.reference:ReferenceBackend", "size"),
    "minicpmo": ("omni_ros.backends.minicpmo:MiniCPMOBackend", "model"),
    "llamacpp_omni": ("omni_ros.backends.llamacpp_omni:LlamaCppOmniBackend", "model_dir"),
    "vllm_omni": ("omni_ros.backends.vllm_omni:VllmOmniBackend", "model"),
}
#: name -> "module:Class" (tests register doubles here at runtime).
BACKENDS: dict[str, str] = {name: target for name, (target, _) in REGISTRY.items()}
#: name -> the config field that ``model:=`` sets (``reference.size``, ``minicpmo.model``...).
MODEL_PARAMETER: dict[str, str] = {name: field for name, (_, field) in REGISTRY.items()}
#: "reference | minicpmo | llamacpp_omni | vllm_omni", for parameter and argument descriptions.
BACKEND_CHOICES = " | ".join(REGISTRY)


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


def check_unit(
    unit: Unit, backend: Backend, first: bool | None, *, which: str = "", why: str = ""
) -> FloatArray:
    """The contract's one unit check, run before any state changes.

    Args:
        unit: what ``prefill()`` was given.
        backend: the backend checking it (its name, ``input_sample_rate`` and unit lengths).
        first: the first unit after ``prepare()`` (``first_unit_ns`` long) or a later one
            (``unit_ns``); None allows either (a backend recovering mid-stream).
        which: how the message names the unit; default "the first unit after prepare()" /
            "a unit".
        why: appended to the length message (what would go wrong with another length).

    Returns:
        The unit's audio as a 1-D array.

    Raises:
        ConfigError: not a ``Unit``, another sample rate, not mono 1-D, or another length.
    """
    sample_rate = int(backend.input_sample_rate)
    if first is None:
        durations_ns: tuple[int, ...] = (backend.first_unit_ns, backend.unit_ns)
    else:
        durations_ns = (backend.first_unit_ns if first else backend.unit_ns,)
    which = which or ("the first unit after prepare()" if first else "a unit")
    if not isinstance(unit, Unit):
        raise ConfigError(f"prefill() takes a Unit, not {type(unit).__name__}")
    if unit.sample_rate != sample_rate:
        raise ConfigError(
            f"unit {unit.index} audio is {unit.sample_rate} Hz; {backend.name} takes {sample_rate} Hz "
            "(build units at backend.input_sample_rate)"
        )
    audio = np.asarray(unit.audio)
    if audio.ndim != 1:
        raise ConfigError(f"unit {unit.index} audio has shape {audio.shape}; expected mono 1-D")
    allowed = sorted({int(d) * sample_rate // NS_PER_S for d in durations_ns})
    if audio.shape[0] not in allowed:
        seconds = " or ".join(f"{n / sample_rate:g} s" for n in allowed)
        raise ConfigError(
            f"unit {unit.index} has {audio.shape[0]} samples; {which} must have exactly "
            f"{' or '.join(str(n) for n in allowed)} ({seconds} at {sample_rate} Hz)"
            + (f": {why}" if why else "")
        )
    return audio


def silence(n_samples: int) -> FloatArray:
    """``n_samples`` of float32 silence."""
    return np.zeros(int(n_samples), dtype=np.float32)
