"""mic_node and speaker_node as separate processes over real DDS, with WAV files instead of devices.

mic_node runs with ``source:=wav`` (a WAV file captured at real-time pace, the documented way to run
it without a sound card); speaker_node with ``sink:=wav`` (played audio is written to a WAV file at
real-time pace). The audio is a counting sequence (frame i holds i % 32000), so every received
frame says where it came from.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from flow_harness import ResentCall, stop_process  # noqa: E402
from omni_ros.audio_io import AudioFormat  # noqa: E402
from pcm_samples import pcm_sequence  # noqa: E402

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
MIC_RATE = 16_000
CHUNK_MS = 50
SPEECH_RATE = 24_000


def _spawn(module: str, namespace: str, params: dict[str, str]) -> subprocess.Popen[bytes]:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), env.get("PYTHONPATH", "")])
    args = [sys.executable, "-m", module, "--ros-args", "-r", f"__ns:={namespace}"]
    for key, value in params.items():
        args += ["-p", f"{key}:={value}"]
    return subprocess.Popen(args, env=env)


def _write_wav(path: Path, pcm: bytes, rate: int) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm)


def _wav_frames(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")


def _wait_for(
    done: Callable[[], bool], proc: subprocess.Popen[bytes], timeout_s: float = 20
) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        assert proc.poll() is None, "the node under test exited"
        time.sleep(0.01)
    assert done(), "timed out waiting for the node under test"


@dataclass
class Peer:
    """The test's own ROS node, spun in a background thread; received messages land in lists."""

    node: Any
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now_ns(self) -> int:
        return int(self.node.get_clock().now().nanoseconds)


@pytest.fixture(scope="module")
def peer() -> Iterator[Peer]:
    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("audio_nodes_test", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    yield Peer(node)
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=context)
    thread.join(timeout=5)


# ------------------------------------------------------------------------------------------ mic
def test_mic_chunks_are_stamped_with_the_capture_time_of_their_first_sample(
    peer: Peer, tmp_path: Path
) -> None:
    from rclpy.qos import qos_profile_sensor_data

    from omni_ros_msgs.msg import AudioChunk

    fmt = AudioFormat(MIC_RATE, 1, "S16LE")
    wav_path = tmp_path / "counting.wav"
    _write_wav(wav_path, pcm_sequence(MIC_RATE * 2, fmt), MIC_RATE)
    received: list[tuple[Any, int]] = []

    def on_chunk(msg: Any) -> None:
        with peer.lock:
            received.append((msg, peer.now_ns()))

    sub = peer.node.create_subscription(
        AudioChunk, "/mic_test/audio/mic", on_chunk, qos_profile_sensor_data
    )
    proc = _spawn(
        "omni_ros.ros.mic_node",
        "/mic_test",
        {
            "source": "wav",
            "wav_path": str(wav_path),
            "chunk_ms": str(CHUNK_MS),
            "frame_id": "test_mic",
            # Looping: the stream goes on until the subscription has matched (discovery on a
            # loaded machine can take longer than the 2 s file).
            "wav_loop": "true",
        },
    )
    try:
        _wait_for(lambda: len(received) >= 12, proc)
    finally:
        stop_process(proc)
        peer.node.destroy_subscription(sub)
    chunk_frames = MIC_RATE * CHUNK_MS // 1000
    chunk_ns = CHUNK_MS * 1_000_000
    with peer.lock:
        got = list(received)
    first_msg = got[0][0]
    first_stamp = first_msg.header.stamp.sec * 1_000_000_000 + first_msg.header.stamp.nanosec
    first_frame = int(np.frombuffer(bytes(first_msg.data), dtype="<i2")[0])
    for msg, received_ns in got:
        assert msg.header.frame_id == "test_mic"
        assert (msg.sample_rate, msg.channels, msg.encoding) == (MIC_RATE, 1, "S16LE")
        frames = np.frombuffer(bytes(msg.data), dtype="<i2")
        assert len(frames) == chunk_frames
        # Frames are consecutive inside the chunk: nothing lost or reordered.
        assert np.array_equal(np.diff(frames.astype(np.int64)), np.ones(chunk_frames - 1))
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        offset = (int(frames[0]) - first_frame) % 32_000  # the counting sequence wraps at 2 s
        # The stamp follows the sample count exactly: sample i at stamp0 + i / rate.
        assert stamp - first_stamp == offset * 1_000_000_000 // MIC_RATE
        # The first sample was captured a whole chunk before the chunk could exist.
        assert received_ns - stamp >= chunk_ns
        assert received_ns - stamp < 5_000_000_000, "stamp is not on the ROS clock"


