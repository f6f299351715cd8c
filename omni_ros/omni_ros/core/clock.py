"""Clocks. The core never reads wall time itself: every time-dependent object takes a :class:`Clock`.

A ROS node injects ROS time (which is sim time under bag replay); tests inject :class:`ManualClock`.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000


@runtime_checkable
class Clock(Protocol):
    """Anything that says what time it is, in integer nanoseconds."""

    def now_ns(self) -> int:
        """Return the current time of this clock in nanoseconds."""
        ...


class ManualClock:
    """A clock that moves only when told to. Thread-safe."""

    def __init__(self, start_ns: int = 0) -> None:
        self._now_ns = int(start_ns)
        self._lock = threading.Lock()

    def now_ns(self) -> int:
        with self._lock:
            return self._now_ns

    def set_ns(self, stamp_ns: int) -> None:
        """Jump to ``stamp_ns`` (backwards jumps are allowed: they model a looping bag)."""
        with self._lock:
            self._now_ns = int(stamp_ns)

    def advance_ns(self, delta_ns: int) -> int:
        """Move forward by ``delta_ns`` and return the new time."""
        with self._lock:
            self._now_ns += int(delta_ns)
            return self._now_ns
