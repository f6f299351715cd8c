"""``make demo``: synthesise an input bag, replay it through omni_flow_node, say what happened.

In graph mode (the default) ``speaker_node`` plays the speech on a null sink, as on a robot, so the
summary and the timeline say what was heard when and how many chunks were late at the speaker.

The input: two spoken questions (espeak-ng), camera frames of a changing scene, and a long silence
in which a proactive turn can happen. The backend is the ``reference`` stack: MiniCPM-o 4.5's shape of
computation with random weights, so its words are meaningless by design; the demo shows the ROS
plumbing, the timing, the duplex decisions and every counter, not language understanding.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from omni_ros.tools.replay import print_summary, replay
from omni_ros.tools.synth import SynthConfig, write_bag


def demo_params() -> Path:
    """The demo's params file: the installed config/demo.yaml, else the source tree's."""
    try:
        from ament_index_python.packages import get_package_share_directory

        path = Path(get_package_share_directory("omni_ros")) / "config" / "demo.yaml"
        if path.exists():
            return path
    except Exception:  # not installed: fall back to the source tree
        pass
    return Path(__file__).resolve().parents[2] / "config" / "demo.yaml"


def run_demo(out_dir: Path, mode: str = "graph") -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    bag = out_dir / "input_bag"
    if bag.exists():
        shutil.rmtree(bag)
    print(f"[demo] synthesising {bag} (espeak-ng questions, camera frames, a long silence)")
    write_bag(bag, SynthConfig())
    params = demo_params()
    print(f"[demo] replaying it in {mode} mode through omni_flow_node with {params}")
    if mode == "graph":
        print("[demo] speaker_node plays the speech on a null sink and reports what it played")
    summary = replay(
        bag, out_dir, mode=mode, params_file=params, progress=True, with_speaker=mode == "graph"
    )
    print("[demo] what happened (reference backend: random weights, meaningless words):")
    print_summary(summary, out_dir)
    return 0
