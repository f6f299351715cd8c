"""Run the real ``omni_flow_node`` with the test backend doubles registered (a test peer process).

Usage: ``python flow_node_runner.py --ros-args -p backend:=blocking_double ...``. The doubles are
added to ``BACKENDS`` at runtime (the package never lists them); everything else is the installed
node's ``main()``, unchanged.

With ``OMNI_TEST_SPY_DIR`` set, every microphone chunk that the node hands to
``OmniFlow.push_audio`` also creates ``<dir>/audio_<stamp_ns>`` (holding rate, channels, encoding and size): a test can then see, across
processes, that the node's subscription callback ran (e.g. while the backend is still blocked).

With ``OMNI_TEST_AEC_SPY`` set to a file path, the echo canceller's delay bookkeeping is written
there whenever it changes (``<accepted estimates> <filter resets> <refused for no echo> <delay ns>``):
a test can see across processes whether the node believed a delay (and re-aligned its filter).

With ``OMNI_TEST_EXECUTOR_STALL_S`` set, every ``robot_speaking`` message blocks the node's
executor for that many seconds (a callback that blocks: nothing else is taken meanwhile, while
the middleware keeps receiving and the flow's worker keeps closing units); the message itself is
ignored.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from omni_ros.backends import base
from omni_ros.core import aec as aec_module
from omni_ros.core import flow
from omni_ros.ros import omni_flow_node

base.BACKENDS["speak_until_interrupted_double"] = (
    "backend_doubles:SpeakUntilInterruptedBackendDouble"
)
base.BACKENDS["blocking_double"] = "backend_doubles:BlockingBackendDouble"
base.BACKENDS["faulty_double"] = "backend_doubles:FaultyBackendDouble"
base.BACKENDS["turns_double"] = "backend_doubles:TurnsBackendDouble"
base.BACKENDS["down_server_double"] = "backend_doubles:DownServerBackendDouble"

SPY_DIR = os.environ.get("OMNI_TEST_SPY_DIR", "")
if SPY_DIR:
    _push_audio = flow.OmniFlow.push_audio

    def _spied_push_audio(self: flow.OmniFlow, raw: Any, *args: Any, **kwargs: Any) -> None:
        _push_audio(self, raw, *args, **kwargs)
        path = os.path.join(SPY_DIR, f"audio_{raw.stamp_ns}")  # type: ignore[attr-defined]
        with open(path, "w", encoding="utf-8") as spied:
            # What the node handed to the flow: rate, channels, encoding, payload size.
            spied.write(f"{raw.sample_rate} {raw.channels} {raw.encoding} {len(raw.data)}")  # type: ignore[attr-defined]

    flow.OmniFlow.push_audio = _spied_push_audio  # type: ignore[method-assign]

AEC_SPY = os.environ.get("OMNI_TEST_AEC_SPY", "")
if AEC_SPY:
    # Wraps the echo canceller's own per-block entry point (core/aec.py), not a private method of
    # the flow, so the spy survives changes to how the flow calls it.
    _process = aec_module.EchoCanceller.process

    def _spied_process(self: aec_module.EchoCanceller, *args: Any, **kwargs: Any) -> Any:
        out = _process(self, *args, **kwargs)
        line = f"{self.delay_estimates} {self.filter_resets} {self.delay_rejected_no_echo} {self.delay_ns}"
        if line != getattr(self, "_aec_spy_line", None):
            self._aec_spy_line = line  # type: ignore[attr-defined]
            with open(AEC_SPY + ".tmp", "w", encoding="utf-8") as spied:
                spied.write(line)
            os.replace(AEC_SPY + ".tmp", AEC_SPY)  # the test never reads half a line
        return out

    aec_module.EchoCanceller.process = _spied_process  # type: ignore[method-assign]

STALL_S = float(os.environ.get("OMNI_TEST_EXECUTOR_STALL_S", "0") or 0)
if STALL_S > 0:

    def _stalling_robot_speaking(self: omni_flow_node.OmniFlowNode, msg: object) -> None:
        time.sleep(STALL_S)

    omni_flow_node.OmniFlowNode._on_robot_speaking = _stalling_robot_speaking  # type: ignore[method-assign]

if __name__ == "__main__":
    omni_flow_node.main()
