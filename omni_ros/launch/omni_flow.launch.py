"""Launch omni_flow_node (a lifecycle node) and, optionally, mic_node and speaker_node.

Examples::

    ros2 launch omni_ros omni_flow.launch.py                                   # reference backend, tiny, CPU
    ros2 launch omni_ros omni_flow.launch.py backend:=minicpmo model:=/models/MiniCPM-o-4_5
    ros2 launch omni_ros omni_flow.launch.py backend:=llamacpp_omni with_mic:=true with_speaker:=true
    ros2 launch omni_ros omni_flow.launch.py namespace:=robot1 engine_dir:=/data/engines
    ros2 launch omni_ros omni_flow.launch.py with_mic:=true params_file:=robot.yaml   # see below
    ros2 launch omni_ros omni_flow.launch.py mic_topic:=/audio \
        mic_type:=audio_common_msgs/msg/AudioStamped camera_topic:=/camera/camera/color/image_raw

Arguments:
    backend: reference | minicpmo | llamacpp_omni | vllm_omni. Picks the default params file
        ``share/omni_ros/config/<backend>.yaml``.
    model: optional; sets the backend's model parameter: ``minicpmo.model``, ``vllm_omni.model``,
        ``llamacpp_omni.model_dir`` or ``reference.size`` (tiny | full).
    params_file: a parameters YAML used instead of ``config/<backend>.yaml``.
    namespace: namespace of every node (topics become ``/<namespace>/audio/mic`` ...).
    use_sim_time: true when time comes from /clock (bag replay).
    with_mic, with_speaker: also start mic_node / speaker_node.
    with_foxglove: also start omni_live_view: the conversation live in Foxglove on
        ``ws://127.0.0.1:<foxglove_port>`` (layout: ``share/omni_ros/config/foxglove_layout.json``).
    engine_dir: a TensorRT engine cache folder; non-empty turns ``tensorrt.enabled`` on.
    log_level: debug | info | warn | error | fatal.
    camera_topic: remap the node's camera input onto a driver's topic (RealSense
        ``/camera/camera/color/image_raw``, usb_cam / v4l2_camera ``/image_raw``); the compressed
        input when the params set ``camera.compressed: true``.
    mic_topic, mic_type: remap ``audio/mic`` onto a microphone driver's topic and set ``mic.type``
        (``audio_common_msgs/msg/AudioStamped`` for mgonzs13/audio_common,
        ``audio_common_msgs/msg/AudioDataStamped`` for ros-drivers/audio_common).
    dds_profile: Fast DDS XML profile for the nodes started here (``FASTDDS_DEFAULT_PROFILES_FILE``
        and, for Fast DDS 2 on Jazzy/Humble, ``FASTRTPS_DEFAULT_PROFILES_FILE``);
        empty (default): the shipped ``config/fastdds_camera.xml``, unless the environment already
        names one; ``none``: Fast DDS's defaults. The camera driver must use the same profile
        (docs/RELIABILITY.md): with the defaults, 640x480 rgb8 frames mostly do not arrive.

The argument table and the optional nodes are ``omni_ros.ros.launch_arguments`` (replay.launch.py
declares the same table). Every argument is checked before any node starts: a value outside its choices (``log_level:=verbose``,
``with_mic:=yes``), an unknown backend or a params file that does not exist stops the launch with a
message naming the argument, and ``ros2 launch`` exits non-zero.

The params file's ``omni_flow_node:`` (or ``/**:``) section is read here and handed to the node as
a parameter dictionary, which launch_ros writes under ``/**``: a plain ``omni_flow_node:`` key in a
file would not match the node once it runs in a namespace. Its ``mic_node:`` and ``speaker_node:``
sections, if any, are laid over ``config/mic.yaml`` / ``config/speaker.yaml`` the same way, so every
parameter of those nodes (``source: wav``, ``wav_path``, ``device``, ...) is reachable from
``params_file:=``.
"""

from __future__ import annotations

import os
from typing import Any

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from omni_ros.backends.base import MODEL_PARAMETER
from omni_ros.core.errors import ConfigError
from omni_ros.ros._params import flatten_parameters, read_params_file
from omni_ros.ros.launch_arguments import (
    ARGUMENTS,
    OPTIONAL_NODES,
    LaunchArgumentError,
    check_arguments,
)

PACKAGE = "omni_ros"
#: The shipped Fast DDS transport profile (large shared-memory segments: camera frames arrive).
DDS_PROFILE = "fastdds_camera.xml"
#: Fast DDS 3 (Kilted) reads FASTDDS_..., Fast DDS 2 (Jazzy, Humble) FASTRTPS_... (measured: on
#: Jazzy a profile named only by the first was ignored and 0 of 90 640x480 frames arrived).
DDS_PROFILE_VARIABLES = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")


