"""Scripted test doubles of a model backend, for driving the real omni_flow_node in tests.

They are NOT models: their outputs are scripted so that a test over DDS can prove one property of
the node at a time. Registered into ``omni_ros.backends.base.BACKENDS`` at runtime by
``flow_node_runner.py`` (never by the package itself).

- :class:`SpeakUntilInterruptedBackendDouble` (``speak_until_interrupted_double``): speaks one
  unit of 24 kHz audio plus a word of text in every unit, never ending its turn, until
  ``interrupt()``; from then on it listens until the next ``prepare()``. A test of the interrupt
  service can then check that no speech is stamped later than one unit after the interrupt.
- :class:`BlockingBackendDouble` (``blocking_double``): in the ``block_unit``-th ``generate()``
  it creates ``<control_dir>/blocked`` and waits until the test creates ``<control_dir>/release``
  (a signal across processes), then creates ``<control_dir>/released``. A test can therefore
  prove that something happened while the unit was provably still computing.
- :class:`TurnsBackendDouble` (``turns_double``): listens and speaks by a fixed per-unit pattern
  (e.g. ``LSE``: a turn whose last unit ends it), optionally taking 400-800 ms a unit: the duplex
  tests drive barge-in in a turn's last unit and the speech schedule of a slow model with it.
- :class:`DownServerBackendDouble` (``down_server_double``): prepare() fails like a client whose
  server is down until the test creates ``<control_dir>/up``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.config import from_mapping
from omni_ros.core.errors import (
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ConfigError,
    StateError,
)
from omni_ros.core.types import FloatArray, Unit, UnitResult


class _ScriptedBase:
    """Shared bookkeeping: the base.py call-order rules (misuse raises StateError)."""

    name: ClassVar[str] = "double"
    input_sample_rate = 16_000
    output_sample_rate = 24_000

    def __init__(self, unit_ms: int) -> None:
        self.unit_ns = int(unit_ms) * 1_000_000
        self.first_unit_ns = self.unit_ns
        self._prepared = False
        self._prefilled: Unit | None = None
        self._units = 0
        self._interrupted = threading.Event()

    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        self._prepared = True
        self._units = 0
        self._prefilled = None
        self._interrupted.clear()

    def prefill(self, unit: Unit) -> None:
        if not self._prepared:
            raise StateError("prefill() before prepare(): call prepare() first")
        expected = round(self.unit_ns * self.input_sample_rate / NS_PER_S)
        if unit.sample_rate != self.input_sample_rate or len(unit.audio) != expected:
            raise ConfigError(
                f"unit has {len(unit.audio)} samples at {unit.sample_rate} Hz; expected "
                f"{expected} at {self.input_sample_rate} Hz"
            )
        self._prefilled = unit

    def _take(self) -> Unit:
        if self._prefilled is None:
            raise StateError("generate() without prefill(): prefill one unit first")
        unit, self._prefilled = self._prefilled, None
        self._units += 1
        return unit

    def interrupt(self) -> None:
        self._interrupted.set()

    def reset(self) -> None:
        self._prepared = False
        self._prefilled = None

    def close(self) -> None:
        self._prepared = False


@dataclass(frozen=True)
class SpeakerDoubleConfig:
    """Attributes:
    unit_ms: unit length (every unit, the first included).
    word: text emitted per speaking unit.
    refuse_prompt: a system prompt whose prepare() raises BackendError (empty: none).
    """

    unit_ms: int = 1000
    word: str = "la "
    refuse_prompt: str = ""

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any] | None) -> SpeakerDoubleConfig:
        return from_mapping(cls, mapping)


class SpeakUntilInterruptedBackendDouble(_ScriptedBase):
    """Speaks every unit (a 440 Hz tone, one unit long) until interrupted; then listens."""

    name: ClassVar[str] = "speak_until_interrupted_double"
    config_class = SpeakerDoubleConfig

    def __init__(self, config: SpeakerDoubleConfig) -> None:
        super().__init__(config.unit_ms)
        self.config = config

    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        # ``refuse_prompt``: a prompt that passes the node's checks but that the backend cannot
        # take (issue 15: a 1 MB prompt, a 70 s voice failed in the backend's prepare).
        if self.config.refuse_prompt and system_prompt == self.config.refuse_prompt:
            raise BackendError(f"cannot embed the prompt {system_prompt!r}")
        super().prepare(system_prompt, ref_voice)

    def generate(self) -> UnitResult:
        self._take()
        if self._interrupted.is_set():
            return UnitResult(is_listen=True)
        n = round(self.unit_ns * self.output_sample_rate / NS_PER_S)
        tone = 0.3 * np.sin(2 * np.pi * 440.0 * np.arange(n) / self.output_sample_rate)
        return UnitResult(is_listen=False, text=self.config.word, audio=tone.astype(np.float32))


@dataclass(frozen=True)
class BlockingDoubleConfig:
    """Attributes:
    control_dir: folder for the ``blocked`` / ``release`` / ``released`` files.
    block_unit: which ``generate()`` call since prepare() blocks (1 = the first).
    unit_ms: unit length.
    max_block_s: give up (BackendTimeout) if never released, so a broken test cannot hang.
    """

    control_dir: str = ""
    block_unit: int = 1
    unit_ms: int = 1000
    max_block_s: float = 60.0

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any] | None) -> BlockingDoubleConfig:
        config = from_mapping(cls, mapping)
        if not config.control_dir:
            raise ConfigError("blocking_double.control_dir must name a folder")
        return config


class BlockingBackendDouble(_ScriptedBase):
    """Blocks one ``generate()`` until the test releases it through a file; always listens."""

    name: ClassVar[str] = "blocking_double"
    config_class = BlockingDoubleConfig

    def __init__(self, config: BlockingDoubleConfig) -> None:
        super().__init__(config.unit_ms)
        self.config = config

    def generate(self) -> UnitResult:
        self._take()
        if self._units == self.config.block_unit:
            directory = self.config.control_dir
            _touch(os.path.join(directory, "blocked"))
            deadline = time.monotonic() + self.config.max_block_s
            release = os.path.join(directory, "release")
            while not os.path.exists(release):
                if time.monotonic() > deadline:
                    raise BackendTimeout("blocking_double was never released")
                time.sleep(0.01)
            _touch(os.path.join(directory, "released"))
        return UnitResult(is_listen=True)


def _touch(path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(str(os.getpid()))


@dataclass(frozen=True)
class FaultyDoubleConfig:
    """Attributes:
    control_dir: folder of fault switches, files the test creates and removes while the node
        runs: ``raise`` (every generate() raises BackendError), ``slow`` (generate() takes
        ``slow_ms``), ``down`` (prepare() and generate() raise BackendUnavailable: a vanished
        server), ``hang`` (generate() blocks until the file is removed).
    unit_ms: unit length.
    slow_ms: duration of a slow unit.
    load_ms: how long building the backend takes (a 9B model loads for minutes); the file
        ``loading`` in ``control_dir`` says it has begun.
    """

    control_dir: str = ""
    unit_ms: int = 1000
    slow_ms: int = 1500
    load_ms: int = 0

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any] | None) -> FaultyDoubleConfig:
        config = from_mapping(cls, mapping)
        if not config.control_dir:
            raise ConfigError("faulty_double.control_dir must name a folder")
        return config


class FaultyBackendDouble(_ScriptedBase):
    """Listens every unit, failing as the test's switch files say (a fault injector)."""

    name: ClassVar[str] = "faulty_double"
    config_class = FaultyDoubleConfig

    def __init__(self, config: FaultyDoubleConfig) -> None:
        super().__init__(config.unit_ms)
        self.config = config
        if config.load_ms:
            with open(os.path.join(config.control_dir, "loading"), "w"):
                pass
            time.sleep(config.load_ms / 1000)

    def _on(self, switch: str) -> bool:
        return os.path.exists(os.path.join(self.config.control_dir, switch))

    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        if self._on("down"):
            raise BackendUnavailable("faulty_double: the server is down")
        super().prepare(system_prompt, ref_voice)

    def generate(self) -> UnitResult:
        self._take()
        if self._on("down"):
            raise BackendUnavailable("faulty_double: the server vanished mid-session")
        if self._on("raise"):
            raise BackendError("faulty_double: injected backend exception")
        if self._on("slow"):
            time.sleep(self.config.slow_ms / 1000)
        deadline = time.monotonic() + 60
        while self._on("hang") and time.monotonic() < deadline:
            time.sleep(0.01)
        return UnitResult(is_listen=True)


