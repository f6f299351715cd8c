"""A paused ``/clock`` is reported in ``/diagnostics`` (issue 16), against the real node process.

Under ``use_sim_time`` a paused bag, or a ``/clock`` publisher that went away, stops the node's
clock: no unit closes. On main ``/diagnostics`` stayed OK for 30 s of paused clock. The node
must say WARN with how long the clock has not advanced (``clock_stalled_s``), and OK again once
it moves.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("rclpy")

from flow_harness import (
    NodeProcess,
    SimDriver,
    faulty_double_params,
    mic_chunk,
    running,
    wait_for,
)

pytestmark = [pytest.mark.ros, pytest.mark.timeout(240)]

OK, WARN = b"\x00", b"\x01"
BAG_START_NS = 1000 * 1_000_000_000


def _flow_status(array_msg: Any) -> Any | None:
    return next((s for s in array_msg.status if s.name.endswith(": Omni-Flow")), None)


def _values(status: Any) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def _statuses_since(probe: Any, index: int) -> list[Any]:
    found = (_flow_status(d) for d in probe.snapshot("diag")[index:])
    return [s for s in found if s is not None]


def test_a_paused_clock_is_a_warn_with_its_duration_and_ok_again_when_it_moves(
    tmp_path: Path,
) -> None:
    params = faulty_double_params(tmp_path / "control", **{"diagnostics.clock_stall_s": 1.0})
    proc = NodeProcess.with_doubles(params, tmp_path / "node.log")
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS, pace_s=0.1, lockstep=False, frame_every=5)
        driver.start(proc)
        driver.run_until(lambda: probe.count("state") >= 2, 60, "units", proc)
        mark = probe.count("diag")
        driver.run_until(
            lambda: any(s.level == OK for s in _statuses_since(probe, mark)), 30, "an OK", proc
        )
        moving = _statuses_since(probe, mark)
        assert all(_values(s).get("clock_stalled_s") == "0.0" for s in moving)

        # The /clock publisher goes away; the microphone driver keeps sending for a while.
        mark = probe.count("diag")
        for _ in range(10):
            probe.mic_pub.publish(mic_chunk(driver.now_ns, 100_000_000))
            driver.now_ns += 100_000_000  # the driver carries on after these chunks
            time.sleep(0.1)

        def stalled() -> bool:
            return any(
                float(_values(s).get("clock_stalled_s", "0")) >= 2.0
                for s in _statuses_since(probe, mark)
            )

        wait_for(stalled, 20, "a clock-stall report", proc)
        report = next(
            s
            for s in _statuses_since(probe, mark)
            if float(_values(s).get("clock_stalled_s", "0")) >= 2.0
        )
        assert report.level == WARN, report
        assert "clock not advancing" in report.message, report.message
        assert "mic/camera messages arrived meanwhile" in report.message, report.message

        # The clock moves again: the stall is over and the node is OK again.
        mark = probe.count("diag")
        driver.run_until(
            lambda: any(
                s.level == OK and _values(s).get("clock_stalled_s") == "0.0"
                for s in _statuses_since(probe, mark)
            ),
            30,
            "OK after the clock moved again",
            proc,
        )
        assert proc.interrupt_and_wait() == 0
