"""ScriptedBackendDouble: a deterministic stand-in for a model backend, for the Omni-Flow tests.

It is a test double, not a model: each ``generate()`` returns the next scripted item. An item is a
``UnitResult`` (returned), an exception instance (raised), ``HANG`` (blocks until ``release`` is set,
like a server that never answers) or any other object (returned as is: malformed output). ``block``
(an Event the test controls) makes ``generate()`` wait until the test sets it.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from omni_ros.core.errors import BackendUnavailable, ConfigError, StateError
from omni_ros.core.types import FloatArray, Unit, UnitResult

HANG = object()
LISTEN = UnitResult(is_listen=True)


class ScriptedBackendDouble:
    """Backend double driven by a script (see the module docstring)."""

    name: ClassVar[str] = "scripted"

    def __init__(self, script: list[Any] | None = None, unit_ns: int = 1_000_000_000) -> None:
        self.input_sample_rate = 16_000
        self.output_sample_rate = 24_000
        self.unit_ns = unit_ns
        self.first_unit_ns = unit_ns
        self.script = list(script or [])
        self.units: list[Unit] = []
        self.prepares: list[tuple[str, FloatArray | None]] = []
        self.resets = 0
        self.interrupts = 0
        self.block: threading.Event | None = None  # generate() waits on it when set by the test
        self.release = threading.Event()  # ends a HANG
        self.in_generate = threading.Event()
        self._lock = threading.Lock()
        self._prepared = False
        self.failing_prepares = 0  # this many prepare() calls raise BackendUnavailable first

    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        if self.failing_prepares > 0:
            self.failing_prepares -= 1
            raise BackendUnavailable("scripted: server not up yet")
        self.prepares.append((system_prompt, ref_voice))
        self._prepared = True

    def prefill(self, unit: Unit) -> None:
        if not self._prepared:
            raise StateError("prefill() before prepare()")
        if len(unit.audio) != self.unit_ns * self.input_sample_rate // 1_000_000_000:
            raise ConfigError(f"unit {unit.index} has {len(unit.audio)} samples")
        self.units.append(unit)

    def generate(self) -> Any:
        self.in_generate.set()
        try:
            if self.block is not None:
                self.block.wait()
            item = self.script.pop(0) if self.script else LISTEN
            if item is HANG:
                self.release.wait()
                return LISTEN
            if isinstance(item, BaseException):
                raise item
            return item
        finally:
            self.in_generate.clear()

    def interrupt(self) -> None:
        with self._lock:
            self.interrupts += 1

    def reset(self) -> None:
        self.resets += 1
        self._prepared = False

    def close(self) -> None:
        self.release.set()
