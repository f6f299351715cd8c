"""A remembered echo path: the canceller and the barge-in detector start warm.

On a robot the loudspeaker and the microphone sit on its body, so the echo path of the last run is
the best guess for the next one. A cold start knows nothing: Speex needs seconds of our speech to
converge and the detector has no residual ratio to judge by, so a user who talks in the first
second of the robot's first turn is heard late or not at all (``aec_bench`` ``start`` trials:
14 of 20 at 0 dB SER, docs/BENCHMARKS.md).

While the flow runs, :class:`EchoPathRecorder` keeps the latest stretch (``aec.echo_path_seconds``)
of microphone audio that the detector judged echo only (no near-end frame, no filter reset, no
break in the stream), with the reference that played for it. When the flow stops it is written to
``aec.echo_path_file`` (:func:`save_echo_path`); when the flow starts again the file is read
(:func:`load_echo_path`) and, just before the first microphone block, :func:`warm_up` plays the
stretch through the canceller and the detector as if it had just been heard: the delay estimate,
the filter's adaptation, the replay and the learned residual ratio all come from the normal path.
Nothing of it reaches the timeline, the VAD or the model. If the robot moved, the first delay
estimates or the detector's own learning take over as after any change of the room.

The file holds up to ``echo_path_seconds`` of microphone audio of the robot's own echo (frames the
detector judged to be the user end the stretch) and is read with ``allow_pickle=False``; a file
that does not match the canceller's settings is refused with the reason, and the start is cold.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from omni_ros.core.aec import AecConfig, EchoCanceller
from omni_ros.core.bargein import BargeInDetector, FrameVerdict
from omni_ros.core.clock import NS_PER_S
from omni_ros.core.errors import ConfigError
from omni_ros.core.types import AudioBlock, FloatArray

Int16Array = npt.NDArray[np.int16]

ECHO_PATH_VERSION = 1
_MIN_ACTIVE_S = 1.0  # our speech must play for at least this much of a stretch worth keeping
_LEAD_EXTRA_MS = 100  # reference kept before the stretch beyond the longest echo delay
_WARM_BLOCK_MS = 100  # the stretch is played through in blocks of this length
_GOOD_EVERY_S = 0.25  # how often the newest qualifying window is kept while a stretch goes on
_ACTIVE = 1e-3  # a reference frame whose peak is above this can echo (as EchoCanceller counts)
_KEYS = ("version", "sample_rate", "frame_ms", "filter_ms", "delay_ns", "align_ns", "mic", "ref")


@dataclass(frozen=True)
class EchoPath:
    """A stretch of echo-only microphone audio and the reference that played for it.

    Attributes:
        sample_rate, frame_ms, filter_ms: the canceller settings it was recorded with.
        delay_ns: the canceller's delay estimate at the stretch's end.
        align_ns: how far back the canceller read the reference then.
        mic: the raw microphone stretch (whole canceller frames).
        ref: the reference at play time, starting ``lead`` samples before ``mic``'s first
            sample and ending with it.
        end_ns: where the stretch ended on the recording run's clock (0 once read from a file:
            only the run that heard it knows).
    """

    sample_rate: int
    frame_ms: int
    filter_ms: int
    delay_ns: int
    align_ns: int
    mic: Int16Array
    ref: Int16Array
    end_ns: int = 0

    @property
    def lead(self) -> int:
        """Reference samples before the microphone stretch's first sample."""
        return len(self.ref) - len(self.mic)

    @property
    def seconds(self) -> float:
        return len(self.mic) / self.sample_rate

    def describe(self) -> str:
        return f"{self.seconds:.1f} s, delay {self.delay_ns / 1e6:.0f} ms"


def _lead_samples(config: AecConfig) -> int:
    ms = config.max_delay_ms + config.echo_tail_ms + _LEAD_EXTRA_MS
    return config.sample_rate * ms // 1000


def _to_int16(x: FloatArray) -> Int16Array:
    return (np.clip(np.nan_to_num(x), -1.0, 1.0) * 32767.0).astype(np.int16)


def _active_seconds(ref: FloatArray, frame_len: int, rate: int) -> float:
    n = len(ref) // frame_len
    if n == 0:
        return 0.0
    peaks = np.abs(ref[: n * frame_len].reshape(n, frame_len)).max(axis=1)
    return float(np.count_nonzero(peaks > _ACTIVE)) * frame_len / rate


