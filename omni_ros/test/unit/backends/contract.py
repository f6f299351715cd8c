"""The contract every backend passes: one test class that each backend's test module subclasses.

Usage (in ``test_<backend>.py``)::

    from unit.backends.contract import BackendContract, make_unit

    class TestMyBackendContract(BackendContract):
        @pytest.fixture
        def backend(self) -> Iterator[MyBackend]:
            backend = MyBackend(MyConfig(...))      # fresh, NOT prepared
            yield backend
            backend.close()

``BackendContract`` has no ``Test`` prefix, so pytest collects its tests only through subclasses.
A subclass may override :attr:`BackendContract.system_prompt` and :attr:`BackendContract.max_units_to_speak`.

What the contract pins down (the protocol text lives in ``omni_ros.backends.base``):

- rates and unit lengths are positive ``int`` and a unit is a whole number of input samples;
- ``prepare -> prefill -> generate`` returns a well-formed :class:`UnitResult` (see :func:`check_result`);
- misuse raises :class:`StateError`: ``prefill``/``generate`` before ``prepare``, ``generate`` before
  ``prefill``, and two ``generate`` calls without a ``prefill`` between them;
- ``interrupt()`` is safe from another thread, even while units run, and the next result is a listen
  with no text and no audio;
- ``reset()`` then ``prepare()`` gives a working session again; ``close()`` is idempotent;
- a unit of the wrong length or sample rate is rejected with an error that is both an
  :class:`OmniError` and a :class:`ValueError` (e.g. ``ConfigError``), and the backend still works after it;
- ten units in a row (speech, silence, frames of odd sizes, injected text) keep working.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from omni_ros.backends.base import Backend, backend_class
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import OmniError, StateError
from omni_ros.core.types import Unit, UnitResult, VideoFrame

#: Frame sizes (H, W) cycled by :func:`make_unit`: a VGA camera, a portrait phone, a tiny odd one.
_FRAME_SHAPES: tuple[tuple[int, int], ...] = ((480, 640), (720, 405), (37, 53))

#: Upper bound on the speech one unit may return (generous: the real model returns ~1 s).
MAX_AUDIO_S_PER_UNIT = 10.0


def unit_bounds_ns(backend: Any, index: int) -> tuple[int, int]:
    """Start and end (ns) of unit ``index`` on a timeline whose origin is the first unit's start."""
    if index == 0:
        return 0, int(backend.first_unit_ns)
    start_ns = int(backend.first_unit_ns) + (index - 1) * int(backend.unit_ns)
    return start_ns, start_ns + int(backend.unit_ns)


def unit_samples(backend: Any, index: int) -> int:
    """Exact number of input samples in unit ``index`` (index 0 is the longer first unit)."""
    duration_ns = int(backend.first_unit_ns) if index == 0 else int(backend.unit_ns)
    return round(duration_ns * int(backend.input_sample_rate) / NS_PER_S)


