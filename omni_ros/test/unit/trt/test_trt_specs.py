from __future__ import annotations

import pytest
from omni_ros.core.errors import ConfigError
from omni_ros.tensorrt.specs import (
    ComponentSpec,
    ProfileShape,
    TensorSpec,
    audio_spec,
    parse_components,
    profile_from_json,
    vision_spec,
)


def test_profile_rejects_min_above_max():
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        ProfileShape("x", (1, 4), (1, 2), (1, 8))


def test_spec_rejects_a_profile_that_varies_a_static_axis():
    with pytest.raises(ConfigError, match="static axis"):
        ComponentSpec(
            "audio",
            (TensorSpec("mel", "float32", (1, 80, "frames")),),
            (TensorSpec("out", "float32", (1, "t", 8)),),
            (ProfileShape("mel", (1, 80, 10), (1, 80, 20), (2, 80, 30)),),
        )


def test_spec_rejects_a_dynamic_input_without_profile():
    with pytest.raises(ConfigError, match="without a profile"):
        ComponentSpec("audio", (TensorSpec("mel", "float32", (1, 80, "frames")),), (), ())


def test_vision_spec_batches_slices_up_to_max_slices():
    spec = vision_spec(4096, max_slices=10)
    assert spec.dynamic_axes() == {"pixel_values": {0: "slices"}, "vision_tokens": {0: "slices"}}
    assert spec.profile_shapes("max") == {"pixel_values": (10, 3, 448, 448)}


def test_profile_json_round_trips():
    spec = audio_spec(64)
    assert profile_from_json(spec.profile_json()) == spec.profile


def test_parse_components_keeps_order_and_rejects_unknown_names():
    assert parse_components("audio, vision,audio") == ("audio", "vision")
    with pytest.raises(ConfigError, match="unknown component"):
        parse_components("vision,llm")
