"""Every dropped or zero-filled microphone sample is counted by its cause (issue 15), a chunk
stamped far ahead never reaches the reorder buffer (issue 16), and a prompt the backend refuses
leaves the previous one in force (issue 15). Deterministic: ManualClock, a scripted backend."""

from __future__ import annotations

import concurrent.futures
import itertools
from collections.abc import Iterator

import numpy as np
import pytest
from omni_ros.core.errors import BackendError
from omni_ros.core.types import AUDIO_DROP_CAUSES, GAP_FILL_CAUSES, Mode, RawAudio, StateOut
from unit.core.scripted_backend import ScriptedBackendDouble
from unit.core.test_flow import RATE, T0, WATERMARK, Harness, S

CHUNK = 1_600  # 100 ms


@pytest.fixture
def backend() -> Iterator[ScriptedBackendDouble]:
    b = ScriptedBackendDouble()
    yield b
    b.close()


def chunk(start_sample: int, n: int = CHUNK, received_ns: int = 0, value: float = 0.1) -> RawAudio:
    pcm = np.full(n, int(value * 32767), "<i2")
    stamp = T0 + round(start_sample * S / RATE)
    return RawAudio(stamp, RATE, 1, "S16LE", pcm.tobytes(), received_ns=received_ns)


def assert_accounted(h: Harness) -> dict[str, int]:
    """The identity every test below ends with: nothing is lost without a cause."""
    acc = h.flow.audio_accounting()
    c = h.flow.counters
    assert acc["in"] == acc["used"] + acc["dropped"] + acc["held"], acc
    assert c.dropped_audio_samples == sum(c.audio_drops().values())
    assert c.gap_samples_filled == sum(c.gap_fills().values())
    assert set(c.audio_drops()) == set(AUDIO_DROP_CAUSES)
    assert set(c.gap_fills()) == set(GAP_FILL_CAUSES)
    return acc


def test_a_chunk_that_arrives_after_its_unit_closed_is_late_and_its_gap_is_late_too(
    backend: ScriptedBackendDouble,
) -> None:
    h = Harness(backend)
    for k in range(10):
        if k != 4:  # the fifth 100 ms of unit 0 is missing when it closes
            h.flow.push_audio(chunk(k * CHUNK))
    h.run_to(T0 + S + WATERMARK)
    assert backend.units[0].gap_samples == CHUNK
    assert h.flow.counters.gap_filled_missing == CHUNK
    # It arrives now, long after the unit closed: the input itself was late.
    h.flow.push_audio(chunk(4 * CHUNK, received_ns=h.clock.now_ns() + 5_000_000))
    h.run_to(T0 + S + WATERMARK + 10_000_000)
    c = h.flow.counters
    assert c.late_messages == 1
    assert c.audio_dropped_late == CHUNK
    assert c.audio_dropped_stall == 0
    assert (c.gap_filled_missing, c.gap_filled_late, c.gap_filled_stall) == (0, CHUNK, 0)
    acc = assert_accounted(h)
    assert acc["used"] == 9 * CHUNK


def test_a_chunk_the_node_had_before_its_unit_closed_is_an_executor_stall(
    backend: ScriptedBackendDouble,
) -> None:
    h = Harness(backend)
    for k in range(10):
        if k != 4:
            h.flow.push_audio(chunk(k * CHUNK))
    h.run_to(T0 + S + WATERMARK)
    # The middleware received it 100 ms after its last sample, well before the unit closed,
    # but the callback ran only now (a busy executor): the node lost it, not the network.
    received = T0 + 5 * CHUNK * S // RATE + 100_000_000
    h.flow.push_audio(chunk(4 * CHUNK, received_ns=received))
    h.run_to(T0 + S + WATERMARK + 10_000_000)
    c = h.flow.counters
    assert c.audio_dropped_stall == CHUNK
    assert c.audio_dropped_late == 0
    assert (c.gap_filled_missing, c.gap_filled_late, c.gap_filled_stall) == (0, 0, CHUNK)
    assert_accounted(h)


def test_a_gap_nothing_arrived_for_stays_missing(backend: ScriptedBackendDouble) -> None:
    h = Harness(backend)
    for k in range(5):
        h.flow.push_audio(chunk(k * CHUNK))
    h.run_to(T0 + S + WATERMARK)
    c = h.flow.counters
    assert (c.gap_filled_missing, c.gap_filled_late, c.gap_filled_stall) == (5 * CHUNK, 0, 0)
    assert c.dropped_audio_samples == 0
    assert_accounted(h)


