"""Per-component acceleration status, in the shape a node puts into ``/diagnostics``."""

from __future__ import annotations

import dataclasses
from typing import Literal

Using = Literal["tensorrt", "torch"]


@dataclasses.dataclass(frozen=True)
class ComponentStatus:
    """Which path a component runs on and why.

    Attributes:
        component: ``vision``, ``audio`` or ``vocoder``.
        using: ``"tensorrt"`` when an engine replaced the torch module, else ``"torch"``.
        reason: Why (the engine used, or why it was not: missing TensorRT, stale, refused...).
        engine: The engine directory, when one was considered.
    """

    component: str
    using: Using
    reason: str
    engine: str = ""

    @property
    def accelerated(self) -> bool:
        return self.using == "tensorrt"

    def as_key_values(self) -> dict[str, str]:
        """Flat string pairs for a ``diagnostic_msgs/DiagnosticStatus.values`` list."""
        return {
            "component": self.component,
            "using": self.using,
            "reason": self.reason,
            "engine": self.engine,
        }

    def level(self) -> int:
        """Diagnostic level: 0 (OK) when accelerated, 1 (WARN) on the torch fallback."""
        return 0 if self.accelerated else 1
