"""The real omni_flow_node in its own process, driven over real DDS.

Every test starts the node (the installed executable, or the test runner that registers scripted
backend doubles and then calls the same ``main()``), plays a bag-like stream under sim time
(``/clock`` from 1000 s, far from wall time), and checks what comes back. Children are always
stopped; every wait has a timeout.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from omni_ros.core.clock import NS_PER_S

pytest.importorskip("rclpy")

import itertools

from flow_harness import (
    NodeProcess,
    Probe,
    SimDriver,
    diag_values,
    image,
    lifecycle_transition,
    mic_chunk,
    running,
    to_ns,
    wait_for,
)

pytestmark = [pytest.mark.ros, pytest.mark.timeout(120)]

BAG_START_NS = 1000 * NS_PER_S
UNIT_NS = NS_PER_S
#: Generous late-arrival slack: messages cross processes on a loaded 2-core machine.
SIM = {"use_sim_time": True, "timeline.watermark_ns": 500_000_000}


def _modes(probe: Probe) -> list[int]:
    return [m.mode for m in probe.snapshot("state")]


# ------------------------------------------------------------------------------- (a) + (e): reference
@pytest.fixture(scope="module")
def reference_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Probe, NodeProcess, SimDriver]]:
    log = tmp_path_factory.mktemp("reference") / "node.log"
    params = {
        **SIM,
        "backend": "reference",
        "reference.size": "tiny",
        "reference.num_threads": 1,
        "reference.speak_schedule": "LSSE",  # forced, so text and speech surely come out
        "tensorrt.enabled": True,  # no TensorRT here: every component must report its fallback
    }
    proc = NodeProcess.installed(params, log)
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS)
        driver.start(proc)
        wait_for(probe.reset.service_is_ready, 60, "the node to configure (model build)", proc)
        driver.run_until(
            lambda: probe.count("state") >= 8 and probe.count("speech") > 0, 60, "8 units", proc
        )
        yield probe, proc, driver


def test_reference_backend_publishes_omni_state_for_every_unit(reference_run) -> None:
    probe, proc, _ = reference_run
    states = probe.snapshot("state")
    indices = [s.unit_index for s in states]
    assert indices == list(range(indices[0], indices[0] + len(indices))), indices
    assert {s.backend for s in states} == {"reference"}
    assert all(s.real_time_factor >= 0 for s in states)
    assert proc.poll() is None


def test_outputs_are_stamped_on_the_bag_time_axis_under_sim_time(reference_run) -> None:
    probe, _, driver = reference_run
    lo, hi = BAG_START_NS, driver.now_ns + 3 * UNIT_NS  # speech is scheduled after its unit
    states, texts, speech = (
        probe.snapshot("state"),
        probe.snapshot("text"),
        probe.snapshot("speech"),
    )
    assert texts, "the forced speak schedule must produce text"
    assert speech, "the forced speak schedule must produce speech"
    for msg in (*states, *texts, *speech):
        assert lo <= to_ns(msg.header.stamp) <= hi, (type(msg).__name__, to_ns(msg.header.stamp))
    # Unit boundaries follow the bag: every state stamp is the origin plus whole units.
    stamps = [to_ns(s.header.stamp) for s in states]
    assert all((b - a) == UNIT_NS for a, b in itertools.pairwise(stamps))
    # Speech chunks: 24 kHz S16LE, 100 ms each except a turn's last, never overlapping.
    assert {(c.sample_rate, c.channels, c.encoding) for c in speech} == {(24_000, 1, "S16LE")}
    starts = sorted(to_ns(c.header.stamp) for c in speech)
    assert starts == [to_ns(c.header.stamp) for c in speech]  # published in play order
    for chunk, nxt in itertools.pairwise(speech):
        end = to_ns(chunk.header.stamp) + len(chunk.data) // 2 * NS_PER_S // 24_000
        assert end <= to_ns(nxt.header.stamp) + 1


def test_diagnostics_report_backend_latency_and_every_counter(reference_run) -> None:
    probe, proc, driver = reference_run
    driver.run_until(lambda: any("backend" in (diag_values(d) or {}) for d in probe.snapshot("diag")), 20, "diagnostics", proc)  # fmt: skip
    values = [v for v in (diag_values(d) for d in probe.snapshot("diag")) if v and "backend" in v][
        -1
    ]
    assert values["backend"] == "reference"
    assert values["lifecycle"] == "active"
    for key in (
        "real_time_factor",
        "unit_compute_ms",
        "latency_ms",
        "dropped_frames",
        "decode_errors",
        "clock_jumps",
    ):
        assert key in values
    # The speech schedule's learned terms: unit end + p95 lag + margin (output_latency_ms 50 +
    # the speaker's device latency; no speaker_node here, so nothing learned).
    assert float(values["schedule.lag_p95_ms"]) > 0
    assert float(values["schedule.device_latency_ms"]) == 0
    assert float(values["schedule.margin_ms"]) == 50
    # The echo canceller's state (OmniFlow.echo_status): a bag without our echo in it.
    assert values["echo.converged"] in ("true", "false")
    for key in ("echo.delay_estimates", "echo.filter_resets", "echo.spectral_near_frames"):
        assert int(values[key]) >= 0, key
    assert float(values["echo.delay_ms"]) >= 0
    components = {}
    for status in probe.snapshot("diag")[-1].status:
        if ": tensorrt " in status.name:
            components[status.name.rsplit(" ", 1)[-1]] = {kv.key: kv.value for kv in status.values}
    assert set(components) == {"vision", "audio", "vocoder"}
    assert all(c["reason"] for c in components.values())  # each says why
    if importlib.util.find_spec("tensorrt") is None:
        assert {c["using"] for c in components.values()} == {"torch"}
        assert all("TensorRT is not installed" in c["reason"] for c in components.values())


def test_ask_action_streams_the_next_turn_as_feedback_and_returns_it(reference_run) -> None:
    from omni_ros_msgs.action import Ask

    probe, proc, driver = reference_run
    wait_for(probe.ask.server_is_ready, 15, "the omni/ask action server", proc)
    turn_before = max((t.turn_id for t in probe.snapshot("text")), default=0)
    feedback: list[str] = []
    goal = probe.ask.send_goal_async(
        Ask.Goal(text="What do you see?", timeout_s=60.0),
        feedback_callback=lambda fb: feedback.append(fb.feedback.partial_text),
    )
    driver.run_until(goal.done, 20, "the goal to be accepted", proc)
    handle = goal.result()
    assert handle.accepted
    result = handle.get_result_async()
    driver.run_until(result.done, 40, "the reply turn to end", proc)
    reply = result.result().result
    turns: dict[int, str] = {}
    for text in probe.snapshot("text"):
        turns[text.turn_id] = turns.get(text.turn_id, "") + text.text
    # The reply is one whole turn that started after the goal was sent (the first new one, or
    # the second if a turn began between our snapshot and the node opening the goal).
    assert reply.reply
    assert reply.reply in {turns.get(turn_before + 1), turns.get(turn_before + 2)}, (
        reply.reply,
        turns,
    )
    assert reply.spoken  # the reference backend speaks every unit it has text in
    assert feedback
    assert all(reply.reply.startswith(partial) for partial in feedback)


# ---------------------------------------------------------------------------------- (b) interrupt
def test_interrupt_service_stops_speech_within_one_unit(tmp_path: Path) -> None:
    params = {**SIM, "backend": "speak_until_interrupted_double"}
    # Like every test here, the node runs in a namespace (see NodeProcess): every relative topic
    # and service follows it, and /clock and /diagnostics are remapped.
    proc = NodeProcess.with_doubles(params, tmp_path / "node.log")
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS)
        driver.start(proc)
        driver.run_until(lambda: probe.count("speech") >= 25, 40, "two units of speech", proc)
        assert 1 in _modes(probe)  # SPEAKING
        # The clock stands still at T while the service is called: T is the interrupt's stamp.
        interrupt_ns = driver.now_ns
        response = probe.call(probe.interrupt, _trigger(), proc)
        assert response.success, response.message
        states_before = probe.count("state")
        driver.run_until(
            lambda: probe.count("state") >= states_before + 3, 30, "three more units", proc
        )
        late = [
            to_ns(c.header.stamp)
            for c in probe.snapshot("speech")
            if to_ns(c.header.stamp) >= interrupt_ns + UNIT_NS
        ]
        assert late == [], (
            f"speech stamped more than one unit after the interrupt at {interrupt_ns}"
        )
        after = [s.mode for s in probe.snapshot("state")[states_before:]]
        assert after
        assert set(after) <= {0, 2}, after  # LISTENING / INTERRUPTED only
        assert 2 in _modes(probe) or after[-1] == 0


def _trigger():
    from std_srvs.srv import Trigger

    return Trigger.Request()


# ---------------------------------------------------------------------- (c) served while computing
def test_services_and_subscriptions_are_served_while_a_unit_is_still_computing(
    tmp_path: Path,
) -> None:
    from omni_ros_msgs.srv import SetPrompt

    control, spy = tmp_path / "control", tmp_path / "spy"
    control.mkdir()
    spy.mkdir()
    params = {
        **SIM,
        "backend": "blocking_double",
        "blocking_double.control_dir": str(control),
        "blocking_double.block_unit": 2,
        "flow.backend_deadline_ms": 120_000,  # the block must not count as a hang
        "prompt.answer_timeout_s": 1.0,
    }
    proc = NodeProcess.with_doubles(
        params, tmp_path / "node.log", env={"OMNI_TEST_SPY_DIR": str(spy)}
    )
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS)
        driver.start(proc)
        driver.run_until(lambda: (control / "blocked").exists(), 30, "the backend to block", proc)
        # From here on the backend cannot return: only the test creates `release`.
        states_while_blocked = probe.count("state")
        reset = probe.call(probe.reset, _trigger(), proc)
        prompt = probe.call(probe.set_prompt, SetPrompt.Request(system_prompt="Be brief."), proc)
        marker_ns = driver.now_ns + 7  # a stamp no other chunk has
        probe.mic_pub.publish(mic_chunk(marker_ns, 100_000_000))
        wait_for(
            (spy / f"audio_{marker_ns}").exists,
            15,
            "the mic callback to hand the chunk to OmniFlow",
            proc,
        )
        assert not (control / "released").exists()  # all of the above happened while blocked
        assert reset.success, reset.message
        # set_prompt answers once the backend prepared the prompt (prepare, then swap); a
        # backend stuck in a call cannot, so after prompt.answer_timeout_s the request is
        # withdrawn and refused, saying why: still an answer while the unit computes.
        assert not prompt.success
        assert "busy" in prompt.message, prompt.message
        assert probe.count("state") == states_while_blocked
        (control / "release").touch()
        wait_for((control / "released").exists, 15, "the backend to return", proc)
        driver.run_until(
            lambda: probe.count("state") > states_while_blocked, 30, "units after the release", proc
        )
        assert proc.poll() is None


# -------------------------------------------------------------------------------- (d) bad input
def test_bad_input_is_counted_in_state_and_diagnostics_and_the_node_keeps_running(
    tmp_path: Path,
) -> None:
    # A 2 s watermark: counters here must only move for the bad input, not because a loaded
    # machine delayed a good chunk past its unit's close.
    params = {
        **SIM,
        "backend": "speak_until_interrupted_double",
        "diagnostics.period_s": 0.2,
        "timeline.watermark_ns": 2_000_000_000,
    }
    proc = NodeProcess.with_doubles(params, tmp_path / "node.log")
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS, frame_every=0, watermark_ns=2_000_000_000)
        driver.start(proc)
        driver.run_until(lambda: probe.count("state") >= 2, 30, "two units", proc)
        base = probe.snapshot("state")[-1]
        t = driver.now_ns
        # Malformed images: step too small, truncated data, unknown encoding. Each is alone in its
        # unit, so the frame policy picks it and decoding fails.
        probe.cam_pub.publish(image(t + 100_000_000, step=10))
        driver.step(10, proc)
        probe.cam_pub.publish(image(driver.now_ns, data=b"\x00" * 100))
        driver.step(10, proc)
        probe.cam_pub.publish(image(driver.now_ns, encoding="weird16"))
        driver.step(10, proc)
        # Microphone: unknown encoding (its span becomes a gap), 48 kHz stereo (must just work),
        # out of order within the watermark, and a chunk for a unit that closed long ago.
        driver.send_mic = False
        t = driver.now_ns
        chunks = [mic_chunk(t, 100_000_000, encoding="MP3")]
        chunks += [
            mic_chunk(t + (i + 1) * 100_000_000, 100_000_000, rate=48_000, channels=2, seed=i)
            for i in range(10)
        ]
        chunks.append(mic_chunk(t + 1_200_000_000, 100_000_000))
        chunks.append(mic_chunk(t + 1_100_000_000, 100_000_000))
        chunks.append(mic_chunk(BAG_START_NS + 100_000_000, 100_000_000))  # long closed
        for chunk in chunks:  # paced like a device: sensor-data QoS keeps only the last 5
            probe.mic_pub.publish(chunk)
            time.sleep(driver.pace_s)
        driver.send_mic = True
        driver.now_ns = t + 1_300_000_000
        # Wait for the unit after the bad stretch, then read the counters before the jump (after
        # it, which of /clock and the mic arrives first is up to DDS: that part is racy by nature).
        driver.run_until(
            lambda: to_ns(probe.snapshot("state")[-1].header.stamp) >= t + 2_400_000_000,
            30,
            "the units after the bad stretch",
            proc,
        )
        pre_jump = probe.snapshot("state")[-1]
        assert pre_jump.late_messages > base.late_messages  # the chunk for a long-closed unit
        assert pre_jump.dropped_audio_samples >= base.dropped_audio_samples + 1600
        # The undecodable MP3 chunk's 0.1 s (1600 samples) becomes a gap (plus resampler edges
        # where the rate changes); the 48 kHz stereo second must NOT (that would be 16000 more).
        assert 1600 <= pre_jump.gap_samples_filled - base.gap_samples_filled <= 4000
        # A looping bag: the clock jumps back to the start.
        driver.now_ns = BAG_START_NS
        driver.step(1, proc)
        jumps_seen = lambda: any(  # noqa: E731
            (v := diag_values(d)) and int(v.get("clock_jumps", "0") or 0) >= 1
            for d in probe.snapshot("diag")
        )
        driver.run_until(jumps_seen, 30, "the clock jump in /diagnostics", proc)
        states_after_jump = probe.count("state")
        driver.run_until(
            lambda: probe.count("state") >= states_after_jump + 2, 30, "units after the jump", proc
        )
        last = probe.snapshot("state")[-1]
        values = [
            v for v in (diag_values(d) for d in probe.snapshot("diag")) if v and "backend" in v
        ][-1]
        assert int(values["decode_errors"]) >= 4  # 3 images + 1 audio chunk
        assert int(values["late_messages"]) >= 1
        assert int(values["clock_jumps"]) >= 1
        assert proc.poll() is None
        assert to_ns(last.header.stamp) < BAG_START_NS + 10 * UNIT_NS  # back on the looped axis


# ------------------------------------------------------------------------------------ lifecycle
def test_invalid_parameters_fail_configure_with_a_clear_error_and_no_crash(tmp_path: Path) -> None:
    params = {"backend": "speak_until_interrupted_double", "timeline.no_such_key": 3}
    proc = NodeProcess.with_doubles(params, tmp_path / "node.log")
    try:
        wait_for(
            lambda: "configure failed" in proc.log_path.read_text(errors="replace"),
            30,
            "the configure error",
            proc,
        )
        assert "no_such_key" in proc.log_path.read_text()
        assert proc.poll() is None  # still up, unconfigured, waiting for a lifecycle manager
    finally:
        proc.stop()


def test_lifecycle_transitions_start_stop_and_release_the_loop(tmp_path: Path) -> None:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import GetState

    params = {**SIM, "backend": "speak_until_interrupted_double", "autostart": False}
    proc = NodeProcess.with_doubles(params, tmp_path / "node.log")
    with running(proc) as probe:
        change, get = probe.lifecycle(proc)

        def transition(transition_id: int) -> None:
            assert lifecycle_transition(change, get, transition_id, proc), transition_id

        def state() -> str:
            return probe.call(get, GetState.Request(), proc, resend_s=2.0).current_state.label

        driver = SimDriver(probe, BAG_START_NS)
        assert state() == "unconfigured"
        assert not probe.reset.service_is_ready()
        transition(Transition.TRANSITION_CONFIGURE)
        assert state() == "inactive"
        transition(Transition.TRANSITION_ACTIVATE)
        driver.start(proc)
        driver.run_until(lambda: probe.count("state") >= 2, 30, "units while active", proc)
        transition(Transition.TRANSITION_DEACTIVATE)
        stopped_at = probe.count("state")
        driver.lockstep = False
        driver.step(40, proc)  # four units of input: none is processed while inactive
        driver.lockstep = True
        assert probe.count("state") == stopped_at
        transition(Transition.TRANSITION_ACTIVATE)
        driver.run_until(
            lambda: probe.count("state") >= stopped_at + 3, 30, "units after re-activation", proc
        )
        resumed = probe.snapshot("state")[stopped_at:]
        assert 4 not in [s.mode for s in resumed]  # no ERROR: the backend really runs again
        assert all(s.unit_compute_ms < 1000 for s in resumed)
        transition(Transition.TRANSITION_DEACTIVATE)
        transition(Transition.TRANSITION_CLEANUP)
        assert state() == "unconfigured"
        wait_for(lambda: not probe.reset.service_is_ready(), 10, "omni/reset to go away", proc)
        assert proc.poll() is None
        transition(Transition.TRANSITION_CONFIGURE)
        transition(Transition.TRANSITION_ACTIVATE)
        assert proc.interrupt_and_wait() == 0  # Ctrl-C while active: a clean exit
        assert "Traceback" not in proc.log()


def test_compressed_camera_parameter_switches_the_subscription_and_bad_jpegs_are_counted(
    tmp_path: Path,
) -> None:
    import array

    from flow_harness import stamp
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import Header

    params = {**SIM, "backend": "speak_until_interrupted_double", "camera.compressed": True}
    proc = NodeProcess.with_doubles(params, tmp_path / "node.log")
    with running(proc) as probe:
        compressed = probe.node.create_publisher(
            CompressedImage, f"{proc.namespace}/camera/image_raw/compressed", 10
        )
        driver = SimDriver(probe, BAG_START_NS, frame_every=0)
        driver.start(proc)
        wait_for(
            lambda: compressed.get_subscription_count() > 0, 30, "the compressed subscription", proc
        )
        assert probe.cam_pub.get_subscription_count() == 0  # camera/image_raw is not subscribed

        def decode_errors() -> int:
            values = [
                v for v in (diag_values(d) for d in probe.snapshot("diag")) if v and "backend" in v
            ]
            return int(values[-1]["decode_errors"]) if values else 0

        def corrupt_jpeg_then_step() -> None:
            # Re-sent every step: the first ones may precede the node's side of discovery.
            msg = CompressedImage(header=Header(stamp=stamp(driver.now_ns)), format="jpeg")
            msg.data = array.array("B", b"\xff\xd8\xff\xe0 not really a jpeg")
            compressed.publish(msg)
            driver.step(1, proc)

        deadline = time.monotonic() + 30
        while decode_errors() < 1:
            assert time.monotonic() < deadline, (
                "the corrupt JPEG never showed in /diagnostics" + proc.log()
            )
            corrupt_jpeg_then_step()
        assert proc.poll() is None


def test_class_docstring_names_the_parameter_table_and_every_config_namespace() -> None:
    from omni_ros.ros.omni_flow_node import OmniFlowNode

    doc = OmniFlowNode.__doc__ or ""
    # The node's own parameters are documented once, in NODE_PARAMS (README's table is tested
    # against it in unit/test_parameter_docs.py); the docstring points there.
    assert "NODE_PARAMS" in doc
    namespaces = {spec.name.split(".")[0] for spec in OmniFlowNode.param_specs}
    assert namespaces == {"timeline", "session", "vad", "aec", "flow"}
    for namespace in namespaces:
        assert f"{namespace}.*" in doc


# ------------------------------------------------------------- backend down: visible, then recovered
def test_a_backend_that_cannot_prepare_is_an_error_in_state_and_diagnostics_until_it_recovers(
    tmp_path: Path,
) -> None:
    params = {
        **SIM,
        "backend": "down_server_double",
        "down_server_double.control_dir": str(tmp_path),
        "flow.prepare_retry_ms": 200,
        "flow.prepare_retry_max_ms": 400,
    }
    proc = NodeProcess.with_doubles(params, tmp_path / "node.log")
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS, lockstep=False)
        driver.start(proc)
        driver.run_until(lambda: 4 in _modes(probe), 30, "OmniState ERROR", proc)
        error = next(s for s in probe.snapshot("state") if s.mode == 4)
        assert "connection refused" in error.error, error.error

        from diagnostic_msgs.msg import DiagnosticStatus

        def diag_error() -> bool:
            for d in probe.snapshot("diag"):
                for status in d.status:
                    if (
                        status.name.endswith(": Omni-Flow")
                        and status.level == DiagnosticStatus.ERROR
                    ):
                        return "connection refused" in status.message
            return False

        driver.run_until(diag_error, 30, "a /diagnostics ERROR naming the reason", proc)
        (tmp_path / "up").touch()
        n = probe.count("state")
        driver.run_until(
            lambda: any(s.mode == 0 for s in probe.snapshot("state")[n:]), 30, "recovery", proc
        )
        assert probe.snapshot("state")[-1].error == ""


@pytest.mark.parametrize("broken", [False, True])
def test_a_remembered_echo_path_is_read_at_activation_and_reported_in_diagnostics(
    tmp_path: Path, broken: bool
) -> None:
    import numpy as np
    from omni_ros.core.aec import AecConfig
    from omni_ros.core.echo_path import EchoPath, save_echo_path

    file = tmp_path / "echo_path.npz"
    if broken:
        file.write_bytes(b"\x00" * 64)
    else:
        cfg = AecConfig()
        lead = cfg.sample_rate * (cfg.max_delay_ms + cfg.echo_tail_ms + 100) // 1000
        rng = np.random.default_rng(0)
        save_echo_path(
            EchoPath(
                sample_rate=cfg.sample_rate,
                frame_ms=cfg.frame_ms,
                filter_ms=cfg.filter_ms,
                delay_ns=80_000_000,
                align_ns=70_000_000,
                mic=rng.integers(-300, 300, 2 * cfg.sample_rate).astype(np.int16),
                ref=rng.integers(-300, 300, 2 * cfg.sample_rate + lead).astype(np.int16),
            ),
            file,
        )
    params = {
        **SIM,
        "backend": "speak_until_interrupted_double",
        "diagnostics.period_s": 0.2,
        "aec.echo_path_file": str(file),
    }
    proc = NodeProcess.with_doubles(params, tmp_path / "node.log")
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS)
        driver.start(proc)

        def start_value() -> str | None:
            for d in reversed(probe.snapshot("diag")):
                values = diag_values(d)
                if values and "echo_path.start" in values:
                    return values["echo_path.start"]
            return None

        driver.run_until(lambda: start_value() is not None, 30, "echo_path.start", proc)
        driver.run_until(lambda: probe.count("state") >= 2, 30, "units after the start", proc)
        value = start_value()
        assert value is not None
        if broken:
            assert value.startswith("cold: refused: echo path file"), value
        else:
            assert value == "warm: 2.0 s, delay 80 ms", value
        assert proc.poll() is None
    assert "Traceback" not in proc.log_path.read_text(errors="replace")
