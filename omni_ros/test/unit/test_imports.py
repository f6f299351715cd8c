"""Every module of the package imports on this interpreter (Python 3.10 to 3.12).

Modules whose import needs something this environment does not have (rclpy and the built
messages outside a sourced workspace, torch in the Python 3.10 check, TensorRT without a GPU) are
skipped with the missing module's name; anything else that fails to import (a syntax or stdlib
feature newer than the interpreter, e.g. ``datetime.UTC`` on 3.10) fails.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

import pytest

import omni_ros

#: Third-party packages a module may need that an environment may lack: ROS, the torch stack,
#: NVIDIA's. Kept short on purpose: a missing *pinned* dependency is a failure.
OPTIONAL = {
    "rclpy",
    "omni_ros_msgs",
    "std_msgs",
    "sensor_msgs",
    "std_srvs",
    "diagnostic_msgs",
    "rosgraph_msgs",
    "builtin_interfaces",
    "rcl_interfaces",
    "lifecycle_msgs",
    "action_msgs",
    "ament_index_python",
    "torch",
    "transformers",
    "onnx",
    "onnxruntime",
    "tensorrt",
    "pycuda",
    "pyaudio",
}
#: What `make test` (OMNI_ROS_REQUIRE_ROS=1) must have: then their absence fails.
ROS_CORE = {"rclpy", "omni_ros_msgs"}
MODULES = sorted(m.name for m in pkgutil.walk_packages(omni_ros.__path__, "omni_ros."))


def test_the_package_has_modules() -> None:
    assert len(MODULES) > 40


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name: str) -> None:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        root = (exc.name or "").split(".")[0]
        required = os.environ.get("OMNI_ROS_REQUIRE_ROS") == "1" and root in ROS_CORE
        if root not in OPTIONAL or required:
            raise
        pytest.skip(f"needs {root}, not in this environment")
    except ImportError as exc:  # rosidl's typesupport without a sourced workspace
        if "rosidl" not in str(exc) and "typesupport" not in str(exc):
            raise
        pytest.skip(f"needs the sourced ROS workspace: {exc}")
