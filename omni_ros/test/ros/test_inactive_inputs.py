"""Input that arrives while omni_flow_node is not active is counted, not silently ignored.

Found by the fault suite (issue 15): mic chunks sent between configure and activate (and after
deactivate) were never counted, so 1,600-16,000 samples a scenario were sent but nowhere in
/diagnostics.
"""

from __future__ import annotations

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

pytestmark = [pytest.mark.ros, pytest.mark.timeout(120)]


def test_audio_and_frames_while_inactive_are_counted_in_diagnostics() -> None:
    from omni_ros.core.types import RawAudio, RawImage
    from omni_ros.ros.omni_flow_node import OmniFlowNode
    from rclpy.lifecycle import TransitionCallbackReturn

    context = rclpy.Context()
    rclpy.init(context=context)
    node = OmniFlowNode(context=context)
    pcm = np.zeros(320, "<i2").tobytes()  # 20 ms at 16 kHz
    image = RawImage(1, "rgb8", bytes(48), width=4, height=4, step=12)
    try:
        node._on_mic_raw(RawAudio(1, 16_000, 1, "S16LE", pcm))  # unconfigured
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        node._on_mic_raw(RawAudio(2, 16_000, 1, "S16LE", pcm))  # configured, not active
        node._push("push_image", image)
        counts = node._input_counts()
        assert counts["inactive_audio_samples"] == 640
        assert counts["inactive_images"] == 1
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        node._on_mic_raw(RawAudio(3, 16_000, 1, "S16LE", pcm))  # active: the flow takes it
        assert node._input_counts()["inactive_audio_samples"] == 640
        values = {
            kv.key: kv.value
            for kv in node._diag.report("omni_flow_node", "reference", "active", 0).status[0].values
        }
        assert values["inactive_audio_samples"] == "640"
        assert values["inactive_images"] == "1"
    finally:
        node.close()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
