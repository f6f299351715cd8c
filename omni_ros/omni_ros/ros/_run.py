"""The one ``main()`` shape of the audio nodes (init, spin, KeyboardInterrupt and external shutdown,
``destroy_node`` + ``try_shutdown`` in finally), written once, and the SIGINT
guard every node's ``main()`` installs."""

from __future__ import annotations

import atexit
import signal
import sys
from collections.abc import Callable
from typing import Any

import rclpy
from rclpy.executors import ExternalShutdownException

from omni_ros.core.errors import ConfigError


class InterruptOnce:
    """SIGINT handler: the first Ctrl-C raises KeyboardInterrupt, later ones are ignored.

    ``ros2 launch`` forwards SIGINT to its children while the terminal delivers the same Ctrl-C to
    the whole process group, and a second Ctrl-C is common while a node tears down (closing the
    backend, joining threads). Python's default handler would raise KeyboardInterrupt inside that
    teardown (a traceback, and the process dies by signal: exit code -2). rclpy's own handler
    chains to the Python handler installed before ``rclpy.init`` (rclpy's signal_handler.cpp calls
    the original handler), so installing this first keeps rclpy's shutdown behaviour and makes
    every later SIGINT harmless. A teardown that hangs is still ended by launch's SIGTERM.

    Interpreter finalization puts SIGINT back to the OS default (death by signal) unless it is
    ignored, so :func:`install_interrupt_guard` also makes it ignored at exit (atexit runs before
    CPython's signal finalization).
    """

    def __init__(self) -> None:
        self.received = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.received += 1
        if self.received == 1:
            raise KeyboardInterrupt


def install_interrupt_guard() -> InterruptOnce:
    """Install :class:`InterruptOnce` for SIGINT (call before ``rclpy.init``; main thread only)."""
    guard = InterruptOnce()
    signal.signal(signal.SIGINT, guard)
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)
    return guard


def publish_unless_shut_down(node: Any, publisher: Any, msg: Any) -> bool:
    """Publish from one of ``node``'s own threads; False, without raising, when Ctrl-C / SIGTERM
    shut the node's context down under it (rclpy: "publisher's context is invalid")."""
    try:
        publisher.publish(msg)
    except Exception:
        if node.context.ok():
            raise
        return False
    return True


def spin_node(factory: Callable[[], Any], name: str, args: list[str] | None = None) -> None:
    """init, build the node, spin, handle Ctrl-C / external shutdown, destroy, try_shutdown.

    A :class:`ConfigError` while building the node (a bad parameter, or an audio device that does
    not exist: its message lists the devices) ends the process with exit code 2 and the message.
    """
    install_interrupt_guard()
    rclpy.init(args=args)
    try:
        node = factory()
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C while the node was still being built: a clean exit too
        rclpy.try_shutdown()
        return
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