def test_mic_node_with_a_missing_device_exits_with_a_message_listing_devices() -> None:
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "omni_ros.ros.mic_node", "--ros-args", "-p", "device:=no such mic"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    stderr = result.stderr.decode(errors="replace")
    assert "no such mic" in stderr
    assert "input devices" in stderr


# -------------------------------------------------------------------------------------- speaker
def test_speech_in_any_format_is_converted_to_the_sink_format() -> None:
    from omni_ros.ros.speaker_node import chunk_to_pcm

    from omni_ros_msgs.msg import AudioChunk

    # 100 ms of a 440 Hz tone at 48 kHz, stereo F32LE (left = right).
    tone = (0.5 * np.sin(2 * np.pi * 440 * np.arange(4800) / 48_000)).astype("<f4")
    msg = AudioChunk(sample_rate=48_000, channels=2, encoding="F32LE")
    msg.data = np.repeat(tone, 2).tobytes()
    mono = np.frombuffer(chunk_to_pcm(msg, AudioFormat(24_000, 1, "S16LE")), "<i2")
    assert len(mono) == 2400
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(2400) / 24_000) * 32768
    assert np.max(np.abs(mono[100:-100] - expected[100:-100])) < 0.01 * 32768
    stereo = np.frombuffer(chunk_to_pcm(msg, AudioFormat(24_000, 2, "S16LE")), "<i2")
    assert np.array_equal(stereo.reshape(-1, 2)[:, 0], mono)
    assert np.array_equal(stereo.reshape(-1, 2)[:, 1], mono)


