"""``omni-ros replay`` on synthesised bags: outputs, summaries, plots, messy input, both modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError
from omni_ros.tools.bagio import InputBag, parse_remaps
from omni_ros.tools.replay import load_params_file, replay
from omni_ros.tools.typestore import omni_typestore
from rosbags.rosbag2 import Reader

pytest.importorskip("rclpy")  # direct mode converts outputs with the node's own conversions


def _outputs(out_dir: Path) -> dict[str, list[Any]]:
    store = omni_typestore()
    got: dict[str, list[Any]] = {}
    with Reader(out_dir / "outputs") as reader:
        for conn, _t, raw in reader.messages():
            got.setdefault(conn.topic, []).append(store.deserialize_cdr(raw, conn.msgtype))
    return got


def _stamp(msg: Any) -> int:
    return msg.header.stamp.sec * NS_PER_S + msg.header.stamp.nanosec


def test_direct_replay_writes_an_output_bag_a_summary_and_a_timeline_plot(
    clean_bag: Path, schedule_params: Path, tmp_path: Path
) -> None:
    summary = replay(
        clean_bag, tmp_path, mode="direct", params_file=schedule_params, progress=False
    )
    outputs = _outputs(tmp_path)
    assert set(outputs) >= {"/omni/state", "/omni/text", "/omni/speech", "/diagnostics"}
    # 7 s of input: the 1.035 s first unit and then 1 s units, all closed by the flush.
    assert summary["units"] == len(outputs["/omni/state"]) >= 6
    assert summary["turns"] >= 1
    assert summary["speech_seconds"] > 0.9
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["units"] == summary["units"]
    assert set(on_disk["unit_compute_ms"]) == {"median", "p95", "max"}
    png = (tmp_path / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 10_000


def test_outputs_are_stamped_on_the_bags_time_axis(
    clean_bag: Path, schedule_params: Path, tmp_path: Path
) -> None:
    replay(
        clean_bag, tmp_path, mode="direct", params_file=schedule_params, progress=False, plot=False
    )
    bag = InputBag(clean_bag)
    outputs = _outputs(tmp_path)
    stamps = [
        _stamp(m) for topic in ("/omni/state", "/omni/text", "/omni/speech") for m in outputs[topic]
    ]
    assert min(stamps) >= bag.start_ns - NS_PER_S
    assert max(stamps) <= bag.end_ns + 5 * NS_PER_S
    speech = [_stamp(m) for m in outputs["/omni/speech"]]
    assert speech == sorted(speech)


def test_direct_replay_is_deterministic(
    clean_bag: Path, schedule_params: Path, tmp_path: Path
) -> None:
    texts = []
    for run in ("a", "b"):
        replay(
            clean_bag,
            tmp_path / run,
            mode="direct",
            params_file=schedule_params,
            progress=False,
            plot=False,
        )
        out = _outputs(tmp_path / run)
        texts.append(
            ([m.text for m in out["/omni/text"]], [bytes(m.data) for m in out["/omni/speech"]])
        )
    words, speech = texts[0]
    # Two empty runs would be "equal" too: the schedule makes the backend speak, so both exist.
    assert any(words), "the replay produced no text"
    assert speech, "the replay produced no speech"
    assert texts[0] == texts[1]


def test_a_sqlite3_bag_replays_exactly_like_the_same_mcap_bag(
    clean_bag: Path, sqlite_bag: Path, schedule_params: Path, tmp_path: Path
) -> None:
    a = replay(
        clean_bag,
        tmp_path / "mcap",
        mode="direct",
        params_file=schedule_params,
        progress=False,
        plot=False,
    )
    b = replay(
        sqlite_bag,
        tmp_path / "sqlite",
        mode="direct",
        params_file=schedule_params,
        progress=False,
        plot=False,
    )
    assert (a["units"], a["turn_texts"], a["speech_seconds"]) == (
        b["units"],
        b["turn_texts"],
        b["speech_seconds"],
    )


def test_a_messy_bag_replays_with_gaps_filled_and_counted_and_nothing_undecodable(
    messy_bag: Path, clean_bag: Path, schedule_params: Path, tmp_path: Path
) -> None:
    summary = replay(
        messy_bag, tmp_path, mode="direct", params_file=schedule_params, progress=False, plot=False
    )
    counters = summary["counters"]
    clean = replay(clean_bag, tmp_path / "clean", mode="direct", params_file=schedule_params,
                   progress=False, plot=False)  # fmt: skip
    assert summary["units"] >= 6
    # Both have the last unit's tail past the input; the messy bag also dropped 4 chunks of 20 ms.
    assert clean["counters"]["gap_samples_filled"] < 16_000
    clean_gap = clean["counters"]["gap_samples_filled"]
    assert counters["gap_samples_filled"] >= clean_gap + 4 * 320
    # ... and nothing else: the swapped (out-of-order) chunks lose nothing; at most the echo
    # canceller's partial 20 ms frame at each of the 4 real gaps.
    assert counters["gap_samples_filled"] <= clean_gap + 4 * 320 + 4 * 320
    assert (
        counters.get("decode_errors", 0) == 0
    )  # 48 kHz stereo, bgr8/mono8 with padded rows all decode
    assert counters.get("late_messages", 0) == 0  # swapped neighbours arrive within the watermark


def test_a_looping_bag_is_detected_as_a_clock_jump_and_replay_carries_on(
    clean_bag: Path, schedule_params: Path, tmp_path: Path
) -> None:
    once = replay(
        clean_bag,
        tmp_path / "once",
        mode="direct",
        params_file=schedule_params,
        progress=False,
        plot=False,
    )
    twice = replay(
        clean_bag,
        tmp_path / "twice",
        mode="direct",
        params_file=schedule_params,
        progress=False,
        plot=False,
        loops=2,
    )
    assert twice["counters"]["clock_jumps"] == 1
    # The first pass closes the units that ended before the jump (7 s of bag: at least 5); the ones
    # still open at the jump are dropped with the old timeline; the second pass is a full replay.
    assert twice["units"] >= once["units"] + 5


def test_remaps_let_a_bag_with_other_topic_names_replay(
    tmp_path: Path, schedule_params: Path
) -> None:
    from bag_samples import short_config
    from omni_ros.tools.synth import write_bag
    from rosbags.rosbag2 import Writer

    src = write_bag(tmp_path / "src", short_config(duration_s=3.0))
    renamed = tmp_path / "renamed"
    store = omni_typestore()
    with Reader(src) as reader, Writer(renamed, version=9) as writer:
        conns = {}
        for conn, t, raw in reader.messages():
            topic = "/robot/mic0" if conn.topic == "/audio/mic" else conn.topic
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, conn.msgtype, typestore=store)
            writer.write(conns[topic], t, raw)
    with pytest.raises(ConfigError, match="--remap"):
        InputBag(renamed)
    summary = replay(
        renamed,
        tmp_path / "out",
        mode="direct",
        params_file=schedule_params,
        remaps=parse_remaps(["/robot/mic0:=/audio/mic"]),
        progress=False,
        plot=False,
    )
    assert summary["units"] >= 2


def test_bad_remaps_and_params_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FROM:=TO"):
        parse_remaps(["/mic"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("some_other_node:\n  ros__parameters: {backend: reference}\n")
    with pytest.raises(ConfigError, match="ros__parameters"):
        load_params_file(bad)


def test_the_cli_synthesises_a_bag_and_reports_its_version(tmp_path: Path) -> None:
    from omni_ros.tools.cli import main

    assert main(["synth", str(tmp_path / "b"), "--duration", "2"]) == 0
    assert InputBag(tmp_path / "b").duration_ns > NS_PER_S
    out = subprocess.run(
        [sys.executable, "-m", "omni_ros.tools.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "omni-ros" in out.stdout


@pytest.mark.ros
def test_graph_replay_drives_a_real_node_under_sim_time_and_records_its_outputs(
    clean_bag: Path, schedule_params: Path, tmp_path: Path
) -> None:
    summary = replay(
        clean_bag, tmp_path, mode="graph", params_file=schedule_params, progress=False, plot=False
    )
    bag = InputBag(clean_bag)
    outputs = _outputs(tmp_path)
    states = outputs["/omni/state"]
    assert summary["replay"]["node_exit_code"] == 0
    assert len(states) >= 5
    # Sim time: every state is stamped on the bag's axis (1.7e9 s), not on this machine's clock.
    assert all(bag.start_ns - NS_PER_S <= _stamp(s) <= bag.end_ns + 5 * NS_PER_S for s in states)
    assert [s.unit_index for s in states] == sorted(s.unit_index for s in states)
    assert summary["turns"] >= 1
    # The tiny backend needs ~10 ms of a 1000 ms unit: a unit that hits the 5 s deadline means
    # the node's executor starved the backend thread (as rclpy's MultiThreadedExecutor did).
    assert summary["counters"].get("backend_timeouts", 0) == 0


@pytest.mark.ros
def test_graph_replay_reports_why_the_node_could_not_configure(
    clean_bag: Path, tmp_path: Path
) -> None:
    params = tmp_path / "bad.yaml"
    params.write_text(
        "omni_flow_node:\n  ros__parameters:\n    backend: reference\n    reference:\n      size: gigantic\n"
    )
    with pytest.raises(ConfigError, match="gigantic"):
        replay(
            clean_bag,
            tmp_path / "out",
            mode="graph",
            params_file=params,
            progress=False,
            plot=False,
        )


@pytest.mark.ros
def test_graph_replay_with_the_speaker_records_what_it_played_on_the_bags_axis(
    clean_bag: Path, schedule_params: Path, tmp_path: Path
) -> None:
    summary = replay(
        clean_bag,
        tmp_path,
        mode="graph",
        params_file=schedule_params,
        progress=False,
        plot=False,
        with_speaker=True,
    )
    outputs = _outputs(tmp_path)
    speech = outputs["/omni/speech"]
    reports = outputs["/speaker/playback"]
    assert outputs["/speaker/playing"][0].data is False  # latched before any speech
    assert speech
    # One report per chunk heard (plus one per chunk a flush cut), each naming a published chunk
    # of its turn, heard on the bag's axis (sim time), not before it was scheduled.
    published = {(int(m.turn_id), _stamp(m)) for m in speech}
    bag = InputBag(clean_bag)
    for r in reports:
        scheduled = r.scheduled.sec * NS_PER_S + r.scheduled.nanosec
        assert any(t == r.turn_id and s <= scheduled < s + 100_000_000 for t, s in published)
        assert bag.start_ns <= _stamp(r) <= bag.end_ns + 5 * NS_PER_S
        assert _stamp(r) >= scheduled - 25_000_000  # the null sink has no latency: on its stamp
    spk = summary["speaker"]
    assert spk["chunks_heard"] == len(
        {(r.turn_id, r.scheduled.sec, r.scheduled.nanosec) for r in reports}
    )
    assert 0 < spk["heard_seconds"] <= summary["speech_seconds"] + 1e-6
    assert spk["late_chunks"] == sum(1 for r in reports if r.late and not r.cut)


def test_the_speaker_needs_graph_mode(clean_bag: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="with-speaker"):
        replay(clean_bag, tmp_path, mode="direct", progress=False, plot=False, with_speaker=True)