# ------------------------------------------------------------------------------------------ file
def save_echo_path(path: EchoPath, file: str | os.PathLike[str]) -> None:
    """Write ``path`` to ``file`` (an ``.npz``), atomically: a reader sees the old file or the new.

    Raises:
        OSError: the folder cannot be written.
    """
    target = Path(file).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".echo_path.", suffix=".npz", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(
                out,
                version=np.int64(ECHO_PATH_VERSION),
                sample_rate=np.int64(path.sample_rate),
                frame_ms=np.int64(path.frame_ms),
                filter_ms=np.int64(path.filter_ms),
                delay_ns=np.int64(path.delay_ns),
                align_ns=np.int64(path.align_ns),
                mic=path.mic,
                ref=path.ref,
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_echo_path(file: str | os.PathLike[str], config: AecConfig) -> EchoPath:
    """Read a remembered echo path and check it against the canceller's settings.

    Raises:
        FileNotFoundError: there is no such file (nothing was remembered yet).
        ConfigError: the file is not one :func:`save_echo_path` wrote for these settings; the
            message says what is wrong.
    """
    name = os.path.expanduser(os.fspath(file))
    try:
        with np.load(name, allow_pickle=False) as data:
            missing = [k for k in _KEYS if k not in data.files]
            if missing:
                raise ConfigError(f"echo path file {name}: missing {missing}")
            fields = {k: data[k] for k in _KEYS}
    except FileNotFoundError:
        raise
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError) as exc:  # not an npz, truncated, pickled objects
        raise ConfigError(f"echo path file {name}: not readable as .npz ({exc})") from exc
    scalars = {}
    for key in _KEYS[:6]:
        value = fields[key]
        if value.shape != () or value.dtype.kind not in "iu":
            raise ConfigError(f"echo path file {name}: {key} must be an integer scalar")
        scalars[key] = int(value)
    if scalars["version"] != ECHO_PATH_VERSION:
        raise ConfigError(
            f"echo path file {name}: version {scalars['version']}, this omni_ros reads "
            f"{ECHO_PATH_VERSION}"
        )
    wanted = {
        "sample_rate": config.sample_rate,
        "frame_ms": config.frame_ms,
        "filter_ms": config.filter_ms,
    }
    for key, value in wanted.items():
        if scalars[key] != value:
            raise ConfigError(
                f"echo path file {name}: recorded with aec.{key} = {scalars[key]}, now {value}"
            )
    mic, ref = fields["mic"], fields["ref"]
    for key, arr in (("mic", mic), ("ref", ref)):
        if arr.dtype != np.int16 or arr.ndim != 1:
            raise ConfigError(f"echo path file {name}: {key} must be 1-D int16 audio")
    rate = config.sample_rate
    if len(mic) % config.frame_len or not rate * _MIN_ACTIVE_S <= len(mic) <= rate * 30:
        raise ConfigError(
            f"echo path file {name}: {len(mic)} microphone samples; need whole "
            f"{config.frame_ms} ms frames, 1 to 30 s"
        )
    if len(ref) != len(mic) + _lead_samples(config):
        raise ConfigError(
            f"echo path file {name}: {len(ref)} reference samples for {len(mic)} microphone "
            f"ones; expected {len(mic) + _lead_samples(config)} (aec.max_delay_ms or "
            "aec.echo_tail_ms changed since it was written)"
        )
    max_ns = config.max_delay_ms * 1_000_000
    if not 0 <= scalars["delay_ns"] <= max_ns or not 0 <= scalars["align_ns"] <= max_ns:
        raise ConfigError(
            f"echo path file {name}: delay {scalars['delay_ns']} ns / alignment "
            f"{scalars['align_ns']} ns outside 0..aec.max_delay_ms"
        )
    return EchoPath(
        sample_rate=scalars["sample_rate"],
        frame_ms=scalars["frame_ms"],
        filter_ms=scalars["filter_ms"],
        delay_ns=scalars["delay_ns"],
        align_ns=scalars["align_ns"],
        mic=np.ascontiguousarray(mic),
        ref=np.ascontiguousarray(ref),
    )


