"""The Protocol every model backend implements: what :class:`~omni_ros.core.flow.OmniFlow` calls.

It lives in the core because the core is its caller; the implementations and their registry are
in :mod:`omni_ros.backends` (``omni_ros.backends.base`` re-exports it), which the core never
imports. The call order and the rules every backend follows are in that module's docstring and
are checked by the shared contract suite (test/unit/backends/contract.py).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from omni_ros.core.types import FloatArray, Unit, UnitResult


@runtime_checkable
class Backend(Protocol):
    """A duplex model driven one unit at a time."""

    name: ClassVar[str]
    #: The backend's config dataclass; ``create_backend`` builds it with ``from_mapping``.
    config_class: ClassVar[type[Any]]
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
