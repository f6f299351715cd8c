"""Launch omni_flow_node (a lifecycle node) and, optionally, mic_node and speaker_node.

Examples::

    ros2 launch omni_ros omni_flow.launch.py                                   # reference backend, tiny, CPU
    ros2 launch omni_ros omni_flow.launch.py backend:=minicpmo model:=/models/MiniCPM-o-4_5
    ros2 launch omni_ros omni_flow.launch.py backend:=llamacpp_omni with_mic:=true with_speaker:=true
    ros2 launch omni_ros omni_flow.launch.py namespace:=robot1 engine_dir:=/data/engines

Arguments:
    backend: reference | minicpmo | llamacpp_omni | vllm_omni. Picks the default params file
        ``share/omni_ros/config/<backend>.yaml``.
    model: optional; sets the backend's model parameter: ``minicpmo.model``, ``vllm_omni.model``,
        ``llamacpp_omni.model_dir`` or ``reference.size`` (tiny | full).
    params_file: a parameters YAML used instead of ``config/<backend>.yaml``.
    namespace: namespace of every node (topics become ``/<namespace>/audio/mic`` ...).
    use_sim_time: true when time comes from /clock (bag replay).
    with_mic, with_speaker: also start mic_node / speaker_node (``config/mic.yaml``,
        ``config/speaker.yaml``).
    with_foxglove: also start omni_live_view: the conversation live in Foxglove on
        ``ws://127.0.0.1:<foxglove_port>`` (layout: ``share/omni_ros/config/foxglove_layout.json``).
    engine_dir: a TensorRT engine cache folder; non-empty turns ``tensorrt.enabled`` on.
    log_level: debug | info | warn | error.
    dds_profile: Fast DDS XML profile for the nodes started here (``FASTDDS_DEFAULT_PROFILES_FILE``);
        empty (default): the shipped ``config/fastdds_camera.xml``, unless the environment already
        names one; ``none``: Fast DDS's defaults. The camera driver must use the same profile
        (docs/RELIABILITY.md): with the defaults, 640x480 rgb8 frames mostly do not arrive.

The params file's ``omni_flow_node:`` (or ``/**:``) section is read here and handed to the node as
a parameter dictionary, which launch_ros writes under ``/**``: a plain ``omni_flow_node:`` key in a
file would not match the node once it runs in a namespace.
"""

from __future__ import annotations

import os
from typing import Any

from ament_index_python.packages import get_package_share_directory
from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from omni_ros.ros._params import read_params_file

PACKAGE = "omni_ros"
#: The shipped Fast DDS transport profile (large shared-memory segments: camera frames arrive).
DDS_PROFILE = "fastdds_camera.xml"
DDS_PROFILE_VARIABLE = "FASTDDS_DEFAULT_PROFILES_FILE"

#: backend -> the parameter that the `model` argument sets.
MODEL_PARAMETER = {
    "reference": "size",
    "minicpmo": "model",
    "llamacpp_omni": "model_dir",
    "vllm_omni": "model",
}

ARGUMENTS = (
    ("backend", "reference", "reference | minicpmo | llamacpp_omni | vllm_omni"),
    ("model", "", "model folder / id (reference: tiny | full); empty: the params file's value"),
    ("params_file", "", "parameters YAML; empty: share/omni_ros/config/<backend>.yaml"),
    ("namespace", "", "namespace of every node"),
    ("use_sim_time", "false", "use /clock (bag replay)"),
    ("with_mic", "false", "also start mic_node (config/mic.yaml)"),
    ("with_speaker", "false", "also start speaker_node (config/speaker.yaml)"),
    ("with_foxglove", "false", "also start omni_live_view (Foxglove WebSocket on localhost)"),
    ("foxglove_port", "8765", "omni_live_view's port"),
    ("engine_dir", "", "TensorRT engine folder; non-empty enables TensorRT"),
    ("log_level", "info", "debug | info | warn | error"),
    ("dds_profile", "", "Fast DDS profile for every node started here; empty: the shipped "
     "config/fastdds_camera.xml (camera-size frames arrive), none: Fast DDS defaults"),
)  # fmt: skip