# -------------------------------------------------------------------------------------- recorder
class EchoPathRecorder:
    """Keeps the latest stretch of echo-only microphone audio while the canceller runs.

    Call :meth:`add` after every block the canceller and the detector processed. A stretch ends
    at a near-end frame (the part before it counts), a break in the stream, or a filter reset
    (a new echo path). The newest window of ``echo_path_seconds`` in which our speech played for
    at least a second is what :meth:`snapshot` returns (a robot that fell silent keeps the
    stretch it spoke in, not the silence after it).

    Args:
        config: the canceller settings (``echo_path_seconds``, ``max_delay_ms``,
            ``echo_tail_ms``, ``sample_rate``, ``frame_ms``).
    """

    def __init__(self, config: AecConfig) -> None:
        self.config = config
        self._rate = config.sample_rate
        self._lead = _lead_samples(config)
        self._lead_ns = round(self._lead * NS_PER_S / self._rate)
        self._cap = round(config.echo_path_seconds * self._rate)
        # (stamp, mic, reference a lead earlier, seconds of our speech echoing into it)
        self._blocks: list[tuple[int, FloatArray, FloatArray, float]] = []
        self._samples = 0
        self._active = 0.0
        self._end_ns: int | None = None
        self._resets: tuple[int, int] = (0, 0)
        self._best: EchoPath | None = None
        # the newest qualifying window of the current stretch, built (with its reference's
        # tail) at most every _GOOD_EVERY_S of microphone time, while the canceller has it
        self._good: EchoPath | None = None
        self._good_ns = 0

    def reset(self) -> None:
        """Forget the stretches (the stream and the canceller started over)."""
        self._blocks, self._samples, self._active, self._end_ns = [], 0, 0.0, None
        self._best, self._good, self._good_ns = None, None, 0

    def add(
        self, echo: EchoCanceller, cleaned: AudioBlock, verdicts: Sequence[FrameVerdict]
    ) -> None:
        """Take the block the canceller just returned (``cleaned``; its raw input is
        ``echo.last_mic``) and the detector's verdicts on it."""
        mic = echo.last_mic
        if len(mic) == 0:
            return
        resets = (echo.filter_resets, echo.full_resets)
        if self._blocks and (
            resets != self._resets
            or self._end_ns is None
            or abs(cleaned.stamp_ns - self._end_ns) > NS_PER_S // self._rate
        ):
            self._finish(echo, None)
        near = [v.start_ns for v in verdicts if v.near_end]
        if near:
            self._finish(echo, min(near))
            return
        self._resets = resets
        stamp = cleaned.stamp_ns
        ref = echo.reference_window(stamp - self._lead_ns, len(mic))
        played = echo.reference_window(stamp - echo.delay_ns, len(mic))
        active = _active_seconds(played, self.config.frame_len, self._rate)
        self._blocks.append((stamp, mic.copy(), ref, active))
        self._samples += len(mic)
        self._active += active
        self._end_ns = stamp + round(len(mic) * NS_PER_S / self._rate)
        while self._blocks and self._samples - len(self._blocks[0][1]) >= self._cap:
            _, old, _, old_active = self._blocks.pop(0)
            self._samples -= len(old)
            self._active -= old_active
        if (
            self._samples >= self._cap
            and self._active >= _MIN_ACTIVE_S
            and echo.delay_estimates
            and self._end_ns - self._good_ns >= _GOOD_EVERY_S * NS_PER_S
        ):
            self._good = self._build(echo, self._blocks, echo.delay_ns, echo.align_ns)
            self._good_ns = self._end_ns

    def snapshot(self, echo: EchoCanceller) -> EchoPath | None:
        """The newest stretch worth remembering, or None."""
        if self._active >= _MIN_ACTIVE_S and echo.delay_estimates:
            return self._build(echo, self._blocks, echo.delay_ns, echo.align_ns)
        return self._good if self._good is not None else self._best

    def why_nothing(self, echo: EchoCanceller) -> str:
        """Why :meth:`snapshot` has nothing (for the log and diagnostics)."""
        if echo.delay_estimates == 0:
            return (
                "nothing: no echo delay estimate yet ("
                f"{echo.delay_rejected_no_echo} refused for lack of echo coherence)"
            )
        return (
            f"nothing: no echo-only stretch with {_MIN_ACTIVE_S:g} s of our speech "
            f"({self._active:.1f} s in the current one)"
        )

    def _finish(self, echo: EchoCanceller, cut_ns: int | None) -> None:
        """End the current stretch (at ``cut_ns``: blocks reaching past it are dropped)."""
        blocks = self._blocks
        if cut_ns is not None:
            rate = self._rate
            blocks = [b for b in blocks if b[0] + round(len(b[1]) * NS_PER_S / rate) <= cut_ns]
        if sum(b[3] for b in blocks) >= _MIN_ACTIVE_S and echo.delay_estimates:
            self._best = self._build(echo, blocks, echo.delay_ns, echo.align_ns)
        elif self._good is not None:
            self._best = self._good
        self._blocks, self._samples, self._active, self._end_ns = [], 0, 0.0, None
        self._good, self._good_ns = None, 0

    def _build(
        self,
        echo: EchoCanceller,
        blocks: list[tuple[int, FloatArray, FloatArray, float]],
        delay_ns: int,
        align_ns: int,
    ) -> EchoPath | None:
        cfg = self.config
        mic = np.concatenate([b[1] for b in blocks])
        ref = np.concatenate([b[2] for b in blocks])
        keep = (min(len(mic), self._cap) // cfg.frame_len) * cfg.frame_len
        if keep == 0:
            return None
        mic, ref = mic[len(mic) - keep :], ref[len(ref) - keep :]
        end_ns = blocks[-1][0] + round(len(blocks[-1][1]) * NS_PER_S / self._rate)
        # The reference stored with each block lags it by the lead; the last lead's worth is
        # still in the canceller (it keeps more than a lead of the past).
        tail = echo.reference_window(end_ns - self._lead_ns, self._lead)
        return EchoPath(
            sample_rate=cfg.sample_rate,
            frame_ms=cfg.frame_ms,
            filter_ms=cfg.filter_ms,
            delay_ns=delay_ns,
            align_ns=align_ns,
            mic=_to_int16(mic),
            ref=_to_int16(np.concatenate([ref, tail])),
            end_ns=end_ns,
        )


# --------------------------------------------------------------------------------------- warm up
def warm_up(
    path: EchoPath,
    end_ns: int,
    echo: EchoCanceller,
    bargein: BargeInDetector | None,
    passes: int = 1,
) -> None:
    """Play ``path`` through a fresh canceller (and detector) ``passes`` times, the last pass
    ending at ``end_ns``, where the real stream begins: both continue from it as if they had
    just heard it. Passes lie a reference lead apart (the stream restarts between them, the
    filter and what the detector learned stay), so each pass's reference is its own.

    Raises:
        ConfigError: ``path`` was recorded with other canceller settings (see
            :func:`load_echo_path`), or the canceller has already heard audio.
    """
    cfg = echo.config
    if (path.sample_rate, path.frame_ms, path.filter_ms) != (
        cfg.sample_rate,
        cfg.frame_ms,
        cfg.filter_ms,
    ) or path.lead != _lead_samples(cfg):
        raise ConfigError("warm_up: the echo path was recorded with other aec settings")
    if echo.state.mic_anchor_ns is not None:
        raise ConfigError("warm_up: the canceller has heard audio already; warm it before that")
    rate = cfg.sample_rate
    span_ns = round(len(path.mic) * NS_PER_S / rate)
    lead_ns = round(path.lead * NS_PER_S / rate)
    echo.preset_delay(path.delay_ns, path.align_ns)
    mic = path.mic.astype(np.float32) / 32768.0
    ref = path.ref.astype(np.float32) / 32768.0
    step = max(cfg.frame_len, rate * _WARM_BLOCK_MS // 1000 // cfg.frame_len * cfg.frame_len)
    for k in range(max(1, passes)):
        start_ns = end_ns - (passes - k) * span_ns - (passes - 1 - k) * 2 * lead_ns
        echo.write_reference(start_ns - lead_ns, ref)
        for i in range(0, len(mic), step):
            stamp = start_ns + round(i * NS_PER_S / rate)
            cleaned = echo.process(AudioBlock(stamp, rate, mic[i : i + step]))
            if bargein is not None and len(cleaned.samples):
                bargein.process(cleaned, echo.last_mic, echo)
    if bargein is not None:
        bargein.end_run()


__all__ = [
    "ECHO_PATH_VERSION",
    "EchoPath",
    "EchoPathRecorder",
    "load_echo_path",
    "save_echo_path",
    "warm_up",
]
