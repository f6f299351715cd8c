"""Kept camera frames are bounded by what the frame policy can choose (issue 16: 1080p60).

With ``frame_policy: last`` a unit's older frames can never be chosen once a newer one is sure
to decode, so the timeline forgets them on arrival: at 60 fps the kept frames are one per open
unit, not every frame of ``unit + watermark`` (on main: ~90 frames of 6.2 MB at 1080p, the
measured 0.53 -> 1.08 GB). The choice itself is unchanged.
"""

from __future__ import annotations

import numpy as np
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.timeline import Timeline, TimelineConfig
from omni_ros.core.types import Counters, RawImage, VideoFrame

MS = 1_000_000
ORIGIN_NS = 50 * NS_PER_S
W, H = 16, 9  # small frames: the bound is in frames, the bytes follow from the frame size


def raw(stamp_ns: int, value: int) -> RawImage:
    return RawImage(stamp_ns, "rgb8", bytes([value % 256]) * (W * H * 3), W, H, W * 3)


def timeline(**overrides: object) -> Timeline:
    cfg = {"first_unit_ns": NS_PER_S, "unit_ns": NS_PER_S, "watermark_ns": 500 * MS, **overrides}
    tl = Timeline(TimelineConfig.from_mapping(cfg), Counters())
    tl.start(ORIGIN_NS)
    return tl


def test_at_60_fps_policy_last_keeps_one_frame_per_open_unit_and_chooses_the_same() -> None:
    tl = timeline()
    kept: list[int] = []
    for k in range(150):  # 2.5 s of 60 fps, no poll: three units open
        tl.push_frame(raw(ORIGIN_NS + k * NS_PER_S // 60, k))
        kept.append(tl.buffered_frames)
    assert max(kept) <= 3  # one per open unit (on main: 121, every frame not in the future)
    units = tl.poll(ORIGIN_NS + 2 * NS_PER_S + 500 * MS)
    # The newest frame of each unit, as before: 59 (t = 0.983 s) and 119 (t = 1.983 s).
    assert [int(u.frames[0].rgb[0, 0, 0]) for u in units] == [59, 119]


def test_out_of_order_frames_keep_the_newest_and_a_frame_that_may_fail_keeps_its_fallback() -> None:
    tl = timeline()
    tl.push_frame(raw(ORIGIN_NS + 500 * MS, 5))
    tl.push_frame(raw(ORIGIN_NS + 300 * MS, 3))  # older, arrives later: can never be chosen
    assert tl.buffered_frames == 1
    # A newer frame whose data is short (fails on decode) does not make the older one go.
    tl.push_frame(RawImage(ORIGIN_NS + 900 * MS, "rgb8", b"\x00" * 5, W, H, W * 3))
    jpeg = RawImage(ORIGIN_NS + 950 * MS, "jpeg", b"\xff\xd8 corrupt", compressed=True)
    tl.push_frame(jpeg)  # compressed: only decoding tells, so it keeps the fallbacks too
    assert tl.buffered_frames == 3
    (unit,) = tl.poll(ORIGIN_NS + NS_PER_S + 500 * MS)
    assert int(unit.frames[0].rgb[0, 0, 0]) == 5
    assert tl.counters.decode_errors == 2


def test_decoded_frames_count_as_certain_and_other_policies_keep_every_frame() -> None:
    tl = timeline()
    for k in range(10):
        tl.push_frame(VideoFrame(ORIGIN_NS + k * 50 * MS, np.full((H, W, 3), k, np.uint8)))
    assert tl.buffered_frames == 1
    for policy in ("nearest_end", "up_to_n"):
        other = timeline(frame_policy=policy, max_frames_per_unit=3)
        for k in range(10):
            other.push_frame(raw(ORIGIN_NS + k * 50 * MS, k))
        assert other.buffered_frames == 10
