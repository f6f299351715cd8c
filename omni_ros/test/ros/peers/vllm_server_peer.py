"""Run ``LoopbackVllmServer`` (the vllm-omni replica double) as a process of its own (a test peer).

Usage: ``python vllm_server_peer.py DIR``. The server listens on 127.0.0.1 (a free port) and talks
to the test through files in ``DIR``, so that the node under test, this server and the test are
three processes, as on a robot talking to a fleet:

- ``DIR/port`` is written once the server listens;
- ``DIR/status.json`` is rewritten (atomically) every 50 ms: how many client messages of each type
  arrived, how many sessions are live, how many were closed politely (``session.close`` answered
  with ``session.closed``);
- ``DIR/fault`` is read every 50 ms: its text is the server's ``fault`` switch (``hang``: appends
  are swallowed, so the client waits for a decision that never comes: a unit stays in flight); an
  empty or missing file clears it.

SIGTERM or SIGINT stops the server; the process exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # omni_ros/test: the ``unit`` package

from unit.backends.loopback_vllm_server import LoopbackVllmServer


def main() -> int:
    """Serve until a signal; see the module docstring."""
    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # One unit every second and no self-run silence units: the client's own appends drive it.
    server = LoopbackVllmServer(continuation_period_s=3600.0).start()
    tmp = folder / ".port.tmp"
    tmp.write_text(str(server.port))
    os.replace(tmp, folder / "port")
    try:
        while not stop.wait(0.05):
            fault_file = folder / "fault"
            fault = fault_file.read_text().strip() if fault_file.exists() else ""
            with server.lock:
                server.fault = fault or None
                types: dict[str, int] = {}
                for msg in server.received:
                    kind = str(msg.get("type"))
                    types[kind] = types.get(kind, 0) + 1
                live = len(server.live_sessions())
                status = {
                    "received": types,
                    "live_sessions": live,
                    "closed_politely": server.closed_sessions,
                }
            tmp = folder / ".status.tmp"
            tmp.write_text(json.dumps(status))
            os.replace(tmp, folder / "status.json")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
