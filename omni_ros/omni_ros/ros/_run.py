"""The one ``main()`` shape of every node (init, build, start, spin, Ctrl-C / SIGTERM and external
shutdown, ``destroy_node`` + ``try_shutdown`` in finally), written once, and the SIGINT / SIGTERM
guard it installs."""

from __future__ import annotations

import atexit
import signal
import sys
from collections.abc import Callable
from typing import Any

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

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


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM (see :func:`_terminate`).

    Not a KeyboardInterrupt: CPython remembers a KeyboardInterrupt that crossed an import (a
    lazy ``import scipy.io`` while the node was being built) even when it was caught, and at
    exit kills itself with SIGINT (measured: exit code -2 / 130, nothing printed, in 4 of 30
    SIGTERMs during startup). Not an Exception either: library code that turns exceptions into
    results (rclpy's lifecycle transitions) must not swallow it.
    """


#: What ends a node's main(): Ctrl-C or SIGTERM.
STOP_SIGNALS = (KeyboardInterrupt, Terminated)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM handler: raise :class:`Terminated` in the main thread, every time.

    rclpy's handler shuts the context down and wakes the executor, but only an executor that
    is spinning: a SIGTERM while the node was still being built (a model loading for minutes,
    devices opening) left the build running to its end and then failing on the dead context
    (measured: a 5 s backend load ran on for 4.8 s after SIGTERM, then an RCLError traceback
    and exit code 1). rclpy chains to the Python handler installed before ``rclpy.init`` (as
    for SIGINT), so this one interrupts the build at once, and the node's usual Ctrl-C path
    (:data:`STOP_SIGNALS`) closes it and exits 0. Unlike a repeated SIGINT, a repeated SIGTERM is not ignored: it
    is launch's escalation for a teardown that does not end.
    """
    raise Terminated


def install_interrupt_guard() -> InterruptOnce:
    """Install :class:`InterruptOnce` for SIGINT and :func:`_terminate` for SIGTERM (call
    before ``rclpy.init``; main thread only)."""
    guard = InterruptOnce()
    signal.signal(signal.SIGINT, guard)
    signal.signal(signal.SIGTERM, _terminate)
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)
    return guard


def spin_until_stopped(executor: Any) -> None:
    """``executor.spin()``, but waking at least once a second.

    A signal's Python handler (:func:`_terminate`, :class:`InterruptOnce`) runs only when the
    main thread is back in Python: a wait that rclpy's own wake-up missed would leave it
    unhandled (twice in clean-clone CI runs a mic_node sat in ``wait_for_ready_callbacks``
    after its first SIGTERM, ended by a second one; not reproduced in 70 tries here since).
    """
    while executor.context.ok():
        executor.spin_once(timeout_sec=1.0)


def shut_down_meanwhile(exc: BaseException) -> bool:
    """Whether ``exc`` came from the ROS context being shut down under the code that raised it
    (SIGINT / SIGTERM through rclpy's own handler: "context is invalid"), not from a fault."""
    return isinstance(exc, Exception) and not rclpy.ok()


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


def spin_node(
    factory: Callable[[], Any],
    name: str,
    args: list[str] | None = None,
    start: Callable[[Any], None] | None = None,
    before_destroy: Callable[[Any], None] | None = None,
) -> None:
    """init, build the node, start it, spin, handle Ctrl-C / SIGTERM / external shutdown,
    destroy, try_shutdown: every node's ``main()``.

    A :class:`ConfigError` while building the node (a bad parameter, or an audio device that does
    not exist: its message lists the devices) ends the process with exit code 2 and the message.

    Args:
        factory: builds the node.
        name: the executable's name (for the ConfigError message).
        args: the command line (ROS arguments).
        start: run on the built node before spinning (omni_flow_node's autostart: configure,
            activate); a signal in it is a clean exit, and the node is still torn down.
        before_destroy: run on the node before ``destroy_node`` (omni_flow_node: stop the loop
            and close the backend).
    """
    install_interrupt_guard()
    try:
        _spin_node(factory, name, args, start, before_destroy)
    except STOP_SIGNALS:  # a signal between the steps below (rclpy.init, a teardown)
        rclpy.try_shutdown()


def _spin_node(
    factory: Callable[[], Any],
    name: str,
    args: list[str] | None,
    start: Callable[[Any], None] | None,
    before_destroy: Callable[[Any], None] | None,
) -> None:
    rclpy.init(args=args)
    try:
        node = factory()
    except ConfigError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        sys.exit(2)
    except STOP_SIGNALS:  # Ctrl-C / SIGTERM while the node was still being built: clean
        rclpy.try_shutdown()
        return
    except Exception as exc:
        if not shut_down_meanwhile(exc):
            raise
        rclpy.try_shutdown()
        return
    try:
        if start is not None:
            start(node)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        spin_until_stopped(executor)
    except (*STOP_SIGNALS, ExternalShutdownException):
        pass
    except Exception as exc:  # the context was shut down while the node was started or spun
        if not shut_down_meanwhile(exc):
            raise
    finally:
        try:
            if before_destroy is not None:
                before_destroy(node)
            node.destroy_node()
        except STOP_SIGNALS:
            pass  # a second Ctrl-C (or SIGTERM) while closing: exit now, without a traceback
        rclpy.try_shutdown()
