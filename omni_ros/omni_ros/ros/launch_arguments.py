"""The launch files' arguments and optional nodes, in one table each.

``launch/omni_flow.launch.py`` declares :data:`ARGUMENTS` and starts :data:`OPTIONAL_NODES` on
their flags; ``launch/replay.launch.py`` declares :func:`replay_arguments` (the same arguments,
only :data:`REPLAY_DEFAULTS` differ) and forwards them all. Nothing here imports ``launch`` or
rclpy, so the tables and :func:`check_arguments` are tested on machines without a ROS install.
The backend list comes from :data:`omni_ros.backends.base.REGISTRY`, the ``mic.type`` values
from :data:`omni_ros.ros.audio_common.MIC_TYPES`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from omni_ros.backends.base import BACKEND_CHOICES, BACKENDS
from omni_ros.ros.audio_common import MIC_TYPES as _MIC_TYPES

#: What ``IfCondition`` and the ROS command line accept, spelled the ways users type them.
BOOLEAN = ["true", "false", "True", "False"]
#: ``mic.type`` values ("" keeps the params file's).
MIC_TYPES = ["", *_MIC_TYPES]
#: rcutils' severities (``--log-level``); anything else makes rclpy.init raise in the node.
LOG_LEVELS = ["debug", "info", "warn", "error", "fatal"]


@dataclass(frozen=True)
class Argument:
    """One launch argument; ``launch`` itself rejects a value outside ``choices``."""

    name: str
    default: str
    description: str
    choices: list[str] | None = None


#: Every argument of omni_flow.launch.py (and, with :data:`REPLAY_DEFAULTS`, of replay.launch.py).
ARGUMENTS: tuple[Argument, ...] = (
    # No launch-side choices: check_arguments names the backends (and replays register none here).
    Argument("backend", "reference", BACKEND_CHOICES),
    Argument(
        "model", "", "model folder / id (reference: tiny | full); empty: the params file's value"
    ),
    Argument("params_file", "", "parameters YAML; empty: share/omni_ros/config/<backend>.yaml"),
    Argument("namespace", "", "namespace of every node"),
    Argument("use_sim_time", "false", "use /clock (bag replay)", BOOLEAN),
    Argument(
        "with_mic",
        "false",
        "also start mic_node (config/mic.yaml + params_file's mic_node:)",
        BOOLEAN,
    ),
    Argument(
        "with_speaker",
        "false",
        "also start speaker_node (config/speaker.yaml + params_file's speaker_node:)",
        BOOLEAN,
    ),
    Argument(
        "with_foxglove",
        "false",
        "also start omni_live_view (Foxglove WebSocket on localhost)",
        BOOLEAN,
    ),
    Argument("foxglove_port", "8765", "omni_live_view's port"),
    Argument("engine_dir", "", "TensorRT engine folder; non-empty enables TensorRT"),
    Argument("log_level", "info", " | ".join(LOG_LEVELS), LOG_LEVELS),
    Argument("camera_topic", "", "the camera driver's image topic; empty: camera/image_raw"),
    Argument("mic_topic", "", "the microphone driver's topic; empty: audio/mic"),
    Argument(
        "mic_type",
        "",
        "audio/mic message type (mic.type); empty: the params file's value",
        MIC_TYPES,
    ),
    Argument(
        "dds_profile",
        "",
        "Fast DDS profile for every node started here; empty: the shipped "
        "config/fastdds_camera.xml (camera-size frames arrive), none: Fast DDS defaults",
    ),
)

#: replay.launch.py's own defaults: name -> (default, description). Everything else is as above.
REPLAY_DEFAULTS: dict[str, tuple[str, str]] = {
    "use_sim_time": ("true", "use /clock (the bag player's --clock)"),
}


def replay_arguments() -> tuple[Argument, ...]:
    """:data:`ARGUMENTS` with :data:`REPLAY_DEFAULTS` applied."""
    return tuple(
        dataclasses.replace(
            a, default=REPLAY_DEFAULTS[a.name][0], description=REPLAY_DEFAULTS[a.name][1]
        )
        if a.name in REPLAY_DEFAULTS
        else a
        for a in ARGUMENTS
    )


@dataclass(frozen=True)
class OptionalNode:
    """A node started next to omni_flow_node when its boolean argument is true."""

    flag: str
    executable: str
    #: Its shipped params file in ``config/`` (laid under the params file's own section), if any.
    config: str | None


OPTIONAL_NODES: tuple[OptionalNode, ...] = (
    OptionalNode("with_mic", "mic_node", "mic.yaml"),
    OptionalNode("with_speaker", "speaker_node", "speaker.yaml"),
    OptionalNode("with_foxglove", "omni_live_view", None),
)


class LaunchArgumentError(RuntimeError):
    """A launch argument that cannot work; launch prints the message and exits non-zero."""


_NAMESPACE = re.compile(r"^/?([A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*)?/?$")
_TOPIC = re.compile(r"^/?[A-Za-z_~][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")


def check_arguments(
    values: Mapping[str, str], is_file: Callable[[str], bool] | None = None
) -> None:
    """Check every argument beyond the choices ``launch`` enforces itself.

    Args:
        values: argument name -> value, for every name in :data:`ARGUMENTS`.
        is_file: checks that ``params_file`` exists (the launch file passes ``os.path.isfile``).

    Raises:
        LaunchArgumentError: naming the argument and what is wrong with its value.
    """
    if values["backend"] not in BACKENDS:
        raise LaunchArgumentError(
            f"backend:={values['backend']} unknown; choose one of {sorted(BACKENDS)}"
        )
    if values["params_file"] and is_file is not None and not is_file(values["params_file"]):
        raise LaunchArgumentError(f"params_file:={values['params_file']} is not a file")
    for name in ("camera_topic", "mic_topic"):
        if values[name] and not _TOPIC.match(values[name]):
            raise LaunchArgumentError(f"{name}:={values[name]} is not a ROS topic name")
    if not _NAMESPACE.match(values["namespace"]):
        raise LaunchArgumentError(
            f"namespace:={values['namespace']} is not a ROS namespace "
            "(letters, digits and _ in /-separated tokens, not starting with a digit)"
        )
    if not values["foxglove_port"].isdigit() or not 0 < int(values["foxglove_port"]) < 65536:
        raise LaunchArgumentError(f"foxglove_port:={values['foxglove_port']} is not a port number")
    for argument in ARGUMENTS:
        # launch checks choices when the argument is declared; an including file may bypass that.
        if argument.choices is not None and values[argument.name] not in argument.choices:
            raise LaunchArgumentError(
                f"{argument.name}:={values[argument.name]} is not one of {argument.choices}"
            )
