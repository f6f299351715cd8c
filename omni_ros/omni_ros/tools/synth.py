"""Synthesise input rosbags: spoken questions (espeak-ng), camera frames of a changing scene, silence.

Used by ``make demo`` and by the bag tests. Nothing is downloaded: speech comes from Debian's
espeak-ng, frames are drawn with numpy. A ``messy`` bag reproduces what real robots record: a 48 kHz
stereo microphone, mixed image encodings with padded rows, dropouts and out-of-order chunks.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soxr
from rosbags.rosbag2 import StoragePlugin, Writer

from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError
from omni_ros.tools.bagio import BAG_VERSION, offered_qos
from omni_ros.tools.typestore import omni_typestore

MIC_TOPIC = "/audio/mic"
CAMERA_TOPIC = "/camera/image_raw"
COMPRESSED_TOPIC = "/camera/image_raw/compressed"


@dataclass(frozen=True)
class SpeechCue:
    """Say ``text`` starting ``at_s`` seconds after the bag starts."""

    at_s: float
    text: str


@dataclass(frozen=True)
class SynthConfig:
    """What to put into the bag."""

    duration_s: float = 24.0
    start_s: float = 1_700_000_000.0  # bag time axis: an arbitrary wall-clock-like epoch
    mic_rate: int = 16_000
    mic_channels: int = 1
    chunk_ms: int = 20
    fps: float = 5.0  # the model takes one frame per 1 s unit; 5 fps leaves the policy a choice
    width: int = 480
    height: int = 360
    cues: tuple[SpeechCue, ...] = (
        SpeechCue(1.0, "Hello robot. What do you see on the table?"),
        SpeechCue(8.0, "Can you remind me to water the plants later?"),
    )
    noise_dbfs: float = -60.0
    messy: bool = False
    seed: int = 0
    storage: str = "mcap"
    extra: dict[str, float] = field(default_factory=dict)


def speak(text: str, rate: int) -> np.ndarray:
    """Speech for ``text`` from espeak-ng as mono float32 at ``rate``."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise ConfigError(
            "espeak-ng is not installed (apt-get install espeak-ng; `make setup` does)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-s", "150", "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path), "rb") as wav:
            src_rate = wav.getframerate()
            pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    audio = pcm.astype(np.float32) / 32768.0
    return np.asarray(soxr.resample(audio, src_rate, rate, quality="HQ"), dtype=np.float32)


def mic_signal(config: SynthConfig) -> np.ndarray:
    """The whole microphone track: low noise plus the spoken cues, mono float32 at mic_rate."""
    rng = np.random.default_rng(config.seed)
    n = int(config.duration_s * config.mic_rate)
    signal = rng.normal(0.0, 10 ** (config.noise_dbfs / 20), n).astype(np.float32)
    for cue in config.cues:
        start = int(cue.at_s * config.mic_rate)
        if start >= n:
            continue  # a cue after the end of a short bag is left out, not half-added
        speech = speak(cue.text, config.mic_rate) * 0.5
        end = min(n, start + len(speech))
        signal[start:end] += speech[: end - start]
    return np.clip(signal, -1.0, 1.0)


