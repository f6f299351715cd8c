"""Guard: ``omni_ros.core`` and the ROS-free modules beside it (``omni_ros.topics``, the topic
table; ``omni_ros.audio_io``, audio devices, sinks and WAV files) import no rclpy and no message
package, directly or transitively."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "omni_ros" / "core"
#: ROS-free modules outside the core (the package's top level; ``omni_ros/ros/`` is the ROS layer).
BESIDE_CORE = [CORE.parent / "topics.py", CORE.parent / "audio_io.py"]
FORBIDDEN_PREFIXES = (
    "rclpy",
    "rosidl",
    "builtin_interfaces",
    "rosgraph_msgs",
    "ament_index_python",
)


def _forbidden(module: str) -> bool:
    top = module.split(".")[0]
    return top.startswith(FORBIDDEN_PREFIXES) or top.endswith(("_msgs", "_srvs", "_interfaces"))


def test_no_core_source_file_imports_ros_or_messages() -> None:
    offenders = []
    files = sorted(CORE.rglob("*.py")) + BESIDE_CORE
    assert all(p.is_file() for p in BESIDE_CORE), BESIDE_CORE
    assert files, f"no core sources found under {CORE}"
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}:{node.lineno} {n}" for n in names if _forbidden(n)]
    assert offenders == []


def test_importing_every_core_module_loads_no_ros_module() -> None:
    modules = sorted(
        "omni_ros.core." + p.relative_to(CORE).with_suffix("").as_posix().replace("/", ".")
        for p in CORE.rglob("*.py")
        if p.name != "__init__.py"
    ) + ["omni_ros." + p.stem for p in BESIDE_CORE]
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=CORE.parents[1],
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert [m for m in loaded if _forbidden(m)] == []


def test_the_guard_recognises_ros_modules() -> None:
    # The guard itself must be able to fail: these are exactly what it has to catch.
    assert _forbidden("rclpy.node")
    assert _forbidden("omni_ros_msgs.msg")
    assert _forbidden("sensor_msgs")
    assert not _forbidden("numpy")