@pytest.fixture(scope="module")
def speaker(peer: Peer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from std_msgs.msg import Bool

    from omni_ros_msgs.msg import AudioChunk, Playback, SpeechFlush

    out = tmp_path_factory.mktemp("speaker") / "played.wav"
    speaking: list[bool] = []
    speaking_at: list[int] = []  # when each speaker/playing message arrived (ROS time)
    playback: list[Any] = []
    other: list[bool] = []

    def on_speaking(msg: Any) -> None:
        speaking_at.append(peer.now_ns())
        speaking.append(bool(msg.data))

    latched = QoSProfile(
        depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
    )
    reliable = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
    subs = [
        peer.node.create_subscription(Bool, "/spk_test/speaker/playing", on_speaking, latched),
        peer.node.create_subscription(Playback, "/spk_test/speaker/playback", playback.append, 200),
        peer.node.create_subscription(
            Bool, "/spk_test/robot_speaking", lambda m: other.append(m.data), latched
        ),
    ]
    speech = peer.node.create_publisher(AudioChunk, "/spk_test/omni/speech", reliable)
    flush = peer.node.create_publisher(SpeechFlush, "/spk_test/omni/speech_flush", reliable)
    proc = _spawn(
        "omni_ros.ros.speaker_node",
        "/spk_test",
        {"sink": "wav", "wav_path": str(out), "release_ms": "100.0"},
    )
    try:
        _wait_for(
            lambda: (
                bool(speaking)
                and speech.get_subscription_count() > 0
                and flush.get_subscription_count() > 0
            ),
            proc,
        )
        yield {
            "proc": proc,
            "speaking": speaking,
            "speaking_at": speaking_at,
            "playback": playback,
            "robot_speaking": other,
            "speech": speech,
            "flush": flush,
            "out": out,
        }
    finally:
        stop_process(proc)
        for sub in subs:
            peer.node.destroy_subscription(sub)


def _speech_chunks(
    start_ns: int, n_chunks: int, chunk_ms: int = 100, first_frame: int = 0, turn_id: int = 0
) -> list[Any]:
    from omni_ros_msgs.msg import AudioChunk

    fmt = AudioFormat(SPEECH_RATE, 1, "S16LE")
    frames = SPEECH_RATE * chunk_ms // 1000
    chunks = []
    for k in range(n_chunks):
        msg = AudioChunk(sample_rate=SPEECH_RATE, channels=1, encoding="S16LE", turn_id=turn_id)
        stamp = start_ns + k * chunk_ms * 1_000_000
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        msg.header.frame_id = "omni"
        msg.data = pcm_sequence(frames, fmt, start=first_frame + k * frames)
        chunks.append(msg)
    return chunks


def _flush_msg(turn_id: int, from_ns: int) -> Any:
    from omni_ros_msgs.msg import SpeechFlush

    msg = SpeechFlush(reason=SpeechFlush.BARGE_IN, turn_id=turn_id)
    msg.dropped_from.sec, msg.dropped_from.nanosec = divmod(from_ns, 1_000_000_000)
    return msg


def _ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def test_speaker_plays_every_chunk_in_order_and_reports_each_when_heard(
    peer: Peer, speaker: dict[str, Any]
) -> None:
    speaking: list[bool] = speaker["speaking"]
    assert speaking[0] is False, "speaker/playing is latched false before any speech"
    before = len(_wav_frames(speaker["out"]))
    n_seen, n_reports = len(speaking), len(speaker["playback"])
    start_ns = peer.now_ns() + 300_000_000
    for msg in _speech_chunks(start_ns, 5, first_frame=1000, turn_id=3):
        speaker["speech"].publish(msg)
    _wait_for(lambda: speaking[n_seen:] == [True, False], speaker["proc"])
    # Played on schedule: the speaker started no earlier than the first chunk's stamp.
    assert speaker["speaking_at"][n_seen] >= start_ns
    played = _wav_frames(speaker["out"])[before:]
    reports = speaker["playback"][n_reports:]
    assert [(r.turn_id, r.cut) for r in reports] == [(3, False)] * 5
    # The first chunk had 300 ms of headroom: heard on schedule (the WAV sink has no latency of
    # its own). The later ones follow back to back; on a loaded machine the device may run dry
    # between two writes, and then the next chunk's late start is dropped so that the rest
    # plays on its stamps: its report's ``scheduled`` says where it began (none on an idle
    # machine). Every frame played is accounted for by the reports.
    assert not reports[0].late
    assert 0 <= _ns(reports[0].header.stamp) - start_ns < 30_000_000
    expected = []
    for k, report in enumerate(reports):
        grid = start_ns + k * 100_000_000
        skipped = round((_ns(report.scheduled) - grid) * SPEECH_RATE / 1e9)
        assert 0 <= skipped < 2400
        assert report.samples == 2400 - skipped
        assert not report.late
        expected.append(
            pcm_sequence(2400 - skipped, AudioFormat(SPEECH_RATE), 1000 + k * 2400 + skipped)
        )
    assert np.array_equal(played, np.frombuffer(b"".join(expected), "<i2"))
    # Our own speech is not "other speech on the robot".
    assert True not in speaker["robot_speaking"]


def test_a_flush_stops_playback_drops_the_queue_and_later_chunks_of_that_turn(
    peer: Peer, speaker: dict[str, Any]
) -> None:
    speaking: list[bool] = speaker["speaking"]
    before = len(_wav_frames(speaker["out"]))
    n_seen, n_reports = len(speaking), len(speaker["playback"])
    start_ns = peer.now_ns() + 100_000_000
    for msg in _speech_chunks(start_ns, 50, turn_id=7):  # 5 s of speech
        speaker["speech"].publish(msg)
    _wait_for(lambda: speaking[n_seen:] == [True], speaker["proc"])
    flush_from = peer.now_ns()
    speaker["flush"].publish(_flush_msg(7, flush_from))
    _wait_for(lambda: speaking[n_seen:] == [True, False], speaker["proc"])
    stopped_ns = peer.now_ns()
    # A chunk of the flushed turn published after the flush (it was in flight): dropped too.
    for msg in _speech_chunks(stopped_ns + 50_000_000, 3, turn_id=7):
        speaker["speech"].publish(msg)
    # The next turn plays.
    for msg in _speech_chunks(stopped_ns + 300_000_000, 2, first_frame=7000, turn_id=8):
        speaker["speech"].publish(msg)
    _wait_for(lambda: speaking[n_seen:] == [True, False, True, False], speaker["proc"])
    reports = speaker["playback"][n_reports:]
    turn7 = [r for r in reports if r.turn_id == 7]
    assert turn7[-1].cut
    assert 0 <= turn7[-1].samples < 2400
    heard_ns = _ns(turn7[-1].header.stamp) + turn7[-1].samples * 1_000_000_000 // SPEECH_RATE
    assert heard_ns - flush_from < 100_000_000, "stopped within a block or two of the flush"
    assert len(turn7) - 1 < 50
    assert [(r.turn_id, r.cut) for r in reports if r.turn_id == 8] == [(8, False)] * 2
    played = _wav_frames(speaker["out"])[before:]
    tail = np.frombuffer(pcm_sequence(2 * 2400, AudioFormat(SPEECH_RATE), start=7000), "<i2")
    assert np.array_equal(played[-len(tail) :], tail)
    assert len(played) < 50 * 2400


def test_flush_service_drops_queued_speech(peer: Peer, speaker: dict[str, Any]) -> None:
    from std_srvs.srv import Trigger

    speaking: list[bool] = speaker["speaking"]
    n_seen = len(speaking)
    client = peer.node.create_client(Trigger, "/spk_test/speaker/flush")
    _wait_for(client.service_is_ready, speaker["proc"])
    for msg in _speech_chunks(peer.now_ns() + 100_000_000, 50, turn_id=9):
        speaker["speech"].publish(msg)
    _wait_for(lambda: speaking[n_seen:] == [True], speaker["proc"])
    future = client.call_async(Trigger.Request())
    _wait_for(future.done, speaker["proc"])
    response = future.result()
    assert response.success
    assert int(response.message.split()[1]) > 0, response.message
    _wait_for(lambda: speaking[n_seen:] == [True, False], speaker["proc"])
    peer.node.destroy_client(client)


def test_a_late_chunk_plays_at_once_and_is_counted(peer: Peer, speaker: dict[str, Any]) -> None:
    from std_srvs.srv import Trigger

    def late_count() -> int:
        # Nothing is queued when it is called, so the flush may be sent again: the first call on
        # a new client can lose its reply on Fast DDS (flow_harness.call_service says why).
        call = ResentCall(client, Trigger.Request(), resend_s=2.0)
        _wait_for(call.answered, speaker["proc"])
        result = call.result()
        return int(result.message.split("late_chunks=")[1].split()[0])

    speaking: list[bool] = speaker["speaking"]
    client = peer.node.create_client(Trigger, "/spk_test/speaker/flush")
    _wait_for(client.service_is_ready, speaker["proc"])
    before_late = late_count()
    before = len(_wav_frames(speaker["out"]))
    n_seen = len(speaking)
    # Stamped a second ago: it is late on arrival.
    n_reports = len(speaker["playback"])
    for msg in _speech_chunks(peer.now_ns() - 1_000_000_000, 2, first_frame=5000, turn_id=10):
        speaker["speech"].publish(msg)
    _wait_for(lambda: speaking[n_seen:] == [True, False], speaker["proc"])
    played = _wav_frames(speaker["out"])[before:]
    assert np.array_equal(
        played, np.frombuffer(pcm_sequence(2 * 2400, AudioFormat(SPEECH_RATE), start=5000), "<i2")
    )
    # Both are played at once and counted: even the second is still ~0.9 s behind its stamp.
    assert late_count() - before_late == 2
    assert [r.late for r in speaker["playback"][n_reports:]] == [True, True]
    peer.node.destroy_client(client)


def test_the_playback_thread_stops_quietly_when_the_context_is_shut_down_under_it() -> None:
    from omni_ros.audio_io import NullSink
    from omni_ros.ros.speaker_node import SpeakerNode

    context = rclpy.Context()
    rclpy.init(context=context)
    node = SpeakerNode(sink=NullSink(AudioFormat(SPEECH_RATE)), context=context)
    rclpy.shutdown(context=context)  # Ctrl-C: the context goes while the thread still runs
    node._set_speaking(True)  # raised RCLError ("publisher's context is invalid") before
    assert node._stop
    node.destroy_node()
