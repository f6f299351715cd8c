"""One deadline owner: the flow's ``flow.backend_deadline_ms`` / ``flow.prepare_deadline_ms`` bound
the backends' own per-call timeouts, which ``node_setup`` derives from them (the node and both
replay modes configure through it), so a dead server fails with the backend's own error and
recovery before the flow gives the call up as hung."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from omni_ros.backends import _wire
from omni_ros.backends.base import REGISTRY, backend_class, create_backend
from omni_ros.core.clock import NS_PER_S, ManualClock
from omni_ros.core.errors import ConfigError
from omni_ros.core.flow import OmniFlow
from omni_ros.core.types import Mode, OutputEvent, RawAudio, StateOut
from omni_ros.ros._setup import build_backend_config, node_setup
from unit.backends.loopback_vllm_server import LoopbackVllmServer

T0 = 100 * NS_PER_S
RATE = 16_000


def _shares(backend: str) -> dict[str, tuple[str, float]]:
    return dict(getattr(backend_class(backend).config_class, "FLOW_DEADLINE_SHARES", {}))


@pytest.mark.parametrize("backend", ["vllm_omni", "llamacpp_omni", "minicpmo"])
def test_a_backends_timeouts_follow_the_flow_deadline_they_run_within(backend: str) -> None:
    shares = _shares(backend)
    assert shares, f"{backend} declares no timeouts bounded by a flow deadline"
    setup = node_setup(
        {"backend": backend, "flow.backend_deadline_ms": 3000, "flow.prepare_deadline_ms": 60_000}
    )
    deadline_s = {"backend_deadline_ms": 3.0, "prepare_deadline_ms": 60.0}
    for deadline in {d for d, _ in shares.values()}:
        fields = [f for f, (d, _) in shares.items() if d == deadline]
        # They run one after the other within one call: together they still fire first.
        assert sum(setup.backend_params[f] for f in fields) < deadline_s[deadline]
    for field, (deadline, share) in shares.items():
        assert setup.backend_params[field] == pytest.approx(share * deadline_s[deadline])
        assert setup.derived_timeouts[field] == setup.backend_params[field]


def test_every_backend_with_a_network_or_compute_timeout_declares_its_shares() -> None:
    # The reference backend runs tiny in-process networks with no per-call timeout of its own.
    assert {name for name in REGISTRY if _shares(name)} == {
        "vllm_omni",
        "llamacpp_omni",
        "minicpmo",
    }


def test_a_timeout_set_beyond_the_flow_deadline_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError) as excinfo:
        node_setup({"backend": "vllm_omni", "vllm_omni.unit_timeout_s": 10.0})
    message = str(excinfo.value)
    assert "vllm_omni.unit_timeout_s = 10.0 s" in message
    assert "flow.backend_deadline_ms = 5000 ms" in message


def test_timeouts_that_only_together_reach_the_deadline_are_refused() -> None:
    # 3 s read + 3 s decode (derived share: 40 % of 5 s each) within one 5 s call.
    with pytest.raises(ConfigError, match=r"read_timeout_s \+ llamacpp_omni.decode_timeout_s"):
        node_setup(
            {
                "backend": "llamacpp_omni",
                "llamacpp_omni.read_timeout_s": 3.0,
                "llamacpp_omni.decode_timeout_s": 3.0,
            }
        )


def test_a_timeout_set_below_the_deadline_is_kept_and_the_others_still_derived() -> None:
    setup = node_setup({"backend": "llamacpp_omni", "llamacpp_omni.decode_timeout_s": 1.5})
    assert setup.backend_params["decode_timeout_s"] == 1.5
    assert setup.backend_params["read_timeout_s"] == pytest.approx(2.0)
    assert "decode_timeout_s" not in setup.derived_timeouts


def test_a_derived_timeout_a_backend_refuses_is_named_as_derived_with_its_deadline() -> None:
    # llama.cpp-omni: a quiet unit (unit_quiet_s, 0.8 s) must be shorter than a silent server.
    setup = node_setup({"backend": "llamacpp_omni", "flow.backend_deadline_ms": 1500})
    with pytest.raises(ConfigError, match=r"derived: llamacpp_omni.decode_timeout_s = 0.6 s from"):
        build_backend_config(setup)


@pytest.fixture
def vllm_server() -> Iterator[LoopbackVllmServer]:
    server = LoopbackVllmServer(continuation_period_s=30.0).start()
    yield server
    server.stop()


def test_a_silent_replica_fails_with_the_backends_own_timeout_before_the_flow_deadline(
    vllm_server: LoopbackVllmServer, tmp_path: Path
) -> None:
    voice = tmp_path / "voice.wav"
    _wire.write_wav(voice, 0.1 * np.sin(np.arange(RATE) / 7.0).astype(np.float32), RATE)
    setup = node_setup(
        {
            "backend": "vllm_omni",
            "vllm_omni.urls": vllm_server.url,
            "vllm_omni.ref_audio_path": str(voice),
            "vllm_omni.heartbeat_interval_s": 0.0,
            "flow.backend_deadline_ms": 3000,
        }
    )
    backend = create_backend(setup.backend, setup.backend_params)
    clock = ManualClock(T0)
    events: list[OutputEvent] = []
    flow = OmniFlow(setup.flow, backend, clock, events.append)
    try:
        flow.run_until_idle(T0)  # prepare: the session opens
        vllm_server.fault = "hang"  # appends swallowed: the model never decides
        first = round(backend.first_unit_ns * RATE / NS_PER_S)
        pcm = np.zeros(first, "<i2").tobytes()
        flow.push_audio(RawAudio(T0, RATE, 1, "S16LE", pcm))
        now = T0 + backend.first_unit_ns + setup.flow.timeline.watermark_ns
        clock.set_ns(now)
        flow.run_until_idle(now)
        errors = [e for e in events if isinstance(e, StateOut) and e.mode is Mode.ERROR]
        assert errors, "the unit did not fail"
        # The backend's own error (its recovery: a new session next prefill), not the flow's
        # "exceeded its 3000 ms deadline" that leaves the call hung.
        assert "gave no listen/speak decision" in errors[-1].error, errors[-1].error
        assert flow.counters.backend_timeouts == 1
    finally:
        flow.close()
        backend.close()
