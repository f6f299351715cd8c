"""Run the example proactive tree against a live omni_flow_node, ticking at 10 Hz.

``python -m omni_ros.bt.example [--ros-args -r __ns:=/robot1]``
"""

from __future__ import annotations

import threading

import py_trees
import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

from omni_ros.bt.trees import create_proactive_tree


def main(args: list[str] | None = None) -> None:
    rclpy.init(args=args)
    node = rclpy.create_node("omni_bt")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    tree = create_proactive_tree()
    tree.setup(node=node, timeout=15.0)
    last = [""]

    def log_changes(t: py_trees.trees.BehaviourTree) -> None:
        # Log the tree only when its state changes (10 Hz of identical trees is noise).
        text = py_trees.display.unicode_tree(t.root, show_status=True)
        if text != last[0]:
            last[0] = text
            node.get_logger().info("\n" + text)

    tree.add_post_tick_handler(log_changes)
    try:
        while rclpy.ok():
            tree.tick()
            threading.Event().wait(0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        tree.shutdown()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
