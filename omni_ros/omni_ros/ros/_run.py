"""The one ``main()`` shape of the audio nodes (STYLE rule 11), written once."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import rclpy
from rclpy.executors import ExternalShutdownException

from omni_ros.core.errors import ConfigError


def spin_node(factory: Callable[[], Any], name: str, args: list[str] | None = None) -> None:
    """init, build the node, spin, handle Ctrl-C / external shutdown, destroy, try_shutdown.

    A :class:`ConfigError` while building the node (a bad parameter, or an audio device that does
    not exist: its message lists the devices) ends the process with exit code 2 and the message.
    """
    rclpy.init(args=args)
    try:
        node = factory()
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        sys.exit(2)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        try:
            node.destroy_node()
        except KeyboardInterrupt:
            pass  # a second Ctrl-C while closing: exit now, without a traceback
        rclpy.try_shutdown()