def scene(index: int, t_s: float, width: int, height: int) -> np.ndarray:
    """A changing scene: a slowly shifting gradient, a moving square, a new 'object' every 5 s."""
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = ((x + t_s * 20) % 256).astype(np.uint8)
    img[..., 1] = np.broadcast_to(y, (height, width)).astype(np.uint8)
    img[..., 2] = 96
    size = height // 5
    cx = int((width - size) * (0.5 + 0.4 * np.sin(t_s)))
    cy = int((height - size) * (0.5 + 0.4 * np.cos(t_s * 0.7)))
    colour = np.array([(37 * (int(t_s) // 5)) % 256, 200, (91 * (int(t_s) // 5)) % 256], np.uint8)
    img[cy : cy + size, cx : cx + size] = colour
    return img


def _stamp(ns: int) -> tuple[int, int]:
    return ns // NS_PER_S, ns % NS_PER_S


def _audio_messages(config: SynthConfig) -> Iterator[tuple[int, int, np.ndarray]]:
    """(stamp_ns of first sample, log_time_ns, samples [frames, channels] float32)."""
    rate = 48_000 if config.messy else config.mic_rate
    channels = 2 if config.messy else config.mic_channels
    mono = mic_signal(SynthConfig(**{**config.__dict__, "mic_rate": rate}))
    frames = np.repeat(mono[:, None], channels, axis=1)
    if channels > 1:
        frames[:, 1] *= 0.8  # a slightly different second microphone
    hop = rate * config.chunk_ms // 1000
    start_ns = int(config.start_s * NS_PER_S)
    chunks = []
    for k, i in enumerate(range(0, len(frames) - hop + 1, hop)):
        stamp_ns = start_ns + i * NS_PER_S // rate
        log_ns = stamp_ns + hop * NS_PER_S // rate + 2_000_000  # published after its last sample
        if config.messy and k % 97 == 50:
            continue  # a dropout: the gap must be zero-filled and counted
        chunks.append((stamp_ns, log_ns, frames[i : i + hop]))
    if config.messy:  # swap neighbours every 41 chunks: out-of-order arrival
        for k in range(10, len(chunks) - 1, 41):
            (s0, l0, a0), (s1, l1, a1) = chunks[k], chunks[k + 1]
            chunks[k], chunks[k + 1] = (s1, l0, a1), (s0, l1, a0)
    yield from chunks


#: Shortest bag :func:`write_bag` makes: one Omni-Flow unit.
MIN_DURATION_S = 1.0


def write_bag(path: Path, config: SynthConfig | None = None) -> Path:
    """Write the input bag to ``path`` (a rosbag2 folder that must not exist). Returns the path.

    A failure part way removes the folder again, so a rerun is not blocked by a partial bag.

    Raises:
        ConfigError: ``path`` exists, ``duration_s`` < 1 s, an unknown storage, no espeak-ng.
    """
    config = config or SynthConfig()
    path = Path(path)
    if not config.duration_s >= MIN_DURATION_S:  # also refuses NaN
        raise ConfigError(
            f"--duration must be at least {MIN_DURATION_S:g} s (one Omni-Flow unit), "
            f"got {config.duration_s:g}"
        )
    if config.storage not in ("mcap", "sqlite3"):
        raise ConfigError(f"--storage must be mcap or sqlite3, got {config.storage!r}")
    if path.exists() or path.is_symlink():
        raise ConfigError(f"{path} exists: choose a new folder for the bag (or remove it first)")
    try:
        _write(path, config)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def _write(path: Path, config: SynthConfig) -> None:
    store = omni_typestore()
    types = store.types
    storage = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[config.storage]
    rate = 48_000 if config.messy else config.mic_rate
    channels = 2 if config.messy else config.mic_channels
    # Metadata every supported `ros2 bag` reads, and the QoS a robot's publishers offer.
    with Writer(path, version=BAG_VERSION, storage_plugin=storage) as writer:
        mic = writer.add_connection(
            MIC_TOPIC,
            "omni_ros_msgs/msg/AudioChunk",
            typestore=store,
            offered_qos_profiles=[offered_qos(MIC_TOPIC)],
        )
        cam = writer.add_connection(
            CAMERA_TOPIC,
            "sensor_msgs/msg/Image",
            typestore=store,
            offered_qos_profiles=[offered_qos(CAMERA_TOPIC)],
        )
        records: list[tuple[int, Any, Any]] = []
        for stamp_ns, log_ns, frames in _audio_messages(config):
            sec, nsec = _stamp(stamp_ns)
            header = types["std_msgs/msg/Header"](
                stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec), frame_id="mic"
            )
            pcm = (np.clip(frames, -1, 1) * 32767).round().astype("<i2").tobytes()
            msg = types["omni_ros_msgs/msg/AudioChunk"](
                header=header,
                sample_rate=rate,
                channels=channels,
                encoding="S16LE",
                data=np.frombuffer(pcm, dtype=np.uint8),
                turn_id=0,
            )
            records.append((log_ns, mic, store.serialize_cdr(msg, "omni_ros_msgs/msg/AudioChunk")))
        n_frames = int(config.duration_s * config.fps)
        for k in range(n_frames):
            t_s = k / config.fps
            stamp_ns = int(config.start_s * NS_PER_S) + int(t_s * NS_PER_S)
            rgb = scene(k, t_s, config.width, config.height)
            encoding, data, step = "rgb8", rgb, config.width * 3
            if config.messy:
                encoding = ("rgb8", "bgr8", "mono8")[k % 3]
                if encoding == "bgr8":
                    data = rgb[..., ::-1]
                elif encoding == "mono8":
                    data = rgb.mean(axis=2).astype(np.uint8)[..., None]
                bpp = data.shape[2]
                step = config.width * bpp + 64  # padded rows
                padded = np.zeros((config.height, step), np.uint8)
                padded[:, : config.width * bpp] = data.reshape(config.height, -1)
                data = padded
            sec, nsec = _stamp(stamp_ns)
            header = types["std_msgs/msg/Header"](
                stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec), frame_id="camera"
            )
            msg = types["sensor_msgs/msg/Image"](
                header=header,
                height=config.height,
                width=config.width,
                encoding=encoding,
                is_bigendian=0,
                step=step,
                data=np.ascontiguousarray(data).reshape(-1),
            )
            records.append(
                (stamp_ns + 30_000_000, cam, store.serialize_cdr(msg, "sensor_msgs/msg/Image"))
            )
        records.sort(key=lambda r: r[0])
        for log_ns, conn, raw in records:
            writer.write(conn, log_ns, raw)
