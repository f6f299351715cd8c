"""The camera path reads serialized Image / CompressedImage bytes (ros/_camera.py).

Checked against rclpy's own serializer (``rclpy.serialization.serialize_message``, the CDR the
middleware puts on the wire): every field comes out as ``conversions.image_to_raw`` gives it from
the deserialized message, and an oversize frame is refused from its header without its pixels
being copied (tracemalloc; deterministic).
"""

from __future__ import annotations

import array
import tracemalloc

import pytest

pytest.importorskip("rclpy")

from omni_ros.core.errors import DecodeError
from omni_ros.ros import conversions as conv
from omni_ros.ros._camera import compressed_from_cdr, image_from_cdr
from rclpy.serialization import serialize_message
from sensor_msgs.msg import CompressedImage, Image


def _image(width: int, height: int, encoding: str, frame_id: str, pad: int = 0) -> Image:
    msg = Image(width=width, height=height, encoding=encoding, is_bigendian=False)
    bpp = {"rgb8": 3, "mono8": 1, "mono16": 2, "yuv422": 2}[encoding]
    msg.step = width * bpp + pad
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1_700_000_123, 456_789
    msg.header.frame_id = frame_id
    msg.data = array.array("B", bytes((i * 7) % 251 for i in range(msg.step * height)))
    return msg


@pytest.mark.parametrize("frame_id", ["", "c", "cam", "camera_optical_frame"])
@pytest.mark.parametrize(
    ("width", "height", "encoding", "pad"),
    [(3, 2, "rgb8", 0), (5, 3, "mono8", 3), (4, 4, "mono16", 0), (6, 2, "yuv422", 1)],
)
def test_a_serialized_image_reads_back_as_the_deserialized_one(
    frame_id: str, width: int, height: int, encoding: str, pad: int
) -> None:
    msg = _image(width, height, encoding, frame_id, pad)
    frame = image_from_cdr(serialize_message(msg))
    assert frame.refused == ""
    assert frame.image == conv.image_to_raw(msg)


@pytest.mark.parametrize("fmt", ["", "jpeg", "png", "rgb8; jpeg compressed bgr8"])
def test_a_serialized_compressed_image_reads_back_as_the_deserialized_one(fmt: str) -> None:
    msg = CompressedImage(format=fmt)
    msg.header.stamp.sec, msg.header.stamp.nanosec = 12, 34
    msg.header.frame_id = "cam"
    msg.data = array.array("B", b"\xff\xd8\xff\xe0 not really a jpeg")
    frame = compressed_from_cdr(serialize_message(msg))
    assert frame.refused == ""
    assert frame.image == conv.compressed_to_raw(msg)


def test_a_64_mb_image_is_refused_from_its_header_without_copying_its_pixels() -> None:
    side = 4624  # 4624 x 4624 rgb8 = 64.1 MB, 21 MP (the limit is 3840 x 2160 = 8.3 MP)
    msg = Image(width=side, height=side, encoding="rgb8", step=side * 3)
    msg.data = array.array("B", bytes(side * side * 3))
    buf = serialize_message(msg)
    tracemalloc.start()
    try:
        frame = image_from_cdr(buf)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "exceeds max_pixels" in frame.refused
    assert frame.image.data == b""
    assert (frame.image.width, frame.image.height) == (side, side)
    assert peak < 1_000_000  # the pixels (64 MB) were neither copied nor deserialized


def test_an_oversize_compressed_payload_is_refused_from_its_length() -> None:
    msg = CompressedImage(format="jpeg")
    msg.data = array.array("B", bytes(1000))
    frame = compressed_from_cdr(serialize_message(msg), max_bytes=999)
    assert "exceeds 999 bytes" in frame.refused
    assert frame.image.data == b""


@pytest.mark.parametrize("cut", [0, 3, 10, 30, 60])
def test_truncated_or_foreign_bytes_are_a_decode_error(cut: int) -> None:
    buf = serialize_message(_image(3, 2, "rgb8", "cam"))
    with pytest.raises(DecodeError):
        image_from_cdr(buf[:cut])
    with pytest.raises(DecodeError):
        image_from_cdr(b"\x12\x34" + buf[2:])
