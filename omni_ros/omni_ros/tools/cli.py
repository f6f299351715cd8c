"""``omni-ros``: replay bags, synthesise input bags, run the demo, manage TensorRT engines.

omni-ros replay BAG --out DIR [--mode graph|direct] [--backend NAME] [--params FILE]
                    [--remap FROM:=TO ...] [--rate R] [--loop N]
omni-ros synth OUT_BAG [--messy] [--duration S] [--storage mcap|sqlite3]
omni-ros demo [--out demo_out] [--mode graph|direct]
omni-ros engines build|list|verify ...
omni-ros backends
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omni_ros import __version__
from omni_ros.core.errors import OmniError


def _add_replay(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("replay", help="replay a rosbag2 through omni_ros and record the outputs")
    p.add_argument("bag", help="rosbag2 folder (mcap or sqlite3)")
    p.add_argument(
        "--out", required=True, help="output folder: outputs/, summary.json, timeline.png"
    )
    p.add_argument(
        "--mode",
        choices=("graph", "direct"),
        default="graph",
        help="graph: a real omni_flow_node over DDS at bag rate; direct: in process, fast",
    )
    p.add_argument("--backend", help="backend name (default: the params file's, else reference)")
    p.add_argument("--params", help="ROS 2 params YAML for omni_flow_node (see config/*.yaml)")
    p.add_argument(
        "--remap",
        action="append",
        metavar="FROM:=TO",
        help="bag topic -> expected topic, e.g. /mic:=/audio/mic (repeatable)",
    )
    p.add_argument("--rate", type=float, default=1.0, help="graph mode playback rate")
    p.add_argument(
        "--loop",
        type=int,
        default=1,
        metavar="N",
        help="play the bag N times; the clock jumps back each time, like ros2 bag play --loop",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress", action="store_true", help="progress bar even without a terminal")

    def run(args: argparse.Namespace) -> int:
        from omni_ros.tools.replay import main_replay

        return main_replay(args)

    p.set_defaults(func=run)


def _add_synth(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "synth", help="write a synthetic input bag (espeak-ng speech, camera frames)"
    )
    p.add_argument("out", help="rosbag2 folder to create")
    p.add_argument(
        "--messy",
        action="store_true",
        help="48 kHz stereo mic, mixed encodings, padded rows, dropouts, out-of-order",
    )
    p.add_argument("--duration", type=float, default=24.0, help="seconds")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")

    def run(args: argparse.Namespace) -> int:
        from omni_ros.tools.synth import SynthConfig, write_bag

        path = write_bag(
            Path(args.out),
            SynthConfig(duration_s=args.duration, messy=args.messy, storage=args.storage),
        )
        print(f"wrote {path}")
        return 0

    p.set_defaults(func=run)


def _add_record(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "record", help="record live topics into a rosbag2 (mcap), like ros2 bag record"
    )
    p.add_argument("out", help="rosbag2 folder to create")
    p.add_argument(
        "--topics", nargs="+", help="topics (default: every omni_flow_node input and output)"
    )
    p.add_argument("--duration", type=float, help="seconds (default: until Ctrl-C)")
    p.add_argument("--use-sim-time", action="store_true", help="stamp with /clock time")

    def run(args: argparse.Namespace) -> int:
        from omni_ros.tools.record import DEFAULT_TOPICS, record

        counts = record(
            Path(args.out),
            args.topics or DEFAULT_TOPICS,
            args.duration,
            use_sim_time=args.use_sim_time,
        )
        print(", ".join(f"{topic}: {n}" for topic, n in counts.items()))
        return 0

    p.set_defaults(func=run)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="synthesise a bag and replay it through omni_flow_node")
    p.add_argument("--out", default="demo_out", help="demo folder (git-ignored)")
    p.add_argument("--mode", choices=("graph", "direct"), default="graph")

    def run(args: argparse.Namespace) -> int:
        from omni_ros.tools.demo import run_demo

        return run_demo(Path(args.out), args.mode)

    p.set_defaults(func=run)


def _add_backends(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("backends", help="list the backends and their parameters")

    def run(args: argparse.Namespace) -> int:
        import dataclasses

        from omni_ros.backends.base import BACKENDS, backend_class

        for name in BACKENDS:
            try:
                cls = backend_class(name)
            except ImportError as exc:
                print(f"{name}: unavailable ({exc})")
                continue
            fields = ", ".join(f.name for f in dataclasses.fields(cls.config_class))
            print(f"{name}: {fields}")
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-ros", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"omni-ros {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_replay(sub)
    _add_synth(sub)
    _add_record(sub)
    _add_demo(sub)
    _add_backends(sub)
    from omni_ros.tools.engines_cli import add_engines_subparser

    add_engines_subparser(sub)
    from omni_ros.tools.check_model import add_subparser as add_check_model_subparser

    add_check_model_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except OmniError as exc:
        print(f"omni-ros {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
