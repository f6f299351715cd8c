"""``omni-ros record`` writes live topics from another process into a readable rosbag2."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from flow_harness import stop_process
from omni_ros.core.errors import ConfigError
from omni_ros.tools.record import message_class, record
from omni_ros.tools.typestore import omni_typestore
from rosbags.rosbag2 import Reader

RATE = 16_000


def _wav(path: Path, seconds: float) -> None:
    ramp = (np.arange(int(RATE * seconds)) % 30_000).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(ramp.tobytes())


def test_recording_a_live_mic_node_gives_a_bag_of_contiguous_stamped_chunks(tmp_path: Path) -> None:
    wav = tmp_path / "ramp.wav"
    _wav(wav, 30.0)
    mic = subprocess.Popen(
        [sys.executable, "-m", "omni_ros.ros.mic_node", "--ros-args",
         "-p", "source:=wav", "-p", f"wav_path:={wav}", "-p", "chunk_ms:=20"],
        env=os.environ.copy(),
    )  # fmt: skip
    try:
        counts = record(tmp_path / "bag", ["/audio/mic"], duration_s=2.0, discover_s=20.0)
    finally:
        stop_process(mic)
    assert counts["/audio/mic"] >= 20
    store = omni_typestore()
    with Reader(tmp_path / "bag") as reader:
        assert [c.msgtype for c in reader.connections] == ["omni_ros_msgs/msg/AudioChunk"]
        msgs = [store.deserialize_cdr(raw, c.msgtype) for c, _t, raw in reader.messages()]
    stamps = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec for m in msgs]
    # 20 ms chunks stamped with their first sample's capture time: consecutive, 20 ms apart.
    assert np.allclose(np.diff(stamps), 20_000_000, atol=1_000)
    assert all(m.sample_rate == RATE and len(m.data) == 2 * 320 for m in msgs)


def test_recording_nothing_and_bad_types_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="being published"):
        record(tmp_path / "empty", ["/nobody/publishes/this"], duration_s=0.1, discover_s=0.5)
    with pytest.raises(ConfigError, match="pkg/msg/Name"):
        message_class("not_a_type")
    with pytest.raises(ConfigError, match="not installed"):
        message_class("no_such_pkg/msg/Thing")


def test_record_waits_for_a_topic_that_appears_late_and_lists_silent_ones(tmp_path: Path) -> None:
    wav = tmp_path / "ramp.wav"
    _wav(wav, 30.0)
    recorder = subprocess.Popen(
        [sys.executable, "-m", "omni_ros.tools.cli", "record", str(tmp_path / "bag"),
         "--topics", "/late/mic", "/omni/state", "--duration", "2"],
        env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    mic = None
    try:
        time.sleep(6.0)  # longer than the 3 s after which `record` used to give up
        assert recorder.poll() is None, recorder.communicate()
        mic = subprocess.Popen(
            [sys.executable, "-m", "omni_ros.ros.mic_node", "--ros-args",
             "-p", "source:=wav", "-p", f"wav_path:={wav}", "-p", "chunk_ms:=20",
             "-r", "audio/mic:=/late/mic"],  # a topic no earlier test left in the graph
            env=os.environ.copy(),
        )  # fmt: skip
        out, err = recorder.communicate(timeout=60)
    finally:
        if mic is not None:
            stop_process(mic)
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    assert recorder.returncode == 0, err
    counts = dict(part.split(": ") for part in out.strip().splitlines()[-1].split(", "))
    assert int(counts["/late/mic"]) >= 20
    assert counts["/omni/state"] == "0"
    assert "no messages on /omni/state" in err
