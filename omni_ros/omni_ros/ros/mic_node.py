"""``mic_node``: a microphone -> ``omni_ros_msgs/AudioChunk`` on ``audio/mic``.

Run: ``ros2 run omni_ros mic_node --ros-args -p device:=USB -p chunk_ms:=50`` (or
``ros2 launch omni_ros omni_flow.launch.py with_mic:=true``).
"""

from __future__ import annotations

import array
import threading
import time
from typing import Any

from rclpy.node import Node

from omni_ros import topics
from omni_ros.audio_io import (
    AudioFormat,
    AudioSource,
    CaptureStamper,
    PyAudioSource,
    WavFileSource,
)
from omni_ros.core.errors import ConfigError
from omni_ros.ros import conversions as conv
from omni_ros.ros._run import publish_unless_shut_down, spin_node
from omni_ros.ros.qos import profile
from omni_ros_msgs.msg import AudioChunk

#: name -> (default, description). The node declares exactly these; tests read this table.
PARAMETERS: dict[str, tuple[Any, str]] = {
    "source": ("pyaudio", "pyaudio (a sound card) or wav (wav_path captured at real-time pace)"),
    "device": ("", "PortAudio input: index, unique part of its name, or '' for the default"),
    "sample_rate": (16000, "capture rate [Hz] (pyaudio; a wav source keeps its file's rate)"),
    "channels": (1, "interleaved channels (pyaudio; a wav source keeps its file's layout)"),
    "chunk_ms": (50, "audio per message [ms]"),
    "encoding": ("S16LE", "S16LE or F32LE (pyaudio; 16-bit wav files give S16LE, others F32LE)"),
    "frame_id": ("mic", "header.frame_id of every chunk"),
    "wav_path": ("", "WAV file for source=wav"),
    "wav_loop": (False, "restart the WAV file at its end instead of stopping"),
    "resync_ms": (20.0, "re-anchor stamps when measured capture time drifts further than this"),
}


class MicNode(Node):
    """Captures audio in a thread and publishes it from that thread.

    Parameters: see :data:`PARAMETERS` (``source``, ``device``, ``sample_rate``, ``channels``,
    ``chunk_ms``, ``encoding``, ``frame_id``, ``wav_path``, ``wav_loop``, ``resync_ms``).

    Topics out:
        ``audio/mic`` (omni_ros_msgs/AudioChunk, sensor-data QoS): ``header.stamp`` is the capture
        time of the chunk's FIRST sample on this node's ROS clock.

    Stamping: the source reports when the first frame was captured on the monotonic clock
    (PortAudio's input ADC time where the host API provides it, else the callback time minus the
    buffer duration and input latency). That instant is mapped onto ROS time by the offset
    ``ros_now - monotonic_now`` read at publish time, so it is right under sim time too. Stamps then
    follow the sample count (no jitter, no gaps between chunks) and re-anchor only when the
    measurement disagrees by more than ``resync_ms`` (lost buffers, clock jumps, drift).

    Tests and machines without a sound card use ``source:=wav`` or pass ``source=`` (any
    :class:`~omni_ros.audio_io.AudioSource`) to the constructor.
    """

    def __init__(self, *, source: AudioSource | None = None, **kwargs: Any) -> None:
        super().__init__("mic_node", **kwargs)
        # Set before anything can raise: rclpy destroys half-built nodes at shutdown.
        self._stop = threading.Event()
        self._source: AudioSource | None = None
        self._thread: threading.Thread | None = None
        for name, (default, _doc) in PARAMETERS.items():
            self.declare_parameter(name, default)
        p = {name: self.get_parameter(name).value for name in PARAMETERS}
        self._frame_id = str(p["frame_id"])
        self._source = source if source is not None else self._open_source(p)
        fmt = self._source.format
        self._chunk_frames = max(1, fmt.sample_rate * int(p["chunk_ms"]) // 1000)
        self._stamper = CaptureStamper(fmt.sample_rate, int(float(p["resync_ms"]) * 1e6))
        self._pub = self.create_publisher(AudioChunk, topics.MIC.name, profile(topics.MIC))
        self.chunks_published = 0
        self.overflows = 0
        self._thread = threading.Thread(target=self._capture, name="mic_capture", daemon=True)
        self.get_logger().info(
            f"capturing {fmt.sample_rate} Hz x{fmt.channels} {fmt.encoding}, "
            f"{self._chunk_frames} frames per chunk from {type(self._source).__name__}"
        )
        self._thread.start()

    @staticmethod
    def _open_source(p: dict[str, Any]) -> AudioSource:
        kind = str(p["source"])
        if kind == "wav":
            if not p["wav_path"]:
                raise ConfigError("source=wav needs the wav_path parameter")
            return WavFileSource(str(p["wav_path"]), loop=bool(p["wav_loop"]))
        if kind == "pyaudio":
            fmt = AudioFormat(int(p["sample_rate"]), int(p["channels"]), str(p["encoding"]))
            frames = max(1, fmt.sample_rate * int(p["chunk_ms"]) // 1000)
            return PyAudioSource(str(p["device"]), fmt, frames)
        raise ConfigError(f"source={kind!r} unknown; use pyaudio or wav")

    def _capture(self) -> None:
        assert self._source is not None
        fmt = self._source.format
        while not self._stop.is_set():
            captured = self._source.read(self._chunk_frames)
            if captured is None or captured.n_frames == 0:
                if not self._stop.is_set():
                    self.get_logger().info("audio source ended; no more chunks")
                return
            # Read both clocks back to back: their offset maps the monotonic capture time to ROS time.
            ros_now_ns = self.get_clock().now().nanoseconds
            measured_ns = ros_now_ns - (time.monotonic_ns() - captured.capture_mono_ns)
            stamp_ns = self._stamper.stamp(measured_ns, captured.n_frames)
            if captured.overflowed:
                self.overflows += 1
                self.get_logger().warning(
                    "audio input overflowed (samples lost); stamps re-anchor on the next chunk",
                    throttle_duration_sec=5.0,
                )
            msg = AudioChunk(
                sample_rate=fmt.sample_rate, channels=fmt.channels, encoding=fmt.encoding
            )
            msg.header = conv.header(max(0, stamp_ns), self._frame_id)
            # array.array skips rclpy's per-element check of a Python sequence (see conversions).
            msg.data = array.array("B", captured.data)
            if not publish_unless_shut_down(self, self._pub, msg):
                return  # SIGTERM / Ctrl-C shut the context down: stop quietly, no traceback
            self.chunks_published += 1

    def destroy_node(self) -> None:
        self._stop.set()
        if self._source is not None:
            self._source.close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    spin_node(MicNode, "mic_node", args)


if __name__ == "__main__":
    main()
