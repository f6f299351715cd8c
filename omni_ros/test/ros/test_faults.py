"""Fault injection against the real omni_flow_node over DDS (localhost, bounded): backend
exceptions, a hung backend, slow units, a vanished and a returning server, microphone and camera
stopping and resuming, malformed messages at a high rate, clock jumps back and forward.

Every scenario checks the same things: the node stays up and answers ``get_state`` while the fault
lasts, the fault is counted or reported (``/diagnostics``, ``OmniState.mode``), units come again
once it ends, threads and fds are where they were, and Ctrl-C ends it with exit code 0 and no
traceback. ``make test`` runs each fault briefly; ``make faults`` runs the same scenarios
``OMNI_ROS_FAULT_SCALE`` (default 10) times longer and prints the figures.

The faulty backend is a scripted double (``peers/backend_doubles.py``: ``faulty_double``): its
faults are switched on and off through files, across processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("rclpy")

from flow_harness import (
    NS_PER_S,
    NodeProcess,
    Probe,
    SimDriver,
    diag_values,
    faulty_double_params,
    image,
    mic_chunk,
    running,
    wait_for,
)

SCALE = float(os.environ.get("OMNI_ROS_FAULT_SCALE", "1"))
pytestmark = [pytest.mark.ros, pytest.mark.timeout(int(240 * max(1.0, SCALE)))]

BAG_START_NS = 1000 * NS_PER_S
ERROR = 4
COUNTERS = (
    "dropped_frames", "dropped_audio_samples", "late_messages", "gap_samples_filled",
    "decode_errors", "clock_jumps", "future_messages", "units_dropped_overrun", "backend_errors",
    "backend_timeouts",
)  # fmt: skip


class Scene:
    """A node with the faulty double, a driver at real-time pace and the fault switches."""

    def __init__(self, probe: Probe, proc: NodeProcess, control: Path) -> None:
        self.probe, self.proc, self.control = probe, proc, control
        self.driver = SimDriver(probe, BAG_START_NS, pace_s=0.1, lockstep=False, frame_every=5)
        from lifecycle_msgs.srv import GetState

        self._get_state = probe.node.create_client(
            GetState, f"{proc.namespace}/omni_flow_node/get_state"
        )
        self.worst_get_state_s = 0.0
        self.bad_audio_sent = 0  # samples of undecodable chunks, as the node counts them

    def switch(self, name: str, on: bool) -> None:
        path = self.control / name
        if on:
            path.write_text("on")
        else:
            path.unlink(missing_ok=True)

    def responsive(self) -> None:
        """get_state answers (the executor is not blocked by the fault)."""
        from lifecycle_msgs.srv import GetState

        started = time.monotonic()
        self.probe.call(self._get_state, GetState.Request(), self.proc, 5.0, resend_s=1.0)
        self.worst_get_state_s = max(self.worst_get_state_s, time.monotonic() - started)

    def run_s(self, seconds: float, each_step: Callable[[], None] | None = None) -> None:
        for i in range(round(seconds * 10)):
            self.driver.step(1, self.proc)
            if each_step is not None:
                each_step()
            if i % 10 == 0:
                self.responsive()

    def diag(self) -> dict[str, str]:
        found = [
            v for v in (diag_values(d) for d in self.probe.snapshot("diag")) if v and "backend" in v
        ]
        return found[-1] if found else {}

    def counter(self, key: str) -> int:
        return int(self.diag().get(key, "0") or 0)

    def units_resume(self, what: str) -> None:
        count = self.probe.count("state")
        deadline = time.monotonic() + 60
        while not any(s.mode != ERROR for s in self.probe.snapshot("state")[count:]):
            assert time.monotonic() < deadline, f"no unit after {what}\n{self.proc.log()}"
            self.driver.step(1, self.proc)


def _audio_accounting(values: dict[str, str], sent: int) -> dict[str, Any]:
    """Where the mic samples went (``/diagnostics``), checked: the causes add up to the totals,
    and sent >= in = used + dropped + held with held >= 0 (held: what the open units, the
    backlog and the buffers still have when the scenario ends)."""
    num = {k: int(v) for k, v in values.items() if v.isdigit()}
    drops = {k[14:]: v for k, v in num.items() if k.startswith("audio_dropped_") and v}
    gaps = {k[11:]: v for k, v in num.items() if k.startswith("gap_filled_") and v}
    assert sum(drops.values()) == num["dropped_audio_samples"], values
    assert sum(gaps.values()) == num["gap_samples_filled"], values
    held = num["audio_samples_in"] - num["audio_samples_used"] - num["dropped_audio_samples"]
    assert held >= 0, values
    assert num["audio_samples_in"] <= sent, (sent, values)
    return {"sent": sent, "in": num["audio_samples_in"], "used": num["audio_samples_used"],
            "held": held, "dropped": drops, "gaps": gaps}  # fmt: skip


def _threads_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(x for x in status.splitlines() if x.startswith("Threads:")).split()[1])
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


@contextmanager
def faulty_node(tmp_path: Path, **extra: Any) -> Iterator[Scene]:
    control = tmp_path / "control"
    params = faulty_double_params(control, **{"flow.backend_deadline_ms": 2000, **extra})
    proc = NodeProcess.with_doubles(params, tmp_path / "node.log")
    with running(proc) as probe:
        scene = Scene(probe, proc, control)
        scene.driver.start(proc)
        scene.run_s(3)
        wait_for(lambda: probe.count("state") >= 1, 30, "a first unit", proc)
        before = _threads_fds(proc.proc.pid)
        yield scene
        for name in ("raise", "slow", "down", "hang"):
            scene.switch(name, False)
        scene.units_resume("the fault ended")
        scene.run_s(2)
        after = _threads_fds(proc.proc.pid)
        values = scene.diag()
        counters = {k: v for k, v in values.items() if v not in ("0", "") and k in COUNTERS}
        audio = _audio_accounting(values, scene.driver.mic_samples_sent + scene.bad_audio_sent)
        print(
            f"\nFAULT {os.environ.get('PYTEST_CURRENT_TEST', '').split('::')[-1].split(' ')[0]}: "
            f"threads {before[0]} -> {after[0]}, fds {before[1]} -> {after[1]}, "
            f"worst get_state {scene.worst_get_state_s * 1000:.0f} ms, counters {counters}, "
            f"audio {audio}"
        )
        assert after[0] <= before[0] + 1, (before, after)
        assert after[1] <= before[1] + 2, (before, after)
        assert scene.worst_get_state_s < 2.0
        assert proc.interrupt_and_wait() == 0
        assert "Traceback" not in proc.log(), proc.log()


def test_backend_exceptions_are_reported_as_error_and_the_node_recovers(tmp_path: Path) -> None:
    with faulty_node(tmp_path) as scene:
        scene.switch("raise", True)
        scene.run_s(3 * SCALE)
        assert any(s.mode == ERROR for s in scene.probe.snapshot("state"))
        assert scene.counter("backend_errors") >= 1


def test_a_hung_backend_times_out_and_the_node_recovers(tmp_path: Path) -> None:
    with faulty_node(tmp_path) as scene:
        scene.switch("hang", True)
        scene.run_s(4 * SCALE)
        wait_for(lambda: scene.counter("backend_timeouts") >= 1, 10, "a timeout", scene.proc)


def test_slow_units_are_dropped_by_the_overrun_policy_not_queued(tmp_path: Path) -> None:
    # 2.5 s per 1 s unit, under a 4 s deadline: slow, not hung; the backlog must stay bounded.
    slow = {"faulty_double.slow_ms": 2500, "flow.backend_deadline_ms": 4000}
    with faulty_node(tmp_path, **slow) as scene:
        scene.switch("slow", True)
        scene.run_s(6 * SCALE)
        wait_for(lambda: scene.counter("units_dropped_overrun") >= 1, 20, "an overrun", scene.proc)


def test_a_vanished_server_is_an_error_and_a_returning_one_is_used_again(tmp_path: Path) -> None:
    with faulty_node(tmp_path) as scene:
        scene.switch("down", True)
        scene.run_s(3 * SCALE)
        assert any(s.mode == ERROR for s in scene.probe.snapshot("state"))


def test_microphone_and_camera_stop_and_resume(tmp_path: Path) -> None:
    with faulty_node(tmp_path) as scene:
        gaps = scene.counter("gap_samples_filled")
        scene.driver.send_mic, scene.driver.frame_every = False, 0
        scene.run_s(3 * SCALE)
        scene.driver.send_mic, scene.driver.frame_every = True, 5
        scene.run_s(3)
        assert scene.counter("gap_samples_filled") > gaps


def test_malformed_messages_at_a_high_rate_are_counted_without_blocking(tmp_path: Path) -> None:
    with faulty_node(tmp_path) as scene:
        errors = scene.counter("decode_errors")
        sent = [0]

        def flood() -> None:
            t = scene.driver.now_ns
            for i in range(10):  # 100 Hz of bad audio and 100 Hz of bad frames at 10 steps/s
                chunk = mic_chunk(t + i, 10_000_000, encoding="MP3")
                scene.probe.mic_pub.publish(chunk)
                scene.probe.cam_pub.publish(image(t + i, step=1))
                sent[0] += 2
                scene.bad_audio_sent += len(chunk.data) // 2  # counted as 16-bit mono frames

        scene.run_s(3 * SCALE, flood)
        wait_for(
            lambda: scene.counter("decode_errors") >= errors + sent[0] // 4,
            20,
            "the malformed messages counted",
            scene.proc,
        )


def test_clock_jumps_back_and_forward(tmp_path: Path) -> None:
    with faulty_node(tmp_path) as scene:
        for _ in range(max(1, round(SCALE))):
            scene.driver.now_ns = BAG_START_NS  # a looping bag: back to the start
            scene.run_s(3)
            scene.driver.now_ns += 60 * NS_PER_S  # and a minute ahead
            scene.run_s(3)
        wait_for(lambda: scene.counter("clock_jumps") >= 1, 20, "the clock jump", scene.proc)
