"""Whether the node's clock stands still: a paused bag, a ``/clock`` publisher that went away.

Under ``use_sim_time`` the ROS clock only moves when ``/clock`` does. When it stops, no unit
closes and the loop looks idle, but nothing is wrong with the loop: the diagnostics must say that
time stopped and for how long, or a user sees an OK node that does nothing. The diagnostics timer
runs on steady time, so it keeps reporting while the clock stands.
"""

from __future__ import annotations

from dataclasses import dataclass

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from omni_ros.core.clock import NS_PER_S


@dataclass
class ClockStall:
    """How long the clock has not advanced, and what arrived meanwhile."""

    seconds: float
    inputs: int  # mic / camera messages received while it stood still


class ClockWatch:
    """Tracks the node clock against steady time; fed from the diagnostics timer.

    Args:
        stall_s: how long (steady time) the clock may stand still before it counts as stalled;
            0 disables the check.
    """

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._clock_ns: int | None = None
        self._since_steady_ns = 0
        self._inputs_at_stop = 0
        self.inputs = 0  # incremented by the node for every mic / camera message

    def reset(self) -> None:
        """Forget the last reading (the node became active again)."""
        self._clock_ns = None

    def observe(self, clock_ns: int, steady_ns: int) -> ClockStall | None:
        """The clock read ``clock_ns`` at steady time ``steady_ns``: a stall, or None.

        Any movement of the clock (forwards or backwards, e.g. a looping bag) ends a stall.
        """
        if self._clock_ns is None or clock_ns != self._clock_ns:
            self._clock_ns = clock_ns
            self._since_steady_ns = steady_ns
            self._inputs_at_stop = self.inputs
            return None
        stalled_s = (steady_ns - self._since_steady_ns) / NS_PER_S
        if self.stall_s <= 0 or stalled_s < self.stall_s:
            return None
        return ClockStall(stalled_s, self.inputs - self._inputs_at_stop)


def mark_stall(status: DiagnosticStatus, stall: ClockStall | None) -> None:
    """Add ``clock_stalled_s`` to ``status``; a stall makes it at least WARN and says why."""
    seconds = stall.seconds if stall is not None else 0.0
    status.values.append(KeyValue(key="clock_stalled_s", value=f"{seconds:.1f}"))
    if stall is None:
        return
    inputs = (
        f"{stall.inputs} mic/camera messages arrived meanwhile"
        if stall.inputs
        else "no input arrived meanwhile"
    )
    note = (
        f"clock not advancing for {stall.seconds:.1f} s (/clock paused or its publisher gone; "
        f"{inputs}): no unit can close"
    )
    if status.level == DiagnosticStatus.OK:
        status.level, status.message = DiagnosticStatus.WARN, note
    else:
        status.level = max(status.level, DiagnosticStatus.WARN)
        status.message = f"{note}; {status.message}"