def make_unit(
    backend: Any,
    index: int,
    *,
    speech: bool = False,
    frames: int = 0,
    texts: tuple[str, ...] = (),
) -> Unit:
    """Build unit ``index`` with exactly the length and rate ``backend`` expects.

    Args:
        backend: any object with the Backend rate / unit-length attributes.
        index: unit number; 0 is the first unit after ``prepare()`` and uses ``first_unit_ns``.
        speech: a voiced, speech-like signal (harmonics of a gliding pitch with a syllable-rate
            envelope) instead of near-silence (faint noise).
        frames: number of RGB frames, spread evenly over the unit, sizes cycling through odd shapes.
        texts: text injected in this unit.

    Returns:
        A deterministic :class:`Unit` (the same arguments give the same samples and pixels).
    """
    rate = int(backend.input_sample_rate)
    n = unit_samples(backend, index)
    start_ns, end_ns = unit_bounds_ns(backend, index)
    rng = np.random.default_rng(1000 + index)
    t = np.arange(n, dtype=np.float64) / rate + start_ns / NS_PER_S
    if speech:
        pitch_hz = 140.0 + 30.0 * np.sin(2 * np.pi * 0.7 * t)
        phase = 2 * np.pi * np.cumsum(pitch_hz) / rate
        voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
        envelope = 0.5 * (1.0 + np.sin(2 * np.pi * 4.0 * t))  # ~4 syllables per second
        audio = 0.3 * envelope * voiced / 2.3 + 0.01 * rng.standard_normal(n)
    else:
        audio = 1e-4 * rng.standard_normal(n)
    samples = np.clip(audio, -1.0, 1.0).astype(np.float32)

    video: list[VideoFrame] = []
    for k in range(frames):
        height, width = _FRAME_SHAPES[(index + k) % len(_FRAME_SHAPES)]
        rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        stamp_ns = start_ns + (end_ns - start_ns) * k // max(frames, 1)
        video.append(VideoFrame(stamp_ns=stamp_ns, rgb=rgb))
    return Unit(
        index=index,
        start_ns=start_ns,
        end_ns=end_ns,
        audio=samples,
        sample_rate=rate,
        frames=tuple(video),
        user_speech=speech,
        texts=tuple(texts),
    )


def check_result(result: object) -> UnitResult:
    """Assert that ``result`` is a well-formed :class:`UnitResult` and return it.

    A listen result carries no text and no audio (``audio is None``); speech audio is float32 1-D,
    finite, within [-1, 1], non-empty and at most :data:`MAX_AUDIO_S_PER_UNIT` seconds long at the
    output rate; timings are finite non-negative floats keyed by stage name.
    """
    assert isinstance(result, UnitResult), f"generate() returned {type(result).__name__}"
    assert isinstance(result.is_listen, bool)
    assert isinstance(result.end_of_turn, bool)
    assert isinstance(result.text, str)
    assert isinstance(result.timings_ms, dict)
    for stage, value in result.timings_ms.items():
        assert isinstance(stage, str)
        assert isinstance(value, float), f"timings_ms[{stage!r}] is {type(value).__name__}"
        assert math.isfinite(value)
        assert value >= 0.0
    if result.is_listen:
        assert result.text == "", "a listen unit must not carry text"
        assert result.audio is None, "a listen unit must return audio=None"
    if result.audio is not None:
        audio = result.audio
        assert isinstance(audio, np.ndarray)
        assert audio.dtype == np.float32
        assert audio.ndim == 1
        assert audio.size > 0, "return None rather than an empty array"
        assert np.all(np.isfinite(audio))
        assert float(np.max(np.abs(audio))) <= 1.0
    return result


