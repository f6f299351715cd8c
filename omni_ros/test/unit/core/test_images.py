"""Tests for image decoding and the backend resize (omni_ros.core.images)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from omni_ros.core.errors import ConfigError, DecodeError
from omni_ros.core.images import decode_image, resize_for_backend
from omni_ros.core.types import RawImage
from PIL import Image

RNG = np.random.default_rng(42)


def random_rgb(height: int = 6, width: int = 8) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def raw_image(
    pixels: np.ndarray, encoding: str, padding: int = 0, bigendian: bool = False
) -> RawImage:
    """Pack (H, W, C) or (H, W) pixels into rows, each followed by ``padding`` junk bytes.

    YUV 4:2:2 input is (H, W/2, 4) macropixels: the image is twice as wide.
    """
    height, width = pixels.shape[:2]
    if encoding in ("yuv422", "uyvy", "yuyv", "yuv422_yuy2"):
        width *= 2
    rows = (
        pixels.reshape(height, -1).view(np.uint8)
        if pixels.dtype != np.uint8
        else pixels.reshape(height, -1)
    )
    junk = np.full((height, padding), 0xAB, np.uint8)
    data = np.concatenate([rows, junk], axis=1).tobytes()
    return RawImage(
        stamp_ns=7,
        encoding=encoding,
        data=data,
        width=width,
        height=height,
        step=rows.shape[1] + padding,
        is_bigendian=bigendian,
    )


def compressed(image: np.ndarray, fmt: str, encoding: str | None = None) -> RawImage:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return RawImage(7, encoding or fmt.lower(), buffer.getvalue(), compressed=True)


# ------------------------------------------------------------------------ raw encodings
@pytest.mark.parametrize("padding", [0, 5])
def test_rgb8_decodes_to_the_same_pixels_with_or_without_row_padding(padding: int) -> None:
    rgb = random_rgb()
    frame = decode_image(raw_image(rgb, "rgb8", padding))
    np.testing.assert_array_equal(frame.rgb, rgb)
    assert frame.stamp_ns == 7
    assert frame.rgb.dtype == np.uint8


@pytest.mark.parametrize("padding", [0, 3])
def test_bgr8_channels_are_swapped_to_rgb(padding: int) -> None:
    rgb = random_rgb()
    bgr = np.ascontiguousarray(rgb[..., [2, 1, 0]])
    np.testing.assert_array_equal(decode_image(raw_image(bgr, "bgr8", padding)).rgb, rgb)


def test_rgba8_and_bgra8_drop_alpha() -> None:
    rgb = random_rgb()
    alpha = np.full((*rgb.shape[:2], 1), 200, np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    bgra = np.concatenate([rgb[..., [2, 1, 0]], alpha], axis=2)
    np.testing.assert_array_equal(decode_image(raw_image(rgba, "rgba8", 4)).rgb, rgb)
    np.testing.assert_array_equal(decode_image(raw_image(bgra, "bgra8")).rgb, rgb)


def test_mono8_is_replicated_to_three_channels() -> None:
    gray = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
    rgb = decode_image(raw_image(gray, "mono8", 1)).rgb
    assert rgb.shape == (5, 7, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], gray)


@pytest.mark.parametrize("bigendian", [False, True])
def test_mono16_keeps_the_high_byte_in_either_byte_order(bigendian: bool) -> None:
    values = np.array([[0, 255, 256, 65535], [4660, 32768, 1000, 12345]], np.uint16)
    stored = values.astype(">u2" if bigendian else "<u2")
    rgb = decode_image(raw_image(stored, "mono16", 2, bigendian=bigendian)).rgb
    np.testing.assert_array_equal(rgb[..., 0], values >> 8)


def test_mono16_minmax_stretches_a_narrow_range_to_full_scale() -> None:
    values = np.array([[100, 200], [150, 300]], "<u2")
    rgb = decode_image(raw_image(values, "mono16"), mono16_mode="minmax").rgb
    np.testing.assert_array_equal(rgb[..., 0], [[0, 128], [64, 255]])  # (v - 100) * 255 / 200


def pack_yuv422(y: np.ndarray, u: np.ndarray, v: np.ndarray, order: str) -> np.ndarray:
    """(H, W) luma and (H, W/2) chroma -> (H, W/2, 4) macropixels in the given byte order."""
    y0, y1 = y[:, 0::2], y[:, 1::2]
    parts = (y0, u, y1, v) if order == "yuyv" else (u, y0, v, y1)
    return np.stack(parts, axis=2).astype(np.uint8)


def pillow_ycbcr_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    """Full-range BT.601 reference: Pillow's own YCbCr -> RGB conversion (4:4:4 planes)."""
    planes = [Image.fromarray(np.ascontiguousarray(p.astype(np.uint8)), "L") for p in (y, cb, cr)]
    return np.asarray(Image.merge("YCbCr", planes).convert("RGB"))


