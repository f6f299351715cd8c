"""``omni_flow_node`` with ``backend: vllm_omni`` against the vllm-omni replica double run as a
process of its own (``peers/vllm_server_peer.py``): signals and lifecycle cleanup while a unit is
in flight.

Three processes, as on a robot using a fleet: the server double, the installed node, and this test
(microphone, /clock, lifecycle client). A unit is put in flight by switching the server's ``hang``
fault on (appends are swallowed: the backend waits for a decision that never comes, up to
``vllm_omni.unit_timeout_s``).

On the code before the fix (issues 15 and 16): the node's close reached
``VllmOmniBackend.close()`` while the unit's ``recv()`` still ran on the backend-call thread;
``close()`` then called ``recv()`` itself (waiting for ``session.closed``) and websockets raised
``ConcurrencyError`` (``websockets/sync/messages.py: Assembler.get``: "get() or get_iter() is
already running"). The session was never closed politely (its slot stayed taken on the replica),
and after a cleanup the in-flight call went on to resume the session on a new socket.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omni_ros.core.clock import NS_PER_S

pytest.importorskip("rclpy")
pytest.importorskip("websockets")

from flow_harness import (
    NodeProcess,
    SimDriver,
    lifecycle_transition,
    running,
    stop_process,
    wait_for,
)

pytestmark = [pytest.mark.ros, pytest.mark.timeout(240)]

PEER = Path(__file__).parent / "peers" / "vllm_server_peer.py"
BAG_START_NS = 2000 * NS_PER_S


class ServerPeer:
    """The vllm-omni replica double in its own process; its state comes back through files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._log = open(folder / "server.log", "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), str(folder)], stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_for(lambda: (folder / "port").exists(), 30, "the vllm server double's port", self)
        self.url = f"ws://127.0.0.1:{int((folder / 'port').read_text())}"

    # wait_for() reads these to fail early when the peer died
    def poll(self) -> int | None:
        return self.proc.poll()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        return "--- vllm server double log ---\n" + (self.folder / "server.log").read_text()[-4000:]

    def status(self) -> dict[str, Any]:
        path = self.folder / "status.json"
        return json.loads(path.read_text()) if path.exists() else {"received": {}}

    def received(self, kind: str) -> int:
        return int(self.status()["received"].get(kind, 0))

    def set_fault(self, fault: str) -> None:
        (self.folder / "fault").write_text(fault)
        # the peer applies it within 50 ms; wait two of its status rewrites to be sure
        first = (self.folder / "status.json").stat().st_mtime_ns
        wait_for(lambda: (self.folder / "status.json").stat().st_mtime_ns != first, 10, "status")
        second = (self.folder / "status.json").stat().st_mtime_ns
        wait_for(lambda: (self.folder / "status.json").stat().st_mtime_ns != second, 10, "status")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerPeer]:
    peer = ServerPeer(tmp_path / "server")
    try:
        yield peer
    finally:
        peer.stop()


def _voice(tmp_path: Path) -> Path:
    from omni_ros.backends import _wire

    noise = np.random.default_rng(3).normal(0, 0.1, 16_000).astype(np.float32)
    return _wire.write_wav(tmp_path / "voice.wav", noise, 16_000)


def _node(tmp_path: Path, server: ServerPeer) -> NodeProcess:
    params = {
        "backend": "vllm_omni",
        "use_sim_time": True,
        "timeline.watermark_ns": 500_000_000,
        "diagnostics.period_s": 0.2,
        "ref_voice_path": str(_voice(tmp_path)),
        "vllm_omni.urls": f'["{server.url}"]',
        "vllm_omni.heartbeat_interval_s": 0.0,
        # Longer than the node's bounded wait at close (5 s): without the fix the call in flight
        # is still in recv() when the node gives up waiting and closes the backend.
        "vllm_omni.unit_timeout_s": 30.0,
        "flow.backend_deadline_ms": 60_000,  # the one deadline owner: above the timeout it bounds
        "vllm_omni.retries": 0,
    }
    return NodeProcess.installed(params, tmp_path / "node.log")