class BackendContract:
    """Tests every backend must pass. Subclasses provide the ``backend`` fixture (fresh, unprepared)."""

    #: The prompt the contract prepares sessions with.
    system_prompt: str = "Streaming Omni Conversation."
    #: How many units the interrupt test runs at most while waiting for the backend to speak.
    max_units_to_speak: int = 3

    @pytest.fixture
    def stall(self) -> Callable[[], None] | None:
        """For a server backend: a switch that makes its server stop answering units, so that a
        call stays in flight (its double's ``hang`` fault). None: calls are compute-bound and a
        loop of them is in flight anyway."""
        return None

    # ------------------------------------------------------------------------------------ helpers
    def run_unit(self, backend: Any, index: int, **kwargs: Any) -> UnitResult:
        backend.prefill(make_unit(backend, index, **kwargs))
        return check_result(backend.generate())

    # ------------------------------------------------------------------------------- attributes
    def test_rates_and_unit_lengths_are_positive_ints(self, backend: Any) -> None:
        for attr in ("input_sample_rate", "output_sample_rate", "unit_ns", "first_unit_ns"):
            value = getattr(backend, attr)
            assert isinstance(value, int), attr
            assert not isinstance(value, bool), attr
            assert value > 0, attr
        assert backend.first_unit_ns >= backend.unit_ns
        # A unit must be a whole number of input samples, or the timeline would drift.
        for duration_ns in (backend.unit_ns, backend.first_unit_ns):
            assert (duration_ns * backend.input_sample_rate) % NS_PER_S == 0

    def test_backend_is_registered_under_its_name(self, backend: Any) -> None:
        assert isinstance(backend, Backend)
        assert isinstance(type(backend).name, str)
        assert type(backend).name
        assert isinstance(backend, backend_class(type(backend).name))
        assert hasattr(type(backend).config_class, "from_mapping")

    # ------------------------------------------------------------------------------- happy path
    def test_prepare_prefill_generate_returns_a_well_formed_result(self, backend: Any) -> None:
        backend.prepare(self.system_prompt)
        result = self.run_unit(backend, 0, speech=True, frames=1)
        assert result.timings_ms, "report at least one stage timing"

    def test_ten_units_in_a_row_keep_working(self, backend: Any) -> None:
        backend.prepare(self.system_prompt)
        for index in range(10):
            texts = ("What do you see?",) if index == 4 else ()
            self.run_unit(backend, index, speech=index % 3 == 0, frames=index % 2, texts=texts)

    # ----------------------------------------------------------------------------------- misuse
    def test_prefill_before_prepare_raises_state_error(self, backend: Any) -> None:
        with pytest.raises(StateError):
            backend.prefill(make_unit(backend, 0))

    def test_generate_before_prepare_raises_state_error(self, backend: Any) -> None:
        with pytest.raises(StateError):
            backend.generate()

    def test_generate_before_prefill_raises_state_error(self, backend: Any) -> None:
        backend.prepare(self.system_prompt)
        with pytest.raises(StateError):
            backend.generate()
        # The misuse changed nothing: the session still works.
        self.run_unit(backend, 0)

    def test_two_generates_without_prefill_raise_state_error(self, backend: Any) -> None:
        backend.prepare(self.system_prompt)
        self.run_unit(backend, 0)
        with pytest.raises(StateError):
            backend.generate()
        self.run_unit(backend, 1)

    def test_wrong_length_unit_is_rejected_with_a_clear_error(self, backend: Any) -> None:
        backend.prepare(self.system_prompt)
        good = make_unit(backend, 0)
        short = Unit(
            index=0,
            start_ns=good.start_ns,
            end_ns=good.end_ns,
            audio=good.audio[: len(good.audio) // 2],
            sample_rate=good.sample_rate,
        )
        with pytest.raises(OmniError) as excinfo:
            backend.prefill(short)
        assert isinstance(excinfo.value, ValueError)
        assert str(excinfo.value)
        # Rejected before any state changed: the right unit still works.
        backend.prefill(good)
        check_result(backend.generate())

    def test_wrong_rate_unit_is_rejected_with_a_clear_error(self, backend: Any) -> None:
        backend.prepare(self.system_prompt)
        good = make_unit(backend, 0)
        wrong_rate = backend.input_sample_rate * 3 // 2
        resampled = Unit(
            index=0,
            start_ns=good.start_ns,
            end_ns=good.end_ns,
            audio=np.zeros(len(good.audio) * 3 // 2, dtype=np.float32),
            sample_rate=wrong_rate,
        )
        with pytest.raises(OmniError) as excinfo:
            backend.prefill(resampled)
        assert isinstance(excinfo.value, ValueError)
        backend.prefill(good)
        check_result(backend.generate())

    def test_stereo_unit_is_rejected_with_a_clear_error(self, backend: Any) -> None:
        backend.prepare(self.system_prompt)
        good = make_unit(backend, 0)
        stereo = dataclasses.replace(good, audio=np.stack([good.audio, good.audio], axis=1))
        with pytest.raises(OmniError, match="mono"):
            backend.prefill(stereo)
        backend.prefill(good)
        check_result(backend.generate())

    # ------------------------------------------------------------------------ interrupt / reset
    def test_interrupt_from_another_thread_makes_the_next_unit_listen(self, backend: Any) -> None:
        backend.prepare(self.system_prompt)
        index = 0
        for index in range(self.max_units_to_speak):
            result = self.run_unit(backend, index, speech=True)
            if not result.is_listen:
                break
        errors: list[BaseException] = []

        def interrupt() -> None:
            try:
                backend.interrupt()
            except BaseException as exc:  # surfaced in the main thread below
                errors.append(exc)

        thread = threading.Thread(target=interrupt)
        thread.start()
        thread.join(timeout=10.0)
        assert not thread.is_alive()
        assert errors == []
        after = self.run_unit(backend, index + 1, speech=True)
        assert after.is_listen, "the unit after interrupt() must be a listen unit"
        assert after.audio is None
        assert after.text == ""

    def test_interrupt_while_units_run_is_safe(self, backend: Any) -> None:
        backend.prepare(self.system_prompt)
        stop = threading.Event()
        errors: list[BaseException] = []

        def hammer() -> None:
            try:
                while not stop.is_set():
                    backend.interrupt()
                    stop.wait(0.001)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            for index in range(3):
                self.run_unit(backend, index, speech=True)
        finally:
            stop.set()
            thread.join(timeout=10.0)
        assert errors == []

    def test_reset_then_prepare_starts_a_working_session(self, backend: Any) -> None:
        backend.prepare(self.system_prompt)
        self.run_unit(backend, 0, speech=True)
        self.run_unit(backend, 1)
        backend.reset()
        with pytest.raises(StateError):
            backend.prefill(make_unit(backend, 0))
        backend.prepare(self.system_prompt)
        self.run_unit(backend, 0, frames=1)
        self.run_unit(backend, 1)

    def test_close_is_idempotent(self, backend: Any) -> None:
        backend.prepare(self.system_prompt)
        self.run_unit(backend, 0)
        backend.close()
        backend.close()

    def test_a_closed_backend_refuses_work_with_a_state_error(self, backend: Any) -> None:
        backend.prepare(self.system_prompt)
        self.run_unit(backend, 0)
        backend.close()
        # Never a call into released GPU memory or a closed socket: a clear StateError.
        with pytest.raises(StateError, match="closed"):
            backend.prepare(self.system_prompt)
        with pytest.raises(StateError, match="closed"):
            backend.prefill(make_unit(backend, 1))
        backend.interrupt()  # the barge-in path may race a shutdown: never raises

    def test_close_without_prepare_is_fine(self, backend: Any) -> None:
        backend.close()
        backend.close()

    def test_close_from_another_thread_while_units_run_ends_them_with_an_omni_error(
        self, backend: Any, stall: Callable[[], None] | None
    ) -> None:
        # A lifecycle cleanup or a signal closes the backend from the node's thread while the
        # flow's backend-call thread may be inside prefill/generate (issue 16: with vllm_omni
        # that left the connection read by two threads). The call in flight must end with a
        # result or an OmniError (StateError, BackendUnavailable...), close() must return, and
        # the closed backend must refuse further calls.
        backend.prepare(self.system_prompt)
        self.run_unit(backend, 0, speech=True)
        if stall is not None:
            stall()  # the next generate() waits for the server: close() lands mid-call
        started = threading.Event()
        outcome: list[BaseException] = []

        def units() -> None:
            index = 1
            try:
                while index < 10_000:
                    backend.prefill(make_unit(backend, index, speech=index % 3 == 0))
                    started.set()
                    check_result(backend.generate())
                    index += 1
            except BaseException as exc:  # surfaced in the main thread below
                outcome.append(exc)

        thread = threading.Thread(target=units, daemon=True)
        thread.start()
        assert started.wait(30.0), "no unit started"
        time.sleep(0.2)  # well inside the loop of calls (or the stalled call)
        backend.close()
        thread.join(timeout=30.0)
        assert not thread.is_alive(), "a call went on after close()"
        assert len(outcome) == 1, outcome
        assert isinstance(outcome[0], OmniError), outcome
        with pytest.raises(StateError):
            backend.prefill(make_unit(backend, 0))