@pytest.mark.parametrize(
    ("encoding", "order"),
    [("yuv422", "uyvy"), ("uyvy", "uyvy"), ("yuv422_yuy2", "yuyv"), ("yuyv", "yuyv")],
)
def test_full_range_yuv422_matches_pillows_ycbcr_conversion(encoding: str, order: str) -> None:
    y = RNG.integers(0, 256, (6, 8), dtype=np.uint8)
    u = RNG.integers(0, 256, (6, 4), dtype=np.uint8)
    v = RNG.integers(0, 256, (6, 4), dtype=np.uint8)
    packed = pack_yuv422(y, u, v, order)
    frame = decode_image(raw_image(packed, encoding, 2), yuv_range="full")
    reference = pillow_ycbcr_to_rgb(y, np.repeat(u, 2, axis=1), np.repeat(v, 2, axis=1))
    assert np.abs(frame.rgb.astype(int) - reference.astype(int)).max() <= 1


def test_limited_range_yuyv_maps_studio_black_and_white_to_0_and_255() -> None:
    y = np.array([[16, 235, 126, 16]], np.uint8)
    u = np.full((1, 2), 128, np.uint8)
    v = np.full((1, 2), 128, np.uint8)
    rgb = decode_image(raw_image(pack_yuv422(y, u, v, "yuyv"), "yuyv")).rgb
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 255, 128, 0])
    assert (rgb[0] == rgb[0, :, :1]).all()  # grey stays grey


def test_limited_range_colours_match_pillow_after_range_expansion() -> None:
    y = RNG.integers(16, 236, (4, 6)).astype(np.uint8)
    u = RNG.integers(16, 241, (4, 3)).astype(np.uint8)
    v = RNG.integers(16, 241, (4, 3)).astype(np.uint8)
    rgb = decode_image(raw_image(pack_yuv422(y, u, v, "uyvy"), "yuv422")).rgb
    y_full = np.clip(np.rint((y.astype(float) - 16) * 255 / 219), 0, 255)
    chroma = [
        np.clip(np.rint((np.repeat(c, 2, axis=1).astype(float) - 128) * 255 / 224 + 128), 0, 255)
        for c in (u, v)
    ]
    reference = pillow_ycbcr_to_rgb(y_full, *chroma)
    assert np.abs(rgb.astype(int) - reference.astype(int)).max() <= 2


# ------------------------------------------------------------------------ compressed
def test_png_bytes_decode_losslessly() -> None:
    rgb = random_rgb(20, 30)
    np.testing.assert_array_equal(decode_image(compressed(rgb, "PNG")).rgb, rgb)


def test_jpeg_bytes_with_a_ros_format_string_decode_close_to_the_original() -> None:
    x = np.linspace(0, 255, 64)
    smooth = np.stack(np.broadcast_arrays(x[None, :], x[:, None], 128.0 + 0 * x[None, :]), axis=2)
    smooth = smooth.astype(np.uint8)
    frame = decode_image(compressed(smooth, "JPEG", "bgr8; jpeg compressed bgr8"))
    assert frame.rgb.shape == (64, 64, 3)
    assert np.abs(frame.rgb.astype(int) - smooth.astype(int)).mean() < 3


def test_grayscale_and_rgba_pngs_are_converted_to_rgb() -> None:
    gray = RNG.integers(0, 256, (5, 5), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray, "L").save(buffer, format="PNG")
    rgb = decode_image(RawImage(1, "png", buffer.getvalue(), compressed=True)).rgb
    np.testing.assert_array_equal(rgb[..., 1], gray)


@pytest.mark.parametrize(
    "data",
    [b"not an image at all", b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20],
)
def test_corrupt_compressed_bytes_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_image(RawImage(1, "png", data, compressed=True))