def test_an_input_queue_overflow_is_counted_as_queue_full(backend: ScriptedBackendDouble) -> None:
    h = Harness(backend, max_queued_audio=4)
    for k in range(10):  # the worker does not run in between: 6 fall off the queue
        h.flow.push_audio(chunk(k * CHUNK))
    h.run_to(T0 + S + WATERMARK)
    c = h.flow.counters
    assert c.audio_dropped_queue_full == 6 * CHUNK
    assert c.dropped_audio_samples == 6 * CHUNK
    assert_accounted(h)


def test_a_chunk_outside_the_reorder_hold_breaks_the_stream_and_its_lost_frame_is_counted(
    backend: ScriptedBackendDouble,
) -> None:
    # 25 ms chunks through the 20 ms echo canceller frames: 5 ms wait in the canceller for the
    # next chunk. A chunk that comes after the hold released the audio after it restarts the
    # canceller's stream, which forgets those 5 ms.
    h = Harness(backend, aec={"enabled": True}, audio_reorder_ms=60)
    n = 400
    order = [0, 1, 3, 4, 5, 6, 7, 8, 2, 9, 10, 11]  # chunk 2 comes 150 ms late
    for k in order:
        h.clock.set_ns(T0 + round((k + 1) * n * S / RATE) + 1_000_000)
        if k == 2:
            h.clock.set_ns(T0 + round(9 * n * S / RATE) + 1_000_000)
        h.flow.push_audio(chunk(k * n, n))
        h.flow.run_until_idle(h.clock.now_ns())
    c = h.flow.counters
    assert c.audio_dropped_reorder > 0
    assert c.audio_dropped_reorder % 80 == 0  # whole unfinished 5 ms pieces
    assert_accounted(h)


def test_units_the_overrun_policy_drops_count_their_samples_as_overrun(
    backend: ScriptedBackendDouble,
) -> None:
    h = Harness(backend, max_queued_units=1)
    h.silence(4.0)
    h.run_to(T0 + 4 * S + WATERMARK, jump=True)  # four units due at once, one may wait
    c = h.flow.counters
    assert c.units_dropped_overrun == 3
    assert c.audio_dropped_overrun == 3 * RATE
    assert c.dropped_audio_samples == 3 * RATE
    acc = assert_accounted(h)
    assert acc["used"] == RATE


def test_paused_units_are_counted_as_paused(backend: ScriptedBackendDouble) -> None:
    h = Harness(backend)
    h.flow.pause()
    h.silence(2.0)
    h.run_to(T0 + 2 * S + WATERMARK)
    assert h.flow.counters.audio_dropped_paused == 2 * RATE
    assert_accounted(h)


