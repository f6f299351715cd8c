"""The live view, checked with Foxglove's own client: ``@foxglove/ws-protocol`` in node subscribes to
every channel, decodes each message by its schema (``@foxglove/rosmsg`` + ``rosmsg2-serialization``
for the ROS 2 CDR topics, JSON for the derived views), and the content and stamps are compared
with what the replay wrote into its output bag."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from foxglove_client import Client, node_executable
from omni_ros.core.clock import NS_PER_S
from omni_ros.tools.bagio import INPUT_TOPICS, InputBag
from omni_ros.tools.replay import OUTPUT_TOPICS, load_params_file, replay_direct
from omni_ros.tools.typestore import omni_typestore
from rosbags.rosbag2 import Reader

LAYOUT = Path(__file__).resolve().parents[2] / "config" / "foxglove_layout.json"


def _outputs(folder: Path) -> dict[str, list[tuple[int, Any]]]:
    store = omni_typestore()
    found: dict[str, list[tuple[int, Any]]] = {}
    with Reader(folder) as reader:
        for conn, log_ns, raw in reader.messages():
            found.setdefault(conn.topic, []).append(
                (int(log_ns), store.deserialize_cdr(raw, conn.msgtype))
            )
    return found


def _stamp(msg: dict[str, Any]) -> int:
    return int(msg["header"]["stamp"]["sec"]) * NS_PER_S + int(msg["header"]["stamp"]["nanosec"])


@pytest.fixture(scope="module")
def live_run(
    clean_bag: Path, schedule_params: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, list[tuple[int, Any]]], InputBag]:
    from omni_ros.tools.live_view import LiveView

    bag = InputBag(clean_bag)
    view = LiveView(port=0)
    try:
        for topic, role in bag.roles.items():  # what replay announces before the first message
            view.announce(topic, INPUT_TOPICS[role][1][0])
        for topic, msgtype in OUTPUT_TOPICS.items():
            view.announce(topic, msgtype)
        client = Client(view.url)
        assert view.wait_for_clients(60), "".join(client.stderr)
        outputs = tmp_path_factory.mktemp("live") / "outputs"
        replay_direct(
            bag, outputs, load_params_file(schedule_params), progress=False, live_view=view
        )
        seen = client.result()
    finally:
        view.close()
    return seen, _outputs(outputs), bag


def test_the_client_decodes_every_channel_without_an_error(live_run: Any) -> None:
    seen = live_run[0]
    assert seen["errors"] == []
    channels = seen["channels"]
    for topic in ("/audio/mic", "/camera/image_raw", *OUTPUT_TOPICS):
        assert channels[topic]["schemaEncoding"] == "ros2msg", topic
    assert channels["/omni/state"]["schemaName"] == "omni_ros_msgs/msg/OmniState"
    assert channels["/omni_view/transcript"]["schemaName"] == "foxglove.Log"


def test_ros_topics_arrive_whole_with_their_content_and_bag_time_stamps(live_run: Any) -> None:
    seen, outputs, bag = live_run
    channels = seen["channels"]
    states = channels["/omni/state"]
    recorded = outputs["/omni/state"]
    assert states["count"] == len(recorded)
    assert [m["unit_index"] for m in states["messages"]] == [m.unit_index for _t, m in recorded]
    assert [m["mode"] for m in states["messages"]] == [m.mode for _t, m in recorded]
    # Log times are the bag's time axis (1.7e9 s), equal to the output bag's, after the unit end.
    log_times = [int(t) for t in states["logTimes"]]
    assert log_times == [t for t, _m in recorded]
    for log_ns, msg in zip(log_times, states["messages"], strict=True):
        assert bag.start_ns <= _stamp(msg) <= log_ns <= bag.end_ns + 5 * NS_PER_S
    texts = "".join(m["text"] for m in channels["/omni/text"]["messages"])
    assert texts == "".join(m.text for _t, m in outputs["/omni/text"])
    assert texts.strip()
    mic = channels["/audio/mic"]
    assert mic["count"] == sum(1 for m in bag if m.role == "mic")
    assert mic["messages"][0]["sample_rate"] == 16_000


def test_the_transcript_has_one_line_per_finished_turn(live_run: Any) -> None:
    seen, outputs, _bag = live_run
    turns: dict[int, str] = {}
    ended: list[int] = []
    for _t, m in outputs["/omni/text"]:
        turns[m.turn_id] = turns.get(m.turn_id, "") + m.text
        if m.end_of_turn:
            ended.append(m.turn_id)
    lines = [m["message"] for m in seen["channels"]["/omni_view/transcript"]["messages"]]
    robot = [line for line in lines if line.startswith("turn ")]
    assert ended
    assert robot == [f"turn {t}: {turns[t].strip() or '(no text)'}" for t in ended]


def test_unit_view_levels_and_the_models_frame(live_run: Any) -> None:
    seen, outputs, _bag = live_run
    channels = seen["channels"]
    units = channels["/omni_view/unit"]["messages"]
    states = [m for _t, m in outputs["/omni/state"]]
    assert [u["unit_compute_ms"] for u in units] == pytest.approx(
        [s.unit_compute_ms for s in states], rel=1e-5
    )
    assert {u["budget_ms"] for u in units} == {1000.0}
    assert {u["mode_name"] for u in units} >= {"LISTENING", "SPEAKING"}
    mic_levels = [m["dbfs"] for m in channels["/omni_view/level/mic"]["messages"]]
    assert len(mic_levels) == channels["/audio/mic"]["count"]
    assert min(mic_levels) < -50 < max(mic_levels) < 0  # noise floor and speech
    assert channels["/omni_view/level/speech"]["count"] == len(outputs["/omni/speech"])
    frames = channels["/omni_view/model_frame"]["messages"]
    assert len(frames) >= len(states) - 1
    unit_ends = [_stamp(m) for m in channels["/omni/state"]["messages"]]
    for frame in frames:
        assert (frame["width"], frame["height"]) == (160, 120)
        # The frame the default policy ("last") gave the model: the latest stamped in its unit.
        assert any(end - NS_PER_S <= _stamp(frame) < end for end in unit_ends)


def test_the_shipped_layout_is_the_generated_one_and_names_only_served_topics(
    live_run: Any,
) -> None:
    from omni_ros.tools.live_view import layout_json, layout_topics

    assert json.loads(LAYOUT.read_text()) == json.loads(layout_json())
    served = set(live_run[0]["channels"])
    duplex = {"/omni/user_speaking", "/omni/speech_flush", "/speaker/playback"}  # issue 9 topics
    assert layout_topics() - duplex <= served, layout_topics() - served


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.ros
def test_graph_replay_with_foxglove_serves_the_nodes_topics_live_on_sim_time(
    clean_bag: Path, schedule_params: Path, tmp_path: Path
) -> None:
    import sys

    node_executable()
    port = _free_port()
    replay_proc = subprocess.Popen(
        [sys.executable, "-m", "omni_ros.tools.cli", "replay", str(clean_bag),
         "--out", str(tmp_path / "out"), "--mode", "graph", "--params", str(schedule_params),
         "--with-foxglove", "--foxglove-port", str(port), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy(),
    )  # fmt: skip
    client = None
    try:
        assert replay_proc.stdout is not None
        for line in replay_proc.stdout:  # the server is up once replay says where
            if line.startswith("live view: ws://127.0.0.1:"):
                break
        client = Client(f"ws://127.0.0.1:{port}", idle_ms=8000)
        rest, _ = replay_proc.communicate(timeout=240)
        assert replay_proc.returncode == 0, rest
        seen = client.result()
    finally:
        if replay_proc.poll() is None:
            replay_proc.kill()
            replay_proc.wait()
        if client is not None and client.proc.poll() is None:
            client.proc.kill()
    assert seen["errors"] == []
    channels = seen["channels"]
    bag = InputBag(clean_bag)
    states = channels["/omni/state"]
    assert states["count"] >= 5
    # Sim time: the viewer's timeline is the bag's axis, each state logged after its unit ended.
    for log_time, msg in zip(states["logTimes"], states["messages"], strict=True):
        assert bag.start_ns <= _stamp(msg) <= int(log_time) <= bag.end_ns + 10 * NS_PER_S
    assert channels["/audio/mic"]["count"] > 0.9 * sum(1 for m in bag if m.role == "mic")
    assert channels["/omni_view/model_frame"]["count"] >= 3
    transcript = [m["message"] for m in channels["/omni_view/transcript"]["messages"]]
    assert any(line.startswith("turn ") for line in transcript), transcript


# The full-duplex interfaces of issue 9 as the lead specified them (SpeechFlush, Playback,
# omni/user_speaking); registered here only where this checkout's omni_ros_msgs lacks them, so the
# test also runs unchanged once they land.
PLANNED_MSGS = {
    "omni_ros_msgs/msg/SpeechFlush": (
        "std_msgs/Header header\nuint8 BARGE_IN=0\nuint8 INTERRUPT=1\nuint8 RESET=2\n"
        "uint8 ERROR=3\nuint8 STOP=4\nuint8 reason\nuint64 turn_id\n"
        "builtin_interfaces/Time dropped_from\nbuiltin_interfaces/Time dropped_until\n"
        "builtin_interfaces/Time onset\n"
    ),
    "omni_ros_msgs/msg/Playback": (
        "std_msgs/Header header\nuint64 turn_id\nbuiltin_interfaces/Time scheduled\n"
        "uint32 sample_rate\nuint32 samples\nbool late\nbool cut\n"
    ),
}


def test_duplex_topics_show_in_the_transcript_and_activity_without_code_for_their_topics(
    tmp_path: Path,
) -> None:
    from omni_ros.tools.live_view import LiveView
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    own = omni_typestore()
    store.register({k: v for k, v in own.fielddefs.items() if k.startswith("omni_ros_msgs/")})
    for name, text in PLANNED_MSGS.items():
        if name not in store.fielddefs:
            store.register(get_types_from_msg(text, name))
    types = store.types
    t0 = 1_700_000_010 * NS_PER_S

    def time(ns: int) -> Any:
        return types["builtin_interfaces/msg/Time"](sec=ns // NS_PER_S, nanosec=ns % NS_PER_S)

    def header(ns: int) -> Any:
        return types["std_msgs/msg/Header"](stamp=time(ns), frame_id="")

    def cdr(msg: Any) -> bytes:
        return bytes(store.serialize_cdr(msg, msg.__msgtype__))

    flush_fields = {f for f, _ in store.fielddefs["omni_ros_msgs/msg/SpeechFlush"][1]}
    assert {"reason", "turn_id", "dropped_from", "dropped_until"} <= flush_fields
    messages = [
        ("/omni/user_speaking", types["std_msgs/msg/Bool"](data=True), t0),
        ("/speaker/playback", types["omni_ros_msgs/msg/Playback"](
            header=header(t0), turn_id=3, scheduled=time(t0), sample_rate=24_000,
            samples=2400, late=False, cut=False), t0 + 10_000_000),
        ("/omni/speech_flush", types["omni_ros_msgs/msg/SpeechFlush"](
            header=header(t0 + 300_000_000), reason=0, turn_id=3,
            dropped_from=time(t0 + 400_000_000), dropped_until=time(t0 + 800_000_000),
            onset=time(t0 + 200_000_000)), t0 + 300_000_000),
        ("/speaker/playback", types["omni_ros_msgs/msg/Playback"](
            header=header(t0 + 350_000_000), turn_id=3, scheduled=time(t0), sample_rate=24_000,
            samples=1200, late=False, cut=True), t0 + 350_000_000),
        ("/omni/user_speaking", types["std_msgs/msg/Bool"](data=False), t0 + 900_000_000),
    ]  # fmt: skip
    view = LiveView(port=0, typestore=store)
    try:
        for topic, msg, _ns in messages:
            view.announce(topic, msg.__msgtype__)
        client = Client(view.url, idle_ms=2000)
        assert view.wait_for_clients(60), "".join(client.stderr)
        for topic, msg, ns in messages:
            view.forward(topic, msg.__msgtype__, cdr(msg), ns)
        seen = client.result()
    finally:
        view.close()
    assert seen["errors"] == []
    channels = seen["channels"]
    assert channels["/omni/speech_flush"]["schemaName"] == "omni_ros_msgs/msg/SpeechFlush"
    assert channels["/omni/speech_flush"]["messages"][0]["turn_id"] == "3"  # uint64: a bigint
    lines = [m["message"] for m in channels["/omni_view/transcript"]["messages"]]
    assert lines == [
        "user speaking",
        "barge-in: turn 3 flushed (400 ms of speech dropped)",
        "user silent",
    ]
    activity = [
        (a["user_speaking"], a["robot_playing"])
        for a in channels["/omni_view/activity"]["messages"]
    ]
    assert activity == [(True, False), (True, True), (True, False), (False, False)]
    assert [int(t) for t in channels["/omni_view/activity"]["logTimes"]] == [
        t0,
        t0 + 10_000_000,
        t0 + 350_000_000,
        t0 + 900_000_000,
    ]
