"""A rosbags typestore that knows omni_ros_msgs, registered from the project's own .msg files.

Bags are read and written with the ``rosbags`` library (no rosbag2_py needed). Type hashes computed by
rosbags from the .msg text match rosidl's, so bags written here are readable by ``ros2 bag``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from omni_ros.core.errors import ConfigError

PACKAGE = "omni_ros_msgs"


def msg_dir() -> Path:
    """Where the omni_ros_msgs ``.msg`` files are: the installed share dir, else the source tree."""
    override = os.environ.get("OMNI_ROS_MSGS_DIR")
    candidates: list[Path] = [Path(override)] if override else []
    try:
        from ament_index_python.packages import get_package_share_directory

        candidates.append(Path(get_package_share_directory(PACKAGE)) / "msg")
    except Exception:  # ament_index not importable, or package not on AMENT_PREFIX_PATH
        pass
    # Source checkout: <repo>/omni_ros/omni_ros/tools/typestore.py -> <repo>/omni_ros_msgs/msg
    candidates.append(Path(__file__).resolve().parents[3] / PACKAGE / "msg")
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.msg")):
            return candidate
    raise ConfigError(
        f"cannot find {PACKAGE}/msg/*.msg (looked in {[str(c) for c in candidates]}); "
        "source install/setup.sh or set OMNI_ROS_MSGS_DIR"
    )


@functools.cache
def omni_typestore() -> Typestore:
    """The ROS 2 Kilted typestore plus every omni_ros_msgs message type."""
    store = get_typestore(Stores.ROS2_KILTED)
    types = {}
    for path in sorted(msg_dir().glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"{PACKAGE}/msg/{path.stem}"))
    store.register(types)
    return store
