"""Run the real ``omni_flow_node`` with the benchmark's ``bench_planned`` backend registered.

Usage: ``python benchmarks/_flow_runner.py --ros-args --params-file P.yaml``. The backend is added
to ``BACKENDS`` at runtime (the package never lists it); everything else is the installed node's
``main()``, unchanged.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from omni_ros.backends import base
from omni_ros.ros import omni_flow_node

base.BACKENDS["bench_planned"] = "_bench_backend:PlannedBackend"

if __name__ == "__main__":
    omni_flow_node.main()
