"""omni_ros: a full-duplex, omni-modal model (MiniCPM-o 4.5) as a ROS 2 citizen.

Layers (each imports only the ones below it):
``core`` (ROS-free Omni-Flow timeline and duplex session) -> ``backends`` -> ``tensorrt``
-> ``ros`` (nodes) -> ``tools`` (CLI, bag replay, demo).
"""

__version__ = "0.1.0"