def test_a_truncated_jpeg_raises_decode_error() -> None:
    good = compressed(random_rgb(64, 64), "JPEG")
    with pytest.raises(DecodeError):
        decode_image(RawImage(1, "jpeg", good.data[: len(good.data) // 2], compressed=True))


def test_compressed_formats_other_than_jpeg_and_png_are_rejected() -> None:
    with pytest.raises(DecodeError, match="not JPEG or PNG"):
        decode_image(compressed(random_rgb(), "BMP", "bmp"))
    with pytest.raises(DecodeError, match="depth"):
        decode_image(compressed(random_rgb(), "PNG", "16UC1; compressedDepth png"))


def test_a_compressed_image_beyond_max_pixels_is_rejected_before_decoding() -> None:
    with pytest.raises(DecodeError, match="max_pixels"):
        decode_image(compressed(random_rgb(100, 100), "PNG"), max_pixels=9_999)


# ------------------------------------------------------------------------ bad raw input
@pytest.mark.parametrize(
    ("image", "message"),
    [
        (RawImage(1, "rgb16", b"\x00" * 12, 2, 1, 12), "unknown image encoding"),
        (RawImage(1, "rgb8", b"", 0, 0, 0), "zero size"),
        (RawImage(1, "rgb8", b"\x00" * 12, 2, 2, 5), "step"),
        (RawImage(1, "rgb8", b"\x00" * 11, 2, 2, 6), "truncated"),
        (RawImage(1, "mono16", b"\x00" * 7, 2, 2, 4), "truncated"),
        (RawImage(1, "yuyv", b"\x00" * 6, 3, 1, 6), "even width"),
        (RawImage(1, "rgb8", b"", 100_000, 100_000, 300_000), "max_pixels"),
    ],
)
def test_bad_raw_images_raise_specific_decode_errors(image: RawImage, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_image(image)


def test_decoder_options_with_unknown_values_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        decode_image(raw_image(np.zeros((2, 2), "<u2"), "mono16"), mono16_mode="log")
    with pytest.raises(ConfigError):
        decode_image(raw_image(np.zeros((2, 2, 4), np.uint8), "yuyv"), yuv_range="tv")


# ------------------------------------------------------------------------------- resize
def test_letterbox_keeps_the_whole_image_and_pads_with_black() -> None:
    white = np.full((720, 1280, 3), 255, np.uint8)
    out = resize_for_backend(white, 448, "letterbox")
    assert out.shape == (448, 448, 3)
    # 1280x720 -> 448x252, centred: 98 black rows above and below.
    assert (out[:98] == 0).all()
    assert (out[-98:] == 0).all()
    assert (out[98:-98] == 255).all()


def test_center_crop_keeps_the_middle_square() -> None:
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, :100] = (255, 0, 0)  # left third red
    image[:, 100:200] = (0, 255, 0)  # middle green
    image[:, 200:] = (0, 0, 255)  # right blue
    out = resize_for_backend(image, 50, "center_crop")
    assert out.shape == (50, 50, 3)
    assert (out[..., 1] == 255).all()


def test_stretch_fills_the_square_with_the_whole_image() -> None:
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, :150] = 255
    out = resize_for_backend(image, 64, "stretch")
    assert out.shape == (64, 64, 3)
    assert (out[:, :30] == 255).all()
    assert (out[:, 34:] == 0).all()


def test_resize_rejects_bad_policies_sizes_and_arrays() -> None:
    with pytest.raises(ConfigError):
        resize_for_backend(random_rgb(), 448, "zoom")
    with pytest.raises(ConfigError):
        resize_for_backend(random_rgb(), 0)
    with pytest.raises(DecodeError):
        resize_for_backend(np.zeros((4, 4), np.uint8), 448)


@pytest.mark.parametrize(("height", "width"), [(720, 1280), (480, 640), (1080, 1920), (100, 50)])
def test_box_filter_stays_close_to_bilinear_on_a_smooth_image(height: int, width: int) -> None:
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack(
        [xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], axis=2
    ).astype(np.uint8)
    fast = resize_for_backend(smooth, 448, "letterbox", filter_name="box")
    sharp = resize_for_backend(smooth, 448, "letterbox", filter_name="bilinear")
    assert fast.shape == sharp.shape == (448, 448, 3)
    assert np.abs(fast.astype(int) - sharp.astype(int)).mean() < 2.0


def test_box_filter_averages_away_a_pixel_checkerboard_instead_of_aliasing() -> None:
    checker = (np.indices((720, 1280)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = resize_for_backend(np.repeat(checker[..., None], 3, axis=2), 448, "stretch")
    # A proper low-pass turns the finest pattern into mid grey; nearest sampling would not.
    assert np.abs(out.astype(int) - 127).max() <= 30


def test_unknown_resize_filter_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        resize_for_backend(random_rgb(), 448, filter_name="lanczos")