def _unit_in_flight(server: ServerPeer, driver: SimDriver, proc: NodeProcess) -> None:
    """Let units flow, then hang the server and wait until the node's next append reached it."""
    driver.run_until(lambda: driver.probe.count("state") >= 2, 90, "units from vllm_omni", proc)
    server.set_fault("hang")
    appends = server.received("input_audio_buffer.append")
    driver.run_until(
        lambda: server.received("input_audio_buffer.append") > appends, 60, "a hung unit", proc
    )


@pytest.mark.parametrize(
    "signals", [(signal.SIGTERM,), (signal.SIGINT,), (signal.SIGINT, signal.SIGINT)]
)
def test_a_signal_with_a_vllm_unit_in_flight_exits_cleanly_and_closes_the_session(
    tmp_path: Path, server: ServerPeer, signals: tuple[signal.Signals, ...]
) -> None:
    proc = _node(tmp_path, server)
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS, frame_every=5, lockstep=False)
        driver.start(proc)
        _unit_in_flight(server, driver, proc)
        sent = time.monotonic()
        for sig in signals:
            proc.proc.send_signal(sig)
            time.sleep(0.3)
        code = proc.proc.wait(timeout=60)
        took = time.monotonic() - sent
        log = proc.log()
        assert code == 0, log
        assert "Traceback" not in log, log
        assert "ConcurrencyError" not in log, log
        assert "closing the backend failed" not in log, log
        if len(signals) == 1:
            # interrupt() ended the call in flight: the node never had to give up waiting for it,
            # and it closed the session politely (the replica's slot is free at once).
            assert "still running after" not in log, log
            wait_for(lambda: server.status()["closed_politely"] >= 1, 10, "session.closed", server)
            assert server.status()["live_sessions"] == 0, server.status()
        print(f"{[s.name for s in signals]}: exit {code} after {took:.2f} s")


def test_cleanup_with_a_vllm_unit_in_flight_leaves_the_node_usable(
    tmp_path: Path, server: ServerPeer
) -> None:
    """Issue 16: deactivate + cleanup while a unit waits for the server, then configure +
    activate: units flow again on a new session, the old one was closed politely, nothing failed.

    Before the fix the cleanup waited 5 s for the call, then the close raised ConcurrencyError
    (logged), and the call in flight went on reading a socket its backend no longer owned.
    """
    from lifecycle_msgs.msg import Transition

    proc = _node(tmp_path, server)
    with running(proc) as probe:
        change, get_state = probe.lifecycle(proc)

        def transition(tid: int) -> None:
            took = lifecycle_transition(change, get_state, tid, proc, timeout_s=30)
            assert took, (tid, proc.log())

        driver = SimDriver(probe, BAG_START_NS, frame_every=5, lockstep=False)
        driver.start(proc)
        _unit_in_flight(server, driver, proc)
        transition(Transition.TRANSITION_DEACTIVATE)
        transition(Transition.TRANSITION_CLEANUP)
        wait_for(lambda: server.status()["live_sessions"] == 0, 10, "the old session closed", proc)
        assert server.status()["closed_politely"] == 1, server.status()
        server.set_fault("")
        transition(Transition.TRANSITION_CONFIGURE)
        transition(Transition.TRANSITION_ACTIVATE)
        states = probe.count("state")
        driver.run_until(lambda: probe.count("state") >= states + 2, 90, "units again", proc)
        assert server.status()["live_sessions"] == 1, server.status()
        assert server.received("session.update") == 2  # the old session was never resumed
        assert server.received("session.resume") == 0
        log = proc.log()
        for bad in ("Traceback", "ConcurrencyError", "closing the backend failed", "still running"):
            assert bad not in log, log
