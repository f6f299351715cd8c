"""Field values that exercise every field of every omni_ros_msgs message (non-default, edge-ish).

Shared by the DDS round-trip tests and the rosbags tests so both prove the same contract.
"""

from __future__ import annotations

from typing import Any

STAMP = {"sec": 1_764_000_123, "nanosec": 456_789_012}
HEADER = {"stamp": STAMP, "frame_id": "mic_array"}

SAMPLES: dict[str, dict[str, Any]] = {
    "AudioChunk": {
        "header": HEADER,
        "sample_rate": 48_000,
        "channels": 2,
        "encoding": "S16LE",
        "data": bytes(range(256)) * 3,
        "turn_id": 2**35 + 3,
    },
    "OmniText": {
        "header": HEADER,
        "turn_id": 2**40 + 7,
        "unit_index": 4_000_000_000,
        "text": "Hello, wörld — 你好",
        "end_of_turn": True,
        "proactive": True,
    },
    "ProactiveAction": {
        "header": HEADER,
        "turn_id": 99,
        "kind": "reminder",
        "text": "Time to water the plants.",
        "confidence": 0.75,
        "trigger_stamp": {"sec": 12, "nanosec": 999_999_999},
    },
    "OmniState": {
        "header": HEADER,
        "mode": 2,
        "unit_index": 17,
        "unit_compute_ms": 123.5,
        "real_time_factor": 0.125,
        "dropped_frames": 3,
        "dropped_audio_samples": 2**33,
        "late_messages": 5,
        "gap_samples_filled": 160,
        "backend": "reference",
        "turn_id": 42,
        "user_speaking": True,
        "playing": True,
        "barge_ins": 2**34 + 1,
        "error": "backend prepare failed (3x): connection refused",
        "audio_samples_in": 2**35 + 3,
        "audio_samples_used": 2**35,
        "audio_drop_causes": ["late", "stall"],
        "audio_drop_samples": [1, 2**33],
        "gap_fill_causes": ["missing"],
        "gap_fill_samples": [160],
        "prompt_errors": 1,
    },
    "SpeechFlush": {
        "header": HEADER,
        "reason": 4,
        "turn_id": 2**36 + 5,
        "dropped_from": {"sec": 1_764_000_124, "nanosec": 1},
        "dropped_until": {"sec": 1_764_000_130, "nanosec": 999_999_999},
        "onset": {"sec": 1_764_000_122, "nanosec": 7},
    },
    "Playback": {
        "header": HEADER,
        "turn_id": 77,
        "scheduled": {"sec": 1_764_000_121, "nanosec": 500_000_000},
        "sample_rate": 24_000,
        "samples": 2_399,
        "late": True,
        "cut": True,
    },
}

#: Fields of type builtin_interfaces/Time (given as {"sec", "nanosec"} above).
TIME_FIELDS = ("trigger_stamp", "dropped_from", "dropped_until", "onset", "scheduled")


def build_rclpy(type_name: str, values: dict[str, Any] | None = None) -> Any:
    """Instantiate the rclpy message ``type_name`` with :data:`SAMPLES` values."""
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    import omni_ros_msgs.msg as msgs

    values = dict(SAMPLES[type_name] if values is None else values)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key == "header":
            kwargs[key] = Header(stamp=Time(**value["stamp"]), frame_id=value["frame_id"])
        elif key in TIME_FIELDS:
            kwargs[key] = Time(**value)
        elif key == "data":
            kwargs[key] = list(value)
        else:
            kwargs[key] = value
    return getattr(msgs, type_name)(**kwargs)