def test_duplicates_bad_input_and_a_reset_are_counted_by_cause(
    backend: ScriptedBackendDouble,
) -> None:
    # Without the canceller: with it, the old duplicate is a discontinuity to its stream, which
    # restarts and forgets its unfinished frame (160 samples counted as ``reorder``, the rest of
    # the chunk as ``duplicate``; the total is the same). Checked below in its own test.
    h = Harness(backend, aec={"enabled": False})
    for k in range(10):
        h.flow.push_audio(chunk(k * CHUNK))
    h.flow.push_audio(chunk(2 * CHUNK, CHUNK // 2))  # sent twice
    h.flow.push_audio(RawAudio(T0, RATE, 1, "S16LE", b"\x00" * 3201))  # truncated: 1600 frames
    h.run_to(T0 + S + WATERMARK)
    c = h.flow.counters
    assert c.audio_dropped_duplicate == CHUNK // 2
    assert c.audio_dropped_bad_input == CHUNK
    for k in range(10, 15):
        h.flow.push_audio(chunk(k * CHUNK))
    h.run_to(T0 + S + WATERMARK + 100_000_000)
    h.flow.reset()  # the half unit buffered is forgotten with the conversation
    h.run_to(T0 + S + WATERMARK + 200_000_000)
    assert c.audio_dropped_reset == 5 * CHUNK
    assert_accounted(h)


def test_with_the_canceller_on_an_old_duplicate_is_still_accounted_for_whole(
    backend: ScriptedBackendDouble,
) -> None:
    h = Harness(backend)  # the echo canceller on, as in production
    for k in range(10):
        h.flow.push_audio(chunk(k * CHUNK))
    h.flow.push_audio(chunk(2 * CHUNK, CHUNK // 2))  # sent twice, after the hold released it
    h.run_to(T0 + S + WATERMARK)
    c = h.flow.counters
    assert c.audio_dropped_duplicate + c.audio_dropped_reorder == CHUNK // 2
    assert c.audio_dropped_reorder <= 160  # the canceller's unfinished frame (10 ms)
    assert c.audio_samples_used == RATE  # the unit is whole
    assert_accounted(h)


def test_a_chunk_stamped_an_hour_ahead_is_future_and_the_reorder_hold_keeps_working(
    backend: ScriptedBackendDouble,
) -> None:
    """Issue 16: on main the chunk sat uncounted in the reorder heap, and its stamp made every
    later chunk look old enough to release at once: swapped chunks reached the stream filters
    out of order."""
    h = Harness(backend, aec={"enabled": True}, audio_reorder_ms=60)
    assert h.flow.vad is not None
    seen: list[int] = []
    vad_process = h.flow.vad.process
    h.flow.vad.process = lambda block: (seen.append(block.stamp_ns), vad_process(block))[1]  # type: ignore[method-assign]
    n = 320
    order = list(range(100))
    for k in range(5, 95, 7):
        order[k], order[k + 1] = order[k + 1], order[k]
    for i, k in enumerate(order):
        h.clock.set_ns(T0 + round((k + 1) * n * S / RATE) + 2_000_000)
        h.flow.push_audio(chunk(k * n, n))
        if i == 3:
            h.flow.push_audio(chunk(3600 * RATE, n))  # one hour ahead
        h.flow.run_until_idle(h.clock.now_ns())
    c = h.flow.counters
    assert c.future_messages == 1
    assert c.audio_dropped_future == n
    assert all(b > a for a, b in itertools.pairwise(seen)), "the reorder hold was switched off"
    assert c.audio_dropped_reorder == 0
    assert_accounted(h)


class _PickyBackend(ScriptedBackendDouble):
    """Its ``prepare`` refuses one prompt (as a real backend refuses a voice or a prompt it
    cannot embed: passed the node's checks, failed in the backend)."""

    def prepare(self, system_prompt: str, ref_voice: object = None) -> None:
        if system_prompt == "unembeddable":
            raise BackendError("prompt does not fit the context")
        super().prepare(system_prompt, ref_voice)  # type: ignore[arg-type]


def test_a_prompt_the_backend_refuses_keeps_the_previous_one_and_units_keep_coming() -> None:
    backend = _PickyBackend()
    try:
        h = Harness(backend, system_prompt="Be kind.")
        h.silence(1.0)
        h.run_to(T0 + S + WATERMARK)
        future = h.flow.set_prompt("unembeddable")
        h.silence(2.0)
        h.run_to(T0 + 3 * S + WATERMARK)
        with pytest.raises(BackendError, match="does not fit"):
            future.result(timeout=0)
        assert h.flow.counters.prompt_errors == 1
        # Prepared again with the previous prompt at once (no retry backoff), units continue.
        assert [p for p, _ in backend.prepares] == ["Be kind.", "Be kind."]
        assert len(backend.units) >= 2
        states = h.of(StateOut)
        errors = [s for s in states if s.mode is Mode.ERROR]
        assert len(errors) == 1
        assert "previous prompt kept" in errors[0].error
        assert states[-1].mode is Mode.LISTENING
        ok = h.flow.set_prompt("Be brief.")
        h.silence(1.0)
        h.run_to(T0 + 4 * S + WATERMARK)
        assert ok.result(timeout=0) is None
        assert backend.prepares[-1][0] == "Be brief."
    finally:
        backend.close()


def test_a_prompt_still_waiting_when_the_flow_stops_is_answered(
    backend: ScriptedBackendDouble,
) -> None:
    h = Harness(backend)
    future = h.flow.set_prompt("never tried")
    h.flow.stop()
    with pytest.raises(Exception, match="stopped"):
        future.result(timeout=0)
    assert isinstance(future, concurrent.futures.Future)
