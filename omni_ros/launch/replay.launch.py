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

Arguments: every argument of omni_flow.launch.py (one table: ``omni_ros.ros.launch_arguments``),
forwarded as given; only ``use_sim_time`` defaults differently (``true``). An explicit
``use_sim_time:=false`` or ``with_mic:=true`` is honoured, never overridden.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from omni_ros.ros.launch_arguments import replay_arguments

PACKAGE = "omni_ros"


def generate_launch_description() -> LaunchDescription:
    main_launch = os.path.join(
        get_package_share_directory(PACKAGE), "launch", "omni_flow.launch.py"
    )
    arguments = replay_arguments()
    forwarded = {a.name: LaunchConfiguration(a.name) for a in arguments}
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                a.name, default_value=a.default, description=a.description, choices=a.choices
            )
            for a in arguments
        ]
        + [
            IncludeLaunchDescription(
                PythonLaunchDescriptionSource(main_launch),
                launch_arguments=forwarded.items(),
            )
        ]
    )
