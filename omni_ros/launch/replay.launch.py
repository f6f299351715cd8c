"""Launch omni_flow_node for bag replay: sim time from /clock, no microphone, no speaker.

The bag itself is played by another process, either

- ``omni-ros replay BAG --out DIR --mode graph`` (works without a ROS install: reads the bag with
  rosbags, publishes /clock and the camera / mic topics at bag rate, records every output topic
  into ``DIR/outputs``; it starts its own omni_flow_node, so use this launch file only when you
  want to run the node yourself), or
- ``ros2 bag play BAG --clock`` (a ROS install; ``--clock`` publishes /clock so the node's
  outputs are stamped on the bag's time axis).

Examples::

    ros2 launch omni_ros replay.launch.py backend:=reference
    ros2 bag play demo_bag --clock --remap /robot/mic:=/audio/mic

Arguments: every argument of omni_flow.launch.py, forwarded as given; only the defaults differ
(``use_sim_time:=true``, ``with_mic:=false``, ``with_speaker:=false``). An explicit
``use_sim_time:=false`` or ``with_mic:=true`` is honoured, never overridden.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration

PACKAGE = "omni_ros"
BOOLEAN = ["true", "false", "True", "False"]

#: (name, default, description, choices): omni_flow.launch.py's arguments with replay defaults.
ARGUMENTS = (
    ("backend", "reference", "reference | minicpmo | llamacpp_omni | vllm_omni", None),
    ("model", "", "model folder / id (reference: tiny | full)", None),
    ("params_file", "", "parameters YAML; empty: share/omni_ros/config/<backend>.yaml", None),
    ("namespace", "", "namespace of the node", None),
    ("use_sim_time", "true", "use /clock (the bag player's --clock)", BOOLEAN),
    ("with_mic", "false", "also start mic_node (not usual in a replay)", BOOLEAN),
    ("with_speaker", "false", "also start speaker_node (hear the replayed robot)", BOOLEAN),
    (
        "with_foxglove",
        "false",
        "also start omni_live_view (Foxglove WebSocket on localhost)",
        BOOLEAN,
    ),
    ("foxglove_port", "8765", "omni_live_view's port", None),
    ("engine_dir", "", "TensorRT engine folder; non-empty enables TensorRT", None),
    ("log_level", "info", "debug | info | warn | error | fatal", None),
    ("camera_topic", "", "the bag's camera topic (ros2 bag play --remap does it too)", None),
    ("mic_topic", "", "the bag's microphone topic", None),
    ("mic_type", "", "audio/mic message type (mic.type); empty: the params file's value", None),
    ("dds_profile", "", "Fast DDS profile; empty: the shipped config/fastdds_camera.xml", None),
)


def generate_launch_description() -> LaunchDescription:
    main_launch = os.path.join(
        get_package_share_directory(PACKAGE), "launch", "omni_flow.launch.py"
    )
    forwarded = {name: LaunchConfiguration(name) for name, *_ in ARGUMENTS}
    return LaunchDescription(
        [
            DeclareLaunchArgument(name, default_value=default, description=text, choices=choices)
            for name, default, text, choices in ARGUMENTS
        ]
        + [
            IncludeLaunchDescription(
                PythonLaunchDescriptionSource(main_launch),
                launch_arguments=forwarded.items(),
            )
        ]
    )
