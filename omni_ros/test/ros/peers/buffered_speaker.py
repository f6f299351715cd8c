"""speaker_node (the real node class) playing into a sound card that buffers ``--latency-ms``.

The device is modelled as a blocking PortAudio stream is: ``write`` returns once the data fits in
its buffer, audio written to an idle device is heard ``latency_ms`` later, audio written while it
plays follows on, and ``latency_ns`` says how much it buffers (``speaker_node`` writes every chunk
that long before its stamp). Nothing is played: a test judges the node's ``speaker/playback``.

    python buffered_speaker.py --latency-ms 250 --ros-args -r __ns:=/x
"""

from __future__ import annotations

import sys
import threading
import time

from omni_ros.audio_io import AudioFormat
from omni_ros.core.clock import NS_PER_S
from omni_ros.ros._run import spin_node
from omni_ros.ros.speaker_node import SpeakerNode

SLACK_NS = 5_000_000  # a write this late after the buffer ran out still follows on


class BufferedSink:
    """A sound card with a ``latency_ns`` buffer on the wall clock (the node's ROS clock)."""

    def __init__(self, latency_ns: int, fmt: AudioFormat) -> None:
        self.format = fmt
        self._latency_ns = latency_ns
        self._end_ns = 0  # when what was written so far has been heard
        self._closed = threading.Event()

    def write(self, data: bytes) -> None:
        now = time.time_ns()
        idle = self._end_ns + SLACK_NS < now + self._latency_ns
        start = now + self._latency_ns if idle else self._end_ns
        self._end_ns = start + self.format.duration_ns(self.format.frames(data))
        # Returns once the buffer holds no more than latency_ns.
        wait_ns = self._end_ns - self._latency_ns - time.time_ns()
        if wait_ns > 0:
            self._closed.wait(wait_ns / NS_PER_S)

    def flush(self) -> None:
        self._end_ns = 0

    def drain(self) -> None:
        pass

    @property
    def latency_ns(self) -> int:
        return self._latency_ns

    def close(self) -> None:
        self._closed.set()


def main() -> None:
    argv = sys.argv[1:]
    latency_ms = 250
    if argv[:1] == ["--latency-ms"]:
        latency_ms, argv = int(argv[1]), argv[2:]
    sink = BufferedSink(latency_ms * 1_000_000, AudioFormat(24_000, 1, "S16LE"))
    spin_node(lambda: SpeakerNode(sink=sink), "buffered_speaker", ["buffered_speaker", *argv])


if __name__ == "__main__":
    main()
