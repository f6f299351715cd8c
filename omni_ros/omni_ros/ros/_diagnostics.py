"""What ``omni_flow_node`` reports on ``/diagnostics``: the loop's health and TensorRT per component.

Fed from the OmniFlow worker thread (:meth:`DiagnosticsReporter.on_state`) and read by the
diagnostics timer; attribute assignment is atomic in CPython, so no lock is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray

from omni_ros.core.types import Counters, StateOut
from omni_ros.ros import conversions as conv


def _guarded(
    read: Callable[[], Mapping[str, Any]], error_key: str, prefix: str = ""
) -> dict[str, str]:
    """What ``read`` returns (keys ``prefix``-ed, values as text), or ``{error_key: the error}``:
    a backend's own figures, or state read off the worker thread, must never stop the
    diagnostics."""
    try:
        values = read()
    except Exception as exc:
        return {error_key: f"{type(exc).__name__}: {exc}"}
    return {f"{prefix}{key}": str(value) for key, value in values.items()}


class DiagnosticsReporter:
    """Keeps the latest state, the latency and the counters of the previous report (for rates)."""

    def __init__(self) -> None:
        self.state: StateOut | None = None
        self.latency_ms: float | None = None
        self.previous: Counters | None = None
        #: ``omni_ros.tensorrt.diagnostics.ComponentStatus`` per accelerated component.
        self.components: list[Any] = []
        #: the node's own input counters (unstamped input, refused goals), read at each report.
        self.inputs: Callable[[], dict[str, int]] = dict
        #: the backend's own figures (``Backend.metrics()`` where it has one: llama.cpp-omni's
        #: server metrics, vllm-omni's error and recovery counts), reported as ``backend.<key>``.
        self.backend_metrics: Callable[[], dict[str, Any]] = dict
        #: the speech schedule's learned terms (``schedule.*``: the p95 unit-end-to-result lag and
        #: the speaker's device latency learned from its playback reports), read at each report.
        self.schedule: Callable[[], dict[str, str]] = dict
        #: what became of the remembered echo path (``echo_path.*``: the file, whether the last
        #: start was warm or why it was cold, what the last stop wrote).
        self.echo_path: Callable[[], dict[str, str]] = dict
        #: the echo canceller's and barge-in detector's state (``echo.*``: the delay, how many
        #: estimates were accepted or refused, filter resets, converged, the learned residual
        #: ratio, frames only the spectral test called the user; OmniFlow.echo_status).
        self.echo: Callable[[], dict[str, str]] = dict

    def on_state(self, state: StateOut, now_ns: int) -> None:
        # OmniFlow stamps a state with its unit's END: latency = unit end -> outputs published.
        self.latency_ms = (now_ns - state.stamp_ns) / 1e6
        self.state = state

    def clear(self) -> None:
        self.state, self.latency_ms, self.previous, self.components = None, None, None, []
        self.backend_metrics = dict
        self.schedule = dict
        self.echo_path = dict
        self.echo = dict

    def report(self, node_name: str, backend: str, lifecycle: str, now_ns: int) -> DiagnosticArray:
        """One ``DiagnosticArray``: the Omni-Flow status, then one status per TensorRT component."""
        state = self.state
        status = conv.diagnostic_status(
            state,
            self.previous,
            name=f"{node_name}: Omni-Flow",
            hardware_id=backend,
            latency_ms=self.latency_ms,
            extra={
                "lifecycle": lifecycle,
                **{k: str(v) for k, v in self.inputs().items()},
                **_guarded(self.backend_metrics, "backend.metrics_error", prefix="backend."),
                **self.schedule(),
                **self.echo_path(),
                **_guarded(self.echo, "echo.error"),
            },
            inactive_reason=f"no unit yet (lifecycle: {lifecycle})",
        )
        self.previous = state.counters.snapshot() if state is not None else None
        statuses = [status] + [
            conv.component_diagnostic(c, f"{node_name}: tensorrt {c.component}", backend)
            for c in self.components
        ]
        return DiagnosticArray(header=conv.header(now_ns), status=statuses)
