"""Bad input that reached the node in the issue-15/16 campaign, checked below the ROS layer.

Each test reproduces one finding (crafted WAV headers, unstamped audio, malformed frames that no
unit chooses, a decompression bomb) and fails without its fix.
"""

from __future__ import annotations

import io
import itertools
import logging
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from omni_ros.core.audio import ArrivalStamper, audio_frames, inspect_wav
from omni_ros.core.clock import ManualClock
from omni_ros.core.errors import DecodeError
from omni_ros.core.flow import FlowConfig, OmniFlow
from omni_ros.core.images import check_image, decode_image
from omni_ros.core.types import RawAudio, RawImage
from PIL import Image
from unit.core.scripted_backend import ScriptedBackendDouble

S = 1_000_000_000


def wav_bytes(
    frames: int = 1600,
    channels: int = 1,
    rate: int = 16_000,
    bits: int = 16,
    align: int | None = None,
    tag: int = 1,
) -> bytes:
    """A WAV file whose header fields can be made to lie."""
    align = channels * bits // 8 if align is None else align
    data = b"\x00\x01" * (frames * max(1, channels * bits // 16))
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * max(align, 1), align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
    body += struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


CRAFTED = {
    "truncated header": wav_bytes()[:30],
    "zero channels": wav_bytes(channels=0, align=2),
    "block align 0": wav_bytes(align=0),
    "no frames": wav_bytes(frames=0),
    "not a wav": b"GIF89a" + bytes(100),
    "data before fmt": b"RIFF"
    + struct.pack("<I", 20)
    + b"WAVEdata"
    + struct.pack("<I", 4)
    + bytes(4),
    "absurd rate": wav_bytes(rate=0),
    "compressed format": wav_bytes(tag=0x55),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_wav_header_is_a_decode_error_naming_the_problem(case: str) -> None:
    with pytest.raises(DecodeError):
        inspect_wav(CRAFTED[case])


def test_scipy_itself_crashes_on_the_crafted_headers_the_check_refuses(tmp_path: Path) -> None:
    """Why the header is checked first: the decoder the node used raised non-OmniError
    exceptions (ZeroDivisionError, struct.error, ...) that escaped the service callback."""
    from scipy.io import wavfile

    escaped = 0
    for case in ("zero channels", "block align 0", "truncated header"):
        path = tmp_path / f"{case}.wav"
        path.write_bytes(CRAFTED[case])
        try:
            wavfile.read(str(path))
        except (OSError, ValueError):
            pass  # what the old read_wav caught
        except Exception:
            escaped += 1
    assert escaped >= 1


def test_a_valid_wav_header_gives_its_duration_without_decoding() -> None:
    info = inspect_wav(wav_bytes(frames=32_000, channels=2))
    assert (info.sample_rate, info.channels, info.frames) == (16_000, 2, 32_000)
    assert info.duration_s == pytest.approx(2.0)


def test_a_data_chunk_longer_than_the_file_counts_only_the_frames_present() -> None:
    data = wav_bytes(frames=1000)
    assert inspect_wav(data[:-200]).frames == 900


# -------------------------------------------------------------------------------- unstamped audio
def chunk(stamp_ns: int, ms: int = 20) -> RawAudio:
    return RawAudio(stamp_ns, 16_000, 1, "S16LE", bytes(2 * 16 * ms))


def test_unstamped_chunks_are_stamped_on_arrival_end_to_end_and_counted() -> None:
    stamper = ArrivalStamper()
    arrivals = [10 * S + i * 20_000_000 + jitter for i, jitter in enumerate([0, 3e6, -4e6, 1e6])]
    out = [stamper.stamp(chunk(0), int(a)) for a in arrivals]
    assert stamper.unstamped == 4
    assert out[0].stamp_ns == 10 * S - 20_000_000  # its first sample: arrival minus duration
    # Laid end to end despite the jitter: no gap, no overlap.
    assert [b.stamp_ns - a.stamp_ns for a, b in itertools.pairwise(out)] == [20_000_000] * 3


def test_an_arrival_far_from_the_stream_end_re_anchors_it() -> None:
    stamper = ArrivalStamper(tolerance_ns=100_000_000)
    stamper.stamp(chunk(0), 10 * S)
    later = stamper.stamp(chunk(0), 12 * S)  # the driver paused for 2 s
    assert later.stamp_ns == 12 * S - 20_000_000


def test_stamped_and_malformed_chunks_pass_unchanged_and_uncounted() -> None:
    stamper = ArrivalStamper()
    stamped = chunk(5 * S)
    assert stamper.stamp(stamped, 9 * S) is stamped
    bad = RawAudio(0, 16_000, 0, "S16LE", b"\x00\x01\x02")
    assert stamper.stamp(bad, 9 * S) is bad
    assert stamper.unstamped == 0


def test_unstamped_audio_stamped_on_arrival_gives_units_of_the_backend_length() -> None:
    """Stamp 0 on every chunk made the backend fail units (``... must have exactly 16560``):
    with the arrival stamps every unit is complete and nothing is dropped as a duplicate."""
    backend = ScriptedBackendDouble()
    clock = ManualClock(100 * S)
    flow = OmniFlow(
        FlowConfig.from_mapping({"aec": {"enabled": False}}), backend, clock, list().append
    )
    stamper = ArrivalStamper()
    now = 100 * S
    for _ in range(250):  # 5 s of 20 ms chunks, arriving in real time
        now += 20_000_000
        clock.set_ns(now)
        flow.push_audio(stamper.stamp(chunk(0), now))
        flow.run_until_idle(now)
    assert len(backend.units) >= 3
    assert {len(u.audio) for u in backend.units} == {16_000}
    assert flow.counters.duplicate_samples == 0
    assert flow.counters.late_messages == 0
    backend.close()


# --------------------------------------------------------------------------------------- images
def raw(encoding: str = "rgb8", width: int = 4, height: int = 2, step: int | None = None,
        stamp_ns: int = 100 * S, data: bytes | None = None) -> RawImage:  # fmt: skip
    bpp = {"rgb8": 3, "yuv422": 2, "h264": 1}.get(encoding, 3)
    step = width * bpp if step is None else step
    return RawImage(stamp_ns, encoding, data if data is not None else bytes(step * height),
                    width, height, step)  # fmt: skip


MALFORMED_FRAMES = {
    "step shorter than a row": raw(step=5),
    "unknown encoding h264": raw(encoding="h264"),
    "yuv422 odd width": raw(encoding="yuv422", width=3),
    "truncated": raw(data=bytes(7)),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_FRAMES))
def test_check_image_refuses_what_decoding_would(case: str) -> None:
    with pytest.raises(DecodeError):
        check_image(MALFORMED_FRAMES[case])
    with pytest.raises(DecodeError):
        decode_image(MALFORMED_FRAMES[case])


def test_malformed_and_far_future_frames_are_counted_even_when_no_unit_chooses_them() -> None:
    """On main these four changed no counter: frames are decoded only when chosen."""
    backend = ScriptedBackendDouble()
    clock = ManualClock(100 * S)
    flow = OmniFlow(
        FlowConfig.from_mapping({"aec": {"enabled": False}}), backend, clock, list().append
    )
    flow.run_until_idle(100 * S)
    before = flow.counters.snapshot()
    for frame in MALFORMED_FRAMES.values():
        flow.push_image(frame)
    flow.push_image(raw(stamp_ns=100 * S + 3600 * S))  # an hour ahead
    flow.push_image(raw(stamp_ns=100 * S + 100_000_000))  # a good one
    flow.run_until_idle(100 * S)
    assert flow.counters.decode_errors - before.decode_errors == 4
    assert flow.counters.future_messages - before.future_messages == 1
    assert flow.counters.dropped_frames - before.dropped_frames == 5
    flow.close()
    backend.close()


def test_malformed_frames_are_logged_rate_limited_with_how_many_were_not(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16: decode failures were counted but never logged. One line per interval
    (``flow.log_interval_s``) with the reason; the next says how many it left out."""
    backend = ScriptedBackendDouble()
    clock = ManualClock(100 * S)
    flow = OmniFlow(
        FlowConfig.from_mapping({"aec": {"enabled": False}}), backend, clock, list().append
    )
    flow.run_until_idle(100 * S)
    with caplog.at_level(logging.WARNING, logger="omni_ros.core.flow"):
        for frame in MALFORMED_FRAMES.values():
            flow.push_image(frame)
        flow.run_until_idle(100 * S)
        later = time.monotonic_ns() + 11 * S  # past the 10 s interval
        monkeypatch.setattr(time, "monotonic_ns", lambda: later)
        flow.push_image(raw(step=5))
        flow.run_until_idle(100 * S)
    lines = [r.getMessage() for r in caplog.records if "malformed image" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "step" in lines[0]
    assert lines[1].endswith(f"({len(MALFORMED_FRAMES) - 1} more since the last report)")
    assert flow.counters.decode_errors == len(MALFORMED_FRAMES) + 1
    flow.close()
    backend.close()


def png_bomb(width: int = 6000, height: int = 6000) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def test_a_small_png_claiming_6000x6000_is_refused_from_its_header_without_decoding() -> None:
    bomb = png_bomb()
    assert len(bomb) < 200_000
    image = RawImage(S, "png", bomb, compressed=True)
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="6000x6000"):
            check_image(image)
        with pytest.raises(DecodeError, match="6000x6000"):
            decode_image(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8_000_000  # decoded it would be 108 MB


def test_a_4k_frame_is_still_accepted() -> None:
    frame = RawImage(S, "rgb8", bytes(3840 * 2160 * 3), 3840, 2160, 3840 * 3)
    check_image(frame)
    assert decode_image(frame).rgb.shape == (2160, 3840, 3)


def test_audio_frames_of_a_stamped_chunk() -> None:  # the stamper relies on it
    assert audio_frames(chunk(S, ms=20)) == 320
    assert np.isclose(inspect_wav(wav_bytes(frames=160)).duration_s, 0.01)