def node_section(path: str, node_name: str) -> dict[str, Any]:
    """The flat ``ros__parameters`` of ``node_name`` in a ROS 2 params file (``/**`` merged first)."""
    return read_params_file(path, node_name)


def own_section(path: str, node_name: str) -> dict[str, Any]:
    """The flat parameters of the ``node_name:`` / ``/node_name:`` section only ({} if none).

    ``/**`` is left out on purpose: in omni_ros params files it holds omni_flow_node's parameters.
    """
    with open(path, encoding="utf-8") as stream:
        doc = yaml.safe_load(stream) or {}
    flat: dict[str, Any] = {}
    for key in (node_name, f"/{node_name}"):
        section = doc.get(key) if isinstance(doc, dict) else None
        if isinstance(section, dict) and isinstance(section.get("ros__parameters"), dict):
            flat.update(flatten_parameters(section["ros__parameters"]))
    return flat


def _is_true(text: str) -> bool:
    return text.strip().lower() == "true"


def _arguments(context: LaunchContext) -> dict[str, str]:
    """Every argument's value, checked beyond the choices launch already enforces."""
    values = {a.name: LaunchConfiguration(a.name).perform(context) for a in ARGUMENTS}
    check_arguments(values, is_file=os.path.isfile)
    return values


def _dds_profile(context: LaunchContext) -> list[Any]:
    chosen = LaunchConfiguration("dds_profile").perform(context).strip()
    user_set = any(os.environ.get(v) for v in DDS_PROFILE_VARIABLES)
    if chosen.lower() == "none" or (not chosen and user_set):
        return []
    path = chosen or os.path.join(get_package_share_directory(PACKAGE), "config", DDS_PROFILE)
    if not os.path.isfile(path):
        raise LaunchArgumentError(f"dds_profile:={path}: no such file")
    return [SetEnvironmentVariable(variable, path) for variable in DDS_PROFILE_VARIABLES]


def _ros_args(values: dict[str, str]) -> list[str]:
    return ["--ros-args", "--log-level", values["log_level"]]


def _audio_params(
    values: dict[str, str], config_dir: str, node: str, config: str
) -> dict[str, Any]:
    """``config/<config>`` with the params file's own ``<node>:`` section laid over it."""
    params = node_section(os.path.join(config_dir, config), node)
    if values["params_file"]:
        params.update(own_section(values["params_file"], node))
    params["use_sim_time"] = _is_true(values["use_sim_time"])
    return params


def _nodes(context: LaunchContext) -> list[Any]:
    values = _arguments(context)
    backend = values["backend"]
    config_dir = os.path.join(get_package_share_directory(PACKAGE), "config")
    params_file = values["params_file"] or os.path.join(config_dir, f"{backend}.yaml")
    try:
        params = node_section(params_file, "omni_flow_node")
    except ConfigError:
        # A file holding only mic_node: / speaker_node: sections keeps the backend's own config.
        if not values["params_file"] or not any(
            own_section(params_file, name) for name in ("mic_node", "speaker_node")
        ):
            raise
        params = node_section(os.path.join(config_dir, f"{backend}.yaml"), "omni_flow_node")
    params["backend"] = backend
    sim_time = _is_true(values["use_sim_time"])
    params["use_sim_time"] = sim_time
    if values["model"]:
        params[f"{backend}.{MODEL_PARAMETER[backend]}"] = values["model"]
    if values["engine_dir"]:
        params["tensorrt.enabled"] = True
        params["tensorrt.engine_dir"] = values["engine_dir"]
    if values["mic_type"]:
        params["mic.type"] = values["mic_type"]
    remappings = []
    if values["camera_topic"]:
        compressed = params.get("camera.compressed") is True
        camera = "camera/image_raw/compressed" if compressed else "camera/image_raw"
        remappings.append((camera, values["camera_topic"]))
    if values["mic_topic"]:
        remappings.append(("audio/mic", values["mic_topic"]))
    common = {"namespace": values["namespace"], "arguments": _ros_args(values), "output": "screen"}
    actions: list[Any] = [
        LifecycleNode(
            package=PACKAGE,
            executable="omni_flow_node",
            name="omni_flow_node",
            parameters=[params],
            remappings=remappings,
            **common,
        )
    ]
    for extra in OPTIONAL_NODES:
        if not _is_true(values[extra.flag]):
            continue
        if extra.config is not None:
            parameters = _audio_params(values, config_dir, extra.executable, extra.config)
        else:  # omni_live_view
            parameters = {"port": int(values["foxglove_port"]), "use_sim_time": sim_time}
        actions.append(
            Node(
                package=PACKAGE,
                executable=extra.executable,
                name=extra.executable,
                parameters=[parameters],
                **common,
            )
        )
    return actions


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                a.name, default_value=a.default, description=a.description, choices=a.choices
            )
            for a in ARGUMENTS
        ]
        + [OpaqueFunction(function=_dds_profile), OpaqueFunction(function=_nodes)]
    )