@dataclass(frozen=True)
class TurnsDoubleConfig:
    """Attributes:
    pattern: one letter per unit, repeated: ``L`` listen, ``S`` speak one unit of tone, ``E``
        speak one unit and end the turn.
    unit_ms: unit length.
    min_compute_ms, max_compute_ms: each generate() takes a seeded uniform time in this range
        (a slow model: 400-800 ms a unit is a 9B model on a small GPU).
    seed: for the compute times.
    last_unit_speech_ms: how much speech an ``E`` unit returns (0: one unit), e.g. a long last
        sentence that is still playing seconds after the turn ended.
    """

    pattern: str = "LSE"
    unit_ms: int = 1000
    last_unit_speech_ms: int = 0  # speech an ``E`` unit returns; 0 = one unit
    min_compute_ms: int = 0
    max_compute_ms: int = 0
    seed: int = 0

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any] | None) -> TurnsDoubleConfig:
        config = from_mapping(cls, mapping)
        if not config.pattern or set(config.pattern) - set("LSE"):
            raise ConfigError("turns_double.pattern must be letters L, S, E")
        return config


class TurnsBackendDouble(_ScriptedBase):
    """Listens and speaks by a fixed pattern, slowly if asked; an interrupt makes it listen until
    the pattern's next turn starts (a new ``S``/``E`` after an ``L``)."""

    name: ClassVar[str] = "turns_double"
    config_class = TurnsDoubleConfig

    def __init__(self, config: TurnsDoubleConfig) -> None:
        super().__init__(config.unit_ms)
        self.config = config
        self._rng = np.random.default_rng(config.seed)

    def generate(self) -> UnitResult:
        self._take()
        cfg = self.config
        if cfg.max_compute_ms > 0:
            time.sleep(self._rng.uniform(cfg.min_compute_ms, cfg.max_compute_ms) / 1000)
        letter = cfg.pattern[(self._units - 1) % len(cfg.pattern)]
        if letter == "L":
            self._interrupted.clear()
            return UnitResult(is_listen=True)
        if self._interrupted.is_set():
            return UnitResult(is_listen=True)
        n = round(self.unit_ns * self.output_sample_rate / NS_PER_S)
        if letter == "E" and cfg.last_unit_speech_ms > 0:
            n = cfg.last_unit_speech_ms * self.output_sample_rate // 1000
        tone = 0.3 * np.sin(2 * np.pi * 440.0 * np.arange(n) / self.output_sample_rate)
        return UnitResult(False, "la ", tone.astype(np.float32), end_of_turn=letter == "E")


