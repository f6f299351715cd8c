"""``omni-ros``: replay bags, synthesise input bags, run the demo, manage TensorRT engines.

omni-ros replay BAG --out DIR [--mode graph|direct] [--backend NAME] [--params FILE]
                    [--remap FROM:=TO ...] [--rate R] [--loop N] [--load-timeout S]
                    [--with-foxglove [--foxglove-port P]]
omni-ros synth OUT_BAG [--messy] [--duration S] [--storage mcap|sqlite3]
omni-ros record OUT_BAG [--topics T ...] [--duration S] [--wait S]
omni-ros demo [--out demo_out] [--mode graph|direct]
omni-ros engines build|list|verify ...
omni-ros backends

A mistake (a bad argument, an unreadable bag, an unknown parameter) is one line on stderr that says
what to change, and exit code 2; ``-v`` adds omni_ros's debug lines and the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from omni_ros import __version__
from omni_ros.core.errors import OmniError

#: Every parser shows its defaults in --help.
_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _add_replay(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "replay",
        help="replay a rosbag2 through omni_ros and record the outputs",
        formatter_class=_FORMATTER,
    )
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
        "--load-timeout",
        type=float,
        default=180.0,
        metavar="S",
        help="graph mode: seconds to wait for the node to load its backend (a 9B model may "
        "need more)",
    )
    p.add_argument(
        "--loop",
        type=int,
        default=1,
        metavar="N",
        help="play the bag N times; the clock jumps back each time, like ros2 bag play --loop",
    )
    p.add_argument(
        "--with-foxglove",
        action="store_true",
        help="serve the conversation live over the Foxglove WebSocket protocol on localhost "
        "(open it in Foxglove with config/foxglove_layout.json)",
    )
    p.add_argument("--foxglove-port", type=int, default=8765, help="its port")
    p.add_argument(
        "--with-inputs",
        action="store_true",
        help="also write the input topics into outputs/ (one bag holds the whole conversation)",
    )
    p.add_argument(
        "--with-speaker",
        action="store_true",
        help="graph mode: speaker_node plays the speech on a null sink; its playback reports "
        "go into outputs/, summary.json (late chunks) and timeline.png",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--progress",
        action="store_true",
        help="a progress bar even without a terminal (default there: a line every 5 s)",
    )

    def run(args: argparse.Namespace) -> int:
        from omni_ros.tools.replay import main_replay

        return main_replay(args)

    p.set_defaults(func=run)


def _add_synth(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic input bag (espeak-ng speech, camera frames)",
        formatter_class=_FORMATTER,
    )
    p.add_argument("out", help="rosbag2 folder to create (must not exist)")
    p.add_argument(
        "--messy",
        action="store_true",
        help="48 kHz stereo mic, mixed encodings, padded rows, dropouts, out-of-order",
    )
    p.add_argument("--duration", type=float, default=24.0, help="seconds (at least 1)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="storage")

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
        "record",
        help="record live topics into a rosbag2 (mcap), like ros2 bag record",
        formatter_class=_FORMATTER,
    )
    p.add_argument("out", help="rosbag2 folder to create (must not exist)")
    p.add_argument(
        "--topics", nargs="+", help="topics (default: every omni_flow_node input and output)"
    )
    p.add_argument(
        "--duration",
        type=float,
        help="seconds from the first topic found (default: until Ctrl-C)",
    )
    p.add_argument(
        "--wait",
        type=float,
        metavar="S",
        help="give up if none of the topics appears within S seconds (default: wait)",
    )
    p.add_argument("--use-sim-time", action="store_true", help="stamp with /clock time")

    def run(args: argparse.Namespace) -> int:
        from omni_ros.tools.record import DEFAULT_TOPICS, record

        counts = record(
            Path(args.out),
            args.topics or DEFAULT_TOPICS,
            args.duration,
            discover_s=args.wait,
            use_sim_time=args.use_sim_time,
        )
        print(", ".join(f"{topic}: {n}" for topic, n in counts.items()))
        silent = [topic for topic, n in counts.items() if n == 0]
        if silent:
            print(f"no messages on {', '.join(silent)}", file=sys.stderr)
        return 0

    p.set_defaults(func=run)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="synthesise a bag and replay it through omni_flow_node",
        formatter_class=_FORMATTER,
    )
    p.add_argument("--out", default="demo_out", help="demo folder (git-ignored)")
    p.add_argument("--mode", choices=("graph", "direct"), default="graph", help="replay mode")

    def run(args: argparse.Namespace) -> int:
        from omni_ros.tools.demo import run_demo

        return run_demo(Path(args.out), args.mode)

    p.set_defaults(func=run)


def _add_backends(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "backends",
        help="list the backends and their parameters (types, defaults)",
        formatter_class=_FORMATTER,
    )

    def run(args: argparse.Namespace) -> int:
        from omni_ros.backends.base import BACKENDS, backend_class

        for name in BACKENDS:
            try:
                cls = backend_class(name)
            except ImportError as exc:
                print(f"{name}: unavailable ({exc})")
                continue
            print(f"{name}:  (parameters {name}.<field>)")
            for field, type_name, default, text in backend_fields(cls.config_class):
                line = f"  {field}: {type_name} = {default!r}"
                print(f"{line}  # {text}" if text else line)
        return 0

    p.set_defaults(func=run)


def backend_fields(config_class: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, description) of each field of a backend's config dataclass."""
    import dataclasses
    import typing

    from omni_ros.ros._params import attribute_docs, field_default

    hints = typing.get_type_hints(config_class)
    docs = attribute_docs(config_class)
    rows = []
    for f in dataclasses.fields(config_class):
        annotation = hints.get(f.name)
        type_name = getattr(annotation, "__name__", None) or str(annotation)
        type_name = type_name.replace("typing.", "").replace("NoneType", "None")
        rows.append(
            (f.name, type_name, field_default(f), " ".join(docs.get(f.name, "").split())[:100])
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omni-ros", description=__doc__.split("\n")[0], formatter_class=_FORMATTER
    )
    parser.add_argument("--version", action="version", version=f"omni-ros {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="omni_ros's own debug lines, and the traceback of an error",
    )
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


def setup_logging(verbose: bool) -> None:
    """INFO lines from omni_ros; with ``verbose`` its DEBUG lines too, never other libraries'
    (matplotlib, pydot, PIL, httpx stay at WARNING whatever ``-v`` says)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("omni_ros").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a mistake is one line on stderr and exit code 2 (see the docstring)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    name = f"omni-ros {args.command}"
    try:
        return int(args.func(args))
    except OmniError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"{name}: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or an unforeseen environment problem: still one line
        if args.verbose:
            traceback.print_exc()
        print(
            f"{name}: unexpected {type(exc).__name__}: {_one_line(exc)} "
            "(run with -v for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
