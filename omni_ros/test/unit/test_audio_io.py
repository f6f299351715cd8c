"""Audio sources and sinks without a sound card: a test double of the pyaudio API stands in for
PortAudio (this machine's real pyaudio imports but finds no devices)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omni_ros.audio_io import (
    ArraySource,
    AudioDeviceError,
    AudioFormat,
    AudioSink,
    AudioSource,
    CaptureStamper,
    NullSink,
    PyAudioSink,
    PyAudioSource,
    RecordingSink,
    WavFileSink,
    WavFileSource,
)
from omni_ros.core.errors import ConfigError
from pcm_samples import pcm_sequence

MIC = AudioFormat(16_000, 1, "S16LE")

DEVICES = [
    {"index": 0, "name": "HDA Intel PCH: ALC3246 Analog (hw:0,0)", "maxInputChannels": 2,
     "maxOutputChannels": 2, "defaultSampleRate": 44100.0},
    {"index": 1, "name": "HDA Intel PCH: HDMI 0 (hw:0,3)", "maxInputChannels": 0,
     "maxOutputChannels": 8, "defaultSampleRate": 48000.0},
    {"index": 2, "name": "ReSpeaker 4 Mic Array (UAC1.0): USB Audio (hw:1,0)",
     "maxInputChannels": 6, "maxOutputChannels": 0, "defaultSampleRate": 16000.0},
    {"index": 3, "name": "USB PnP Sound Device: Audio (hw:2,0)", "maxInputChannels": 1,
     "maxOutputChannels": 2, "defaultSampleRate": 48000.0},
]  # fmt: skip


class StreamDouble:
    """Stands in for ``pyaudio.Stream``: records writes, lets the test fire the input callback."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs
        self.written: list[bytes] = []
        self.closed = False

    def fire(self, data: bytes, time_info: dict[str, float], status: int = 0) -> None:
        callback = self.kwargs["stream_callback"]
        frames = len(data) // 2
        assert callback(data, frames, time_info, status) == (None, PyAudioApiDouble.paContinue)

    def get_input_latency(self) -> float:
        return 0.010

    def get_output_latency(self) -> float:
        return 0.020

    def write(self, data: bytes, exception_on_underflow: bool = False) -> None:
        self.written.append(data)

    def stop_stream(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class PyAudioApiDouble:
    """A test double of the ``pyaudio`` module: same names, a fixed device table, no PortAudio."""

    # The pyaudio module's own (mixedCase) names.
    paInt16 = 8  # noqa: N815
    paFloat32 = 1  # noqa: N815
    paContinue = 0  # noqa: N815
    paInputOverflow = 2  # noqa: N815

    def __init__(self, devices: list[dict[str, Any]], open_error: OSError | None = None) -> None:
        self.devices = devices
        self.open_error = open_error
        self.opened: list[StreamDouble] = []
        self.terminated = 0
        api = self

        class PyAudio:
            def get_device_count(self) -> int:
                return len(api.devices)

            def get_device_info_by_index(self, index: int) -> dict[str, Any]:
                return api.devices[index]

            def open(self, **kwargs: Any) -> StreamDouble:
                if api.open_error is not None:
                    raise api.open_error
                stream = StreamDouble(kwargs)
                api.opened.append(stream)
                return stream

            def terminate(self) -> None:
                api.terminated += 1

        self.PyAudio = PyAudio


class FixedClock:
    def __init__(self, now_ns: int) -> None:
        self.now = now_ns

    def __call__(self) -> int:
        return self.now


# ------------------------------------------------------------------------------- device choice
def test_a_device_name_that_matches_nothing_lists_the_available_input_devices() -> None:
    api = PyAudioApiDouble(DEVICES)
    with pytest.raises(AudioDeviceError) as info:
        PyAudioSource("Blue Yeti", MIC, 800, api=api)
    text = str(info.value)
    assert "'Blue Yeti'" in text
    assert "[0] HDA Intel PCH: ALC3246 Analog (hw:0,0)" in text
    assert "[2] ReSpeaker 4 Mic Array" in text
    assert "HDMI" not in text, "an output-only device is not offered as a microphone"
    assert api.terminated == 1, "PortAudio is released when opening fails"


def test_an_output_only_device_index_is_rejected_for_input() -> None:
    with pytest.raises(AudioDeviceError, match="index 1 is not an input device"):
        PyAudioSource("1", MIC, 800, api=PyAudioApiDouble(DEVICES))


def test_an_ambiguous_name_names_every_match() -> None:
    with pytest.raises(AudioDeviceError, match="ambiguous") as info:
        PyAudioSource("usb", MIC, 800, api=PyAudioApiDouble(DEVICES))
    assert "ReSpeaker" in str(info.value)
    assert "USB PnP" in str(info.value)


def test_a_unique_name_part_selects_the_device_case_insensitively() -> None:
    api = PyAudioApiDouble(DEVICES)
    source = PyAudioSource("respeaker", MIC, 800, api=api)
    kwargs = api.opened[0].kwargs
    assert kwargs["input"] is True
    assert kwargs["input_device_index"] == 2
    assert (kwargs["rate"], kwargs["channels"], kwargs["format"]) == (16_000, 1, api.paInt16)
    assert kwargs["frames_per_buffer"] == 800
    source.close()
    assert api.opened[0].closed


def test_an_empty_device_means_the_default_device() -> None:
    api = PyAudioApiDouble(DEVICES)
    PyAudioSink("", AudioFormat(24_000), 480, api=api)
    assert api.opened[0].kwargs["output_device_index"] is None
    assert api.opened[0].kwargs["output"] is True


def test_a_portaudio_oserror_becomes_an_audio_device_error_listing_devices() -> None:
    error = OSError(-9997, "Invalid sample rate")
    api = PyAudioApiDouble(DEVICES, open_error=error)
    with pytest.raises(AudioDeviceError) as info:
        PyAudioSource(0, AudioFormat(96_000), 800, api=api)
    assert "Invalid sample rate" in str(info.value)
    assert "Available input devices" in str(info.value)
    assert info.value.__cause__ is error
    assert isinstance(info.value, ConfigError)


def test_a_machine_without_devices_says_so() -> None:
    with pytest.raises(AudioDeviceError, match="no audio output devices"):
        PyAudioSink("", AudioFormat(24_000), 480, api=PyAudioApiDouble([]))


def test_the_real_pyaudio_on_a_machine_without_a_sound_card_gives_the_same_clear_error() -> None:
    pyaudio = pytest.importorskip("pyaudio")
    pa = pyaudio.PyAudio()
    try:
        has_inputs = any(
            pa.get_device_info_by_index(i)["maxInputChannels"] > 0
            for i in range(pa.get_device_count())
        )
    finally:
        pa.terminate()
    if has_inputs:
        pytest.skip("this machine has a real microphone")
    with pytest.raises(AudioDeviceError, match="no audio input devices"):
        PyAudioSource("", MIC, 800)


# ------------------------------------------------------------------------------- capture times
def test_capture_time_comes_from_portaudio_adc_time_when_the_host_api_gives_it() -> None:
    api = PyAudioApiDouble(DEVICES)
    clock = FixedClock(50_000_000_000)
    source = PyAudioSource(0, MIC, 800, api=api, monotonic_ns=clock)
    api.opened[0].fire(pcm_sequence(800, MIC), {"input_buffer_adc_time": 7.93, "current_time": 8.0})
    captured = source.read(800)
    assert captured is not None
    assert captured.timing == "adc"
    assert captured.capture_mono_ns == 50_000_000_000 - 70_000_000


def test_capture_time_is_estimated_from_buffer_length_and_latency_without_adc_time() -> None:
    api = PyAudioApiDouble(DEVICES)
    source = PyAudioSource(0, MIC, 800, api=api, monotonic_ns=FixedClock(50_000_000_000))
    api.opened[0].fire(pcm_sequence(800, MIC), {"input_buffer_adc_time": 0.0, "current_time": 0.0})
    captured = source.read(800)
    assert captured is not None
    assert captured.timing == "estimate"
    # 800 frames at 16 kHz = 50 ms in the buffer, plus the stream's 10 ms input latency.
    assert captured.capture_mono_ns == 50_000_000_000 - 50_000_000 - 10_000_000


def test_reads_of_another_size_are_reassembled_with_the_capture_time_of_their_first_frame() -> None:
    api = PyAudioApiDouble(DEVICES)
    clock = FixedClock(0)
    source = PyAudioSource(0, MIC, 800, api=api, monotonic_ns=clock)
    for k in range(3):
        clock.now = 1_000_000_000 + (k + 1) * 50_000_000
        adc = 1.0 + k * 0.05
        api.opened[0].fire(
            pcm_sequence(800, MIC, start=800 * k),
            {"input_buffer_adc_time": adc, "current_time": adc + 0.05},
        )
    first, second = source.read(1000), source.read(1000)
    assert first is not None
    assert second is not None
    assert np.array_equal(np.frombuffer(first.data + second.data, "<i2"), np.arange(2000))
    assert first.capture_mono_ns == 1_000_000_000
    # Frame 1000 was captured 1000 / 16000 s = 62.5 ms after frame 0.
    assert second.capture_mono_ns == 1_062_500_000


def test_an_input_overflow_is_reported_on_the_next_read() -> None:
    api = PyAudioApiDouble(DEVICES)
    source = PyAudioSource(0, MIC, 800, api=api)
    api.opened[0].fire(pcm_sequence(800, MIC), {}, status=api.paInputOverflow)
    api.opened[0].fire(pcm_sequence(800, MIC), {})
    first, second = source.read(800), source.read(800)
    assert first is not None
    assert first.overflowed
    assert second is not None
    assert not second.overflowed


def test_close_releases_a_blocked_reader() -> None:
    api = PyAudioApiDouble(DEVICES)
    source = PyAudioSource(0, MIC, 800, api=api)
    source.close()
    assert source.read(800) is None
    assert api.terminated == 1


def test_stamps_follow_the_sample_count_through_scheduling_jitter() -> None:
    stamper = CaptureStamper(16_000, resync_ns=20_000_000)
    jitter = [0, 3_000_000, -2_000_000, 15_000_000, -19_000_000]
    stamps = [stamper.stamp(1_000_000_000 + k * 50_000_000 + j, 800) for k, j in enumerate(jitter)]
    assert stamps == [1_000_000_000 + k * 50_000_000 for k in range(5)]
    assert stamper.resyncs == 0


def test_stamps_reanchor_when_the_measurement_disagrees_beyond_the_tolerance() -> None:
    stamper = CaptureStamper(16_000, resync_ns=20_000_000)
    stamper.stamp(1_000_000_000, 800)
    # Two buffers (100 ms) were lost: the measured capture time jumps ahead.
    assert stamper.stamp(1_150_000_000, 800) == 1_150_000_000
    assert stamper.stamp(1_200_000_000, 800) == 1_200_000_000
    assert stamper.resyncs == 1


def test_stamps_never_accumulate_rounding_error() -> None:
    stamper = CaptureStamper(44_100, resync_ns=0)
    stamp = 0
    for k in range(1000):
        stamp = stamper.stamp(k * 441 * 1_000_000_000 // 44_100, 441)
    assert stamp == 999 * 10_000_000
    assert stamper.resyncs == 0


# ------------------------------------------------------------------------------ files, memory
def test_array_source_delivers_every_frame_once_with_exact_capture_times() -> None:
    clock = FixedClock(5_000_000_000)
    source = ArraySource(pcm_sequence(2000, MIC), MIC, realtime=False, monotonic_ns=clock)
    reads = []
    while (captured := source.read(800)) is not None:
        reads.append(captured)
    assert [c.n_frames for c in reads] == [800, 800, 400]
    assert [c.capture_mono_ns for c in reads] == [5_000_000_000, 5_050_000_000, 5_100_000_000]
    data = np.frombuffer(b"".join(c.data for c in reads), "<i2")
    assert np.array_equal(data, np.arange(2000))


def test_a_looping_array_source_wraps_around() -> None:
    source = ArraySource(pcm_sequence(100, MIC), MIC, loop=True, realtime=False)
    captured = source.read(250)
    assert captured is not None
    assert np.array_equal(np.frombuffer(captured.data, "<i2"), np.arange(250) % 100)


def test_a_wav_file_recorded_by_the_sink_reads_back_identically(tmp_path: Path) -> None:
    stereo = AudioFormat(24_000, 2, "S16LE")
    pcm = pcm_sequence(4800, stereo)
    sink = WavFileSink(tmp_path / "out.wav", stereo, realtime=False)
    for offset in range(0, len(pcm), 960):
        sink.write(pcm[offset : offset + 960])
    sink.close()
    source = WavFileSource(tmp_path / "out.wav", realtime=False)
    assert source.format == stereo
    captured = source.read(10_000)
    assert captured is not None
    assert captured.data == pcm


def test_the_wav_sink_file_is_valid_while_it_is_still_being_written(tmp_path: Path) -> None:
    sink = WavFileSink(tmp_path / "live.wav", MIC, realtime=False)
    sink.write(pcm_sequence(160, MIC))
    source = WavFileSource(tmp_path / "live.wav", realtime=False)
    captured = source.read(1000)
    assert captured is not None
    assert captured.n_frames == 160
    sink.close()


def test_float_wav_files_become_f32le(tmp_path: Path) -> None:
    from scipy.io import wavfile

    samples = np.linspace(-0.5, 0.5, 1600, dtype=np.float32)
    wavfile.write(tmp_path / "f.wav", 16_000, samples)
    source = WavFileSource(tmp_path / "f.wav", realtime=False)
    assert source.format == AudioFormat(16_000, 1, "F32LE")
    captured = source.read(1600)
    assert captured is not None
    assert np.array_equal(np.frombuffer(captured.data, "<f4"), samples)


def test_a_missing_wav_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read WAV file"):
        WavFileSource(tmp_path / "nope.wav")


def test_recording_and_null_sinks_log_every_write() -> None:
    recording = RecordingSink(MIC, realtime=False)
    null = NullSink(MIC, realtime=False)
    for sink in (recording, null):
        sink.write(pcm_sequence(160, MIC))
        sink.write(pcm_sequence(80, MIC, start=160))
    assert recording.data == pcm_sequence(240, MIC)
    assert null.data == b""
    assert [n for _, n in null.writes] == [160, 80]


def test_every_source_and_sink_satisfies_its_protocol(tmp_path: Path) -> None:
    api = PyAudioApiDouble(DEVICES)
    sources: list[AudioSource] = [
        ArraySource(pcm_sequence(10, MIC), MIC),
        PyAudioSource(0, MIC, 800, api=api),
    ]
    sinks: list[AudioSink] = [
        RecordingSink(MIC),
        NullSink(MIC),
        WavFileSink(tmp_path / "s.wav", MIC),
        PyAudioSink(0, MIC, 160, api=api),
    ]
    assert all(isinstance(s, AudioSource) for s in sources)
    assert all(isinstance(s, AudioSink) for s in sinks)
    for source in sources:
        source.close()
    for sink in sinks:
        sink.close()


def test_an_unknown_encoding_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="S16LE"):
        AudioFormat(16_000, 1, "MP3")


def test_a_paced_sink_plays_back_to_back_writes_without_drift_from_the_callers_overhead() -> None:
    clock = [1_000_000_000]

    def monotonic_ns() -> int:
        clock[0] += 1_000_000  # every look at the clock costs the caller 1 ms
        return clock[0]

    sink = NullSink(AudioFormat(24_000, 1, "S16LE"), monotonic_ns=monotonic_ns)
    block = bytes(2 * 480)  # 20 ms
    first = clock[0] + 1_000_000
    for _ in range(10):
        sink.write(block)
    # 10 blocks of 20 ms end 200 ms after the first began, not 200 ms + the overhead.
    assert sink._device_ns == first + 200_000_000
    # After the device ran dry, playback restarts when the next write comes.
    clock[0] += 500_000_000
    sink.write(block)
    restart = clock[0] - 1_000_000  # the write's own look at the clock (pacing took one more)
    assert sink._device_ns == restart + 20_000_000