@dataclass(frozen=True)
class DownServerDoubleConfig:
    """Attributes:
    control_dir: ``prepare()`` fails (BackendUnavailable, like a client whose server is down)
        until the test creates ``<control_dir>/up``.
    unit_ms: unit length.
    """

    control_dir: str = ""
    unit_ms: int = 1000

    @classmethod
    def from_mapping(cls, mapping: dict[str, Any] | None) -> DownServerDoubleConfig:
        config = from_mapping(cls, mapping)
        if not config.control_dir:
            raise ConfigError("down_server_double.control_dir must name a folder")
        return config


class DownServerBackendDouble(_ScriptedBase):
    """A server backend whose server is down until the test says it is up; then it listens."""

    name: ClassVar[str] = "down_server_double"
    config_class = DownServerDoubleConfig

    def __init__(self, config: DownServerDoubleConfig) -> None:
        super().__init__(config.unit_ms)
        self.config = config

    def prepare(self, system_prompt: str, ref_voice: FloatArray | None = None) -> None:
        if not os.path.exists(os.path.join(self.config.control_dir, "up")):
            raise BackendUnavailable("connect to ws://127.0.0.1:9 failed: connection refused")
        super().prepare(system_prompt, ref_voice)

    def generate(self) -> UnitResult:
        self._take()
        return UnitResult(is_listen=True)
