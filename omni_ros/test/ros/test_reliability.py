"""Findings of the issue-15/16 campaign against the real omni_flow_node over DDS, one test each.

Each test fails on the code before its fix: a crafted WAV given to ``omni/set_prompt`` killed the
process; set_prompt said success before checking anything; omni/ask goals beyond the executor's
threads were left pending; unstamped audio made the backend fail units; malformed frames that no
unit chose changed no counter; lifecycle cycles leaked threads; SIGTERM with a unit in flight.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from omni_ros.core.clock import NS_PER_S

pytest.importorskip("rclpy")

from flow_harness import (
    NodeProcess,
    Probe,
    SimDriver,
    diag_values,
    image,
    lifecycle_transition,
    mic_chunk,
    running,
    wait_for,
)

pytestmark = [pytest.mark.ros, pytest.mark.timeout(180)]

BAG_START_NS = 1000 * NS_PER_S
SIM = {"use_sim_time": True, "timeline.watermark_ns": 500_000_000, "diagnostics.period_s": 0.2}
DOUBLE = {**SIM, "backend": "speak_until_interrupted_double"}


def _wav(frames: int, channels: int = 1, align: int | None = None, rate: int = 16_000) -> bytes:
    align = channels * 2 if align is None else align
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * max(align, 1), align, 16)
    data = bytes(2 * max(channels, 1) * frames)
    body = b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data))
    return b"RIFF" + struct.pack("<I", len(body) + len(data)) + body + data


def _latest_diag(probe: Probe) -> dict[str, str]:
    found = [v for v in (diag_values(d) for d in probe.snapshot("diag")) if v and "backend" in v]
    return found[-1] if found else {}


def _counter(probe: Probe, key: str) -> int:
    return int(_latest_diag(probe).get(key, "0") or 0)


# ---------------------------------------------------------------------------------- set_prompt
def test_set_prompt_refuses_crafted_and_oversized_input_and_keeps_the_conversation(
    tmp_path: Path,
) -> None:
    from omni_ros_msgs.srv import SetPrompt

    files = {
        "truncated header": _wav(1600)[:30],
        "zero channels": _wav(1600, channels=0, align=2),
        "block align 0": _wav(1600, align=0),
        "no frames": _wav(0),
        "70 s": _wav(70 * 16_000),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name.replace(' ', '_')}.wav"
        paths[name].write_bytes(data)
    proc = NodeProcess.with_doubles(DOUBLE, tmp_path / "node.log")
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS, frame_every=0)
        driver.start(proc)
        driver.run_until(lambda: probe.count("state") >= 3, 60, "three units", proc)
        requests = [SetPrompt.Request(system_prompt="x" * 1_000_000)]
        requests += [
            SetPrompt.Request(system_prompt="hello", ref_voice_path=str(p)) for p in paths.values()
        ]
        requests.append(SetPrompt.Request(system_prompt="hi", ref_voice_path=str(tmp_path / "no")))
        for request in requests:
            response = probe.call(probe.set_prompt, request, proc)
            assert not response.success, (request.ref_voice_path, response.message)
            assert "refused" in response.message
            assert proc.poll() is None, proc.log()
        # The old conversation kept running: unit indices go on, never back to 0 (a restart).
        count = probe.count("state")
        driver.run_until(lambda: probe.count("state") >= count + 3, 60, "more units", proc)
        indices = [s.unit_index for s in probe.snapshot("state")]
        assert indices == sorted(indices), indices
        # A valid request is accepted and restarts the conversation.
        good = tmp_path / "good.wav"
        good.write_bytes(_wav(16_000))
        response = probe.call(
            probe.set_prompt, SetPrompt.Request(system_prompt="ok", ref_voice_path=str(good)), proc
        )
        assert response.success, response.message
        count = probe.count("state")
        driver.run_until(
            lambda: any(s.unit_index == 0 for s in probe.snapshot("state")[count:]),
            60,
            "the restarted conversation",
            proc,
        )
        assert "Traceback" not in proc.log()


# ------------------------------------------------------------------------------------- omni/ask
def test_ask_goals_beyond_the_bound_are_rejected_at_once_not_left_pending(tmp_path: Path) -> None:
    from omni_ros_msgs.action import Ask

    proc = NodeProcess.with_doubles({**DOUBLE, "ask.max_goals": 2}, tmp_path / "node.log")
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS, frame_every=0)
        driver.start(proc)
        driver.run_until(lambda: probe.count("state") >= 1, 60, "a unit", proc)
        wait_for(lambda: probe.ask.wait_for_server(timeout_sec=0.1), 30, "omni/ask", proc)
        # The double never ends its turn: accepted goals run until their timeout. 10 at once:
        # the probe's own response queue (depth 10, rclpy's default) is the limit of this test.
        futures = [
            probe.ask.send_goal_async(Ask.Goal(text=f"q{i}", timeout_s=20.0)) for i in range(10)
        ]
        started = time.monotonic()
        wait_for(lambda: all(f.done() for f in futures), 15, "an answer to every goal", proc)
        answered_s = time.monotonic() - started
        accepted = [f.result().accepted for f in futures]
        assert accepted.count(True) == 2, accepted
        assert answered_s < 10
        wait_for(lambda: _counter(probe, "ask_goals_rejected") >= 8, 10, "the count", proc)
        for f in futures:
            if f.result().accepted:
                f.result().cancel_goal_async()


# ------------------------------------------------------------------------------ unstamped audio
def test_unstamped_audio_is_stamped_on_arrival_counted_and_fails_no_unit(tmp_path: Path) -> None:
    proc = NodeProcess.with_doubles(DOUBLE, tmp_path / "node.log")
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS, frame_every=0)
        driver.start(proc)
        driver.send_mic = False
        for _ in range(60):  # 6 s of sim time, every chunk with header.stamp 0
            chunk = mic_chunk(0, 100_000_000)
            driver.step(1, proc)
            probe.mic_pub.publish(chunk)
        driver.run_until(lambda: probe.count("state") >= 4, 60, "units of unstamped audio", proc)
        wait_for(lambda: _counter(probe, "unstamped_audio") >= 30, 10, "the count", proc)
        values = _latest_diag(probe)
        assert int(values["backend_errors"]) == 0, values
        assert all(s.mode != 4 for s in probe.snapshot("state"))  # no ERROR unit


# -------------------------------------------------------------------------------- frames
def test_malformed_frames_no_unit_chooses_are_counted(tmp_path: Path) -> None:
    proc = NodeProcess.with_doubles(DOUBLE, tmp_path / "node.log")
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS, frame_every=0)
        driver.start(proc)
        driver.run_until(lambda: probe.count("state") >= 2, 60, "two units", proc)
        wait_for(lambda: bool(_latest_diag(probe)), 10, "diagnostics", proc)
        before = _counter(probe, "decode_errors"), _counter(probe, "future_messages")
        t = driver.now_ns
        # Each followed by a good frame later in the same unit: the policy picks the good one.
        for bad in (
            image(t + 10_000_000, step=10),
            image(t + 20_000_000, encoding="h264"),
            image(t + 30_000_000, width=33, encoding="yuv422", step=66),
            image(t + 3600 * NS_PER_S),
        ):
            probe.cam_pub.publish(bad)
            time.sleep(0.05)
        probe.cam_pub.publish(image(t + 90_000_000))
        driver.step(20, proc)
        wait_for(
            lambda: (
                _counter(probe, "decode_errors") >= before[0] + 3
                and _counter(probe, "future_messages") >= before[1] + 1
            ),
            20,
            "three decode errors and one future frame",
            proc,
        )


# -------------------------------------------------------------------------------- lifecycle
def _threads_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(x for x in status.splitlines() if x.startswith("Threads:")).split()[1])
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def test_lifecycle_cycles_leak_no_thread_and_no_fd(tmp_path: Path) -> None:
    from lifecycle_msgs.msg import Transition

    proc = NodeProcess.with_doubles(DOUBLE, tmp_path / "node.log")
    with running(proc) as probe:
        change, get_state = probe.lifecycle(proc)
        driver = SimDriver(probe, BAG_START_NS, frame_every=0)
        driver.start(proc)
        driver.run_until(lambda: probe.count("state") >= 1, 60, "a unit", proc)

        def cycle() -> None:
            for tid in (
                Transition.TRANSITION_DEACTIVATE,
                Transition.TRANSITION_CLEANUP,
                Transition.TRANSITION_CONFIGURE,
                Transition.TRANSITION_ACTIVATE,
            ):
                assert lifecycle_transition(change, get_state, tid, proc), tid

        cycle()  # the first cycle may create lazily-built things once
        time.sleep(0.5)
        start = _threads_fds(proc.proc.pid)
        for _ in range(8):
            cycle()
        time.sleep(0.5)
        end = _threads_fds(proc.proc.pid)
        # On main every cycle left 2 threads more (the omni/ask executor's pool + the flow's
        # backend-call thread).
        assert end[0] <= start[0], (start, end)
        assert end[1] <= start[1] + 2, (start, end)
        count = probe.count("state")
        driver.run_until(lambda: probe.count("state") > count, 60, "units after cycling", proc)


# -------------------------------------------------------------------------------- shutdown
@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGINT, signal.SIGINT)])
def test_a_signal_with_a_unit_in_flight_exits_cleanly(tmp_path: Path, signals: Any) -> None:
    control = tmp_path / "control"
    control.mkdir()
    params = {**SIM, "backend": "blocking_double", "blocking_double.control_dir": str(control)}
    proc = NodeProcess.with_doubles(params, tmp_path / "node.log")
    with running(proc) as probe:
        driver = SimDriver(probe, BAG_START_NS, frame_every=0, lockstep=False)
        driver.start(proc)
        driver.run_until(lambda: (control / "blocked").exists(), 60, "a blocked unit", proc)
        for sig in signals:
            proc.proc.send_signal(sig)
            time.sleep(0.3)
        code = proc.proc.wait(timeout=20)
        log = proc.log()
        assert code == 0, log
        assert "Traceback" not in log, log


# ------------------------------------------------------------------------- parameter precedence
def test_p_on_the_command_line_overrides_the_params_file(tmp_path: Path) -> None:
    import yaml
    from flow_harness import REPO
    from rcl_interfaces.srv import GetParameters

    # The shipped file's section, under "/**" (the test node runs in a namespace of its own, and
    # a plain "omni_flow_node:" key matches only the node at the root namespace).
    shipped = yaml.safe_load((REPO / "omni_ros" / "config" / "reference.yaml").read_text())
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"/**": shipped["omni_flow_node"]}))
    proc = NodeProcess.installed(
        {},
        tmp_path / "node.log",
        extra=[
            "--params-file",
            str(params_file),
            *("-p", "camera.compressed:=true"),
            *("-p", "autostart:=false"),
            *("-p", "speech.chunk_ms:=40"),
        ],
    )
    with running(proc) as probe:
        client = probe.node.create_client(
            GetParameters, f"{proc.namespace}/omni_flow_node/get_parameters"
        )
        names = ["camera.compressed", "autostart", "speech.chunk_ms", "reference.size"]
        values = probe.call(client, GetParameters.Request(names=names), proc, resend_s=2.0).values
        assert values[0].bool_value is True
        assert values[1].bool_value is False
        assert values[2].integer_value == 40
        assert values[3].string_value == "tiny"  # the file still applies where -p is silent