def node_section(path: str, node_name: str) -> dict[str, Any]:
    """The flat ``ros__parameters`` of ``node_name`` in a ROS 2 params file (``/**`` merged first)."""
    return read_params_file(path, node_name)


def _is_true(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes", "on")


def _dds_profile(context: LaunchContext) -> list[Any]:
    chosen = LaunchConfiguration("dds_profile").perform(context).strip()
    if chosen.lower() == "none" or (not chosen and os.environ.get(DDS_PROFILE_VARIABLE)):
        return []
    path = chosen or os.path.join(get_package_share_directory(PACKAGE), "config", DDS_PROFILE)
    if not os.path.isfile(path):
        raise RuntimeError(f"dds_profile:={path}: no such file")
    return [SetEnvironmentVariable(DDS_PROFILE_VARIABLE, path)]


def _omni_flow(context: LaunchContext) -> list[Any]:
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    backend = arg("backend")
    if backend not in MODEL_PARAMETER:
        raise RuntimeError(f"backend:={backend} unknown; choose one of {sorted(MODEL_PARAMETER)}")
    config_dir = os.path.join(get_package_share_directory(PACKAGE), "config")
    params_file = arg("params_file") or os.path.join(config_dir, f"{backend}.yaml")
    params = node_section(params_file, "omni_flow_node")
    params["backend"] = backend
    params["use_sim_time"] = _is_true(arg("use_sim_time"))
    if arg("model"):
        params[f"{backend}.{MODEL_PARAMETER[backend]}"] = arg("model")
    if arg("engine_dir"):
        params["tensorrt.enabled"] = True
        params["tensorrt.engine_dir"] = arg("engine_dir")
    ros_args = ["--ros-args", "--log-level", arg("log_level")]
    return [
        LifecycleNode(
            package=PACKAGE,
            executable="omni_flow_node",
            name="omni_flow_node",
            namespace=arg("namespace"),
            parameters=[params],
            arguments=ros_args,
            output="screen",
        )
    ]


def _audio_nodes(context: LaunchContext) -> list[Any]:
    config_dir = os.path.join(get_package_share_directory(PACKAGE), "config")
    sim_time = _is_true(LaunchConfiguration("use_sim_time").perform(context))
    common = {
        "namespace": LaunchConfiguration("namespace").perform(context),
        "arguments": [
            "--ros-args",
            "--log-level",
            LaunchConfiguration("log_level").perform(context),
        ],
        "output": "screen",
    }
    mic_params = node_section(os.path.join(config_dir, "mic.yaml"), "mic_node")
    speaker_params = node_section(os.path.join(config_dir, "speaker.yaml"), "speaker_node")
    return [
        Node(
            package=PACKAGE,
            executable="mic_node",
            name="mic_node",
            parameters=[{**mic_params, "use_sim_time": sim_time}],
            condition=IfCondition(LaunchConfiguration("with_mic")),
            **common,
        ),
        Node(
            package=PACKAGE,
            executable="speaker_node",
            name="speaker_node",
            parameters=[{**speaker_params, "use_sim_time": sim_time}],
            condition=IfCondition(LaunchConfiguration("with_speaker")),
            **common,
        ),
        Node(
            package=PACKAGE,
            executable="omni_live_view",
            name="omni_live_view",
            parameters=[
                {
                    "port": int(LaunchConfiguration("foxglove_port").perform(context)),
                    "use_sim_time": sim_time,
                }
            ],
            condition=IfCondition(LaunchConfiguration("with_foxglove")),
            **common,
        ),
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [
            DeclareLaunchArgument(name, default_value=default, description=text)
            for name, default, text in ARGUMENTS
        ]
        + [
            OpaqueFunction(function=_dds_profile),
            OpaqueFunction(function=_omni_flow),
            OpaqueFunction(function=_audio_nodes),
        ]
    )
