"""Foxglove's own WebSocket client (``foxglove/client.js``: @foxglove/ws-protocol, @foxglove/rosmsg,
@foxglove/rosmsg2-serialization) run in node, for the live-view tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

CLIENT_DIR = Path(__file__).resolve().parent / "foxglove"


def node_executable() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (apt-get install nodejs; make setup does)")
    if not (CLIENT_DIR / "node_modules" / "@foxglove" / "ws-protocol").is_dir():
        pytest.fail(f"npm packages missing: run `make build` (npm ci in {CLIENT_DIR})")
    return node


class Client:
    """The node client in a subprocess; ``subscribed`` counts its subscriptions (stderr)."""

    def __init__(self, url: str, idle_ms: int = 4000, max_ms: int = 120_000) -> None:
        self.proc = subprocess.Popen(
            [node_executable(), str(CLIENT_DIR / "client.js"), url, str(idle_ms), str(max_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        self.subscribed = 0
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            if line.startswith("subscribed "):
                self.subscribed = int(line.split()[1])

    def result(self, timeout_s: float = 150) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=timeout_s)
        assert self.proc.returncode == 0, "".join(self.stderr)
        return dict(json.loads(out.strip().splitlines()[-1]))
