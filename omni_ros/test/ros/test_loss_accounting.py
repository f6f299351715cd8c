"""Over DDS against the real omni_flow_node (issue 15): OmniState and /diagnostics say where every
microphone sample went, by cause; a prompt the backend refuses is ``success: false`` with the
reason and the previous prompt keeps producing units (on main set_prompt said success at once and
the node produced no unit until another prompt came)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("rclpy")

from flow_harness import NS_PER_S, NodeProcess, Probe, SimDriver, diag_values, running
from omni_ros.core.types import AUDIO_DROP_CAUSES

pytestmark = [pytest.mark.ros, pytest.mark.timeout(180)]

BAG_START_NS = 1000 * NS_PER_S
PARAMS = {
    "use_sim_time": True,
    "timeline.watermark_ns": 500_000_000,
    "diagnostics.period_s": 0.2,
    "backend": "speak_until_interrupted_double",
    "speak_until_interrupted_double.refuse_prompt": "unembeddable",
}
DROP_CAUSES = list(AUDIO_DROP_CAUSES)  # OmniState.audio_drop_causes names them in this order


def _latest_diag(probe: Probe) -> dict[str, str]:
    found = [v for v in (diag_values(d) for d in probe.snapshot("diag")) if v and "backend" in v]
    return found[-1] if found else {}


def test_loss_by_cause_in_omni_state_and_diagnostics_and_a_refused_prompt_keeps_the_old(
    tmp_path: Path,
) -> None:
    from omni_ros_msgs.srv import SetPrompt

    proc = NodeProcess.with_doubles(PARAMS, tmp_path / "node.log")
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS, frame_every=0)
        driver.start(proc)
        driver.run_until(lambda: probe.count("state") >= 3, 60, "three units", proc)
        response = probe.call(
            probe.set_prompt, SetPrompt.Request(system_prompt="unembeddable"), proc
        )
        assert not response.success, response.message
        assert "cannot embed" in response.message
        assert "previous prompt kept" in response.message
        count = probe.count("state")
        driver.run_until(
            lambda: sum(s.unit_index >= 1 for s in probe.snapshot("state")[count:]) >= 2,
            60,
            "units with the previous prompt",
            proc,
        )
        state = probe.snapshot("state")[-1]
        assert state.prompt_errors == 1
        assert list(state.audio_drop_causes) == DROP_CAUSES
        assert list(state.gap_fill_causes) == ["missing", "late", "stall"]
        assert sum(state.audio_drop_samples) == state.dropped_audio_samples
        assert sum(state.gap_fill_samples) == state.gap_samples_filled
        assert state.audio_samples_used > 0
        assert state.audio_samples_in >= state.audio_samples_used + state.dropped_audio_samples
        driver.run_until(
            lambda: _latest_diag(probe).get("prompt_errors") == "1", 30, "diagnostics", proc
        )
        values = _latest_diag(probe)
        for cause in DROP_CAUSES:
            assert f"audio_dropped_{cause}" in values
        for key in ("audio_samples_in", "audio_samples_used", "gap_filled_stall"):
            assert int(values[key]) >= 0
        # A prompt the backend takes still works after the refused one.
        response = probe.call(probe.set_prompt, SetPrompt.Request(system_prompt="Be brief."), proc)
        assert response.success, response.message
        assert "Traceback" not in proc.log()
