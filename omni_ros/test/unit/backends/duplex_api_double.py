"""Test doubles of MiniCPM-o 4.5's duplex API: ``DuplexApiDouble`` and ``ModelDouble``.

These are NOT the model. They behave like the documented ``MiniCPMODuplex`` object of the model's
remote code (facts: ``/work/shared/notes/minicpmo-duplex-api.md``), so that the real adapter,
``omni_ros.backends.minicpmo``, can be tested here without weights or a GPU. Every behaviour below is
one the notes describe; where the notes are silent the double says so in a comment marked
``ASSUMPTION``.

What the double reproduces:

- ``prepare()`` wraps the prompt in ``<|im_start|>system\\n ... <|im_end|>`` itself (a pre-wrapped
  prompt is wrapped twice), clears break/stop, resets the unit counter, audio buffer and turn state,
  drops unknown keyword arguments; without ``prompt_wav_path`` speech audio is always ``None``.
- ``streaming_prefill()``: float32 1-D audio (int16 is accepted and silently mis-scaled, 2-D raises
  inside numpy); the first unit is left-padded to 16,560 samples and consumes 16,560, later calls
  consume 16,000; leftovers carry over and only ONE unit is consumed per call, so extra audio becomes a
  backlog (recorded in :attr:`DuplexApiDouble.backlog_samples` / ``max_backlog_samples``); frames must
  be ``PIL.Image`` (numpy arrays fail); no input -> ``success False``; break/stop set ->
  ``success False`` with no side effects; ``<unit>`` is fed before validation, so a failed call leaves a
  stray ``<unit>`` (counted in ``stray_unit_tokens``).
- ``streaming_generate()`` always returns the 12 keys; break/stop set -> listen, 24,000 zeros,
  ``end_of_turn True``; no pending prefill -> listen, zeros, ``end_of_turn False``, no state change;
  the first ``force_listen_count`` generates are forced listen; listen units return 24,000 zeros;
  speech is ``None`` while the TTS buffer fills, then ~24,000 samples per unit (the first chunk of a
  turn longer, the last shorter); the model cannot switch to listen mid-turn; an unknown
  ``decode_mode`` raises ``ValueError``.
- Controls are ``threading.Event`` objects, safe from another thread, checked only when a call starts.
- Speak/listen decisions come from a script (:class:`Speak` items and :data:`LISTEN`).
- Fault injection per method (:class:`Fault`: delay, exception, hang until released) and a
  ``result_mutator`` to return malformed results; re-entrant calls are counted (the real object is not
  re-entrant).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from PIL import Image

_LOG = logging.getLogger(__name__)

FIRST_UNIT_SAMPLES: Final = 16_560
UNIT_SAMPLES: Final = 16_000
OUTPUT_UNIT_SAMPLES: Final = 24_000
OUTPUT_SAMPLE_RATE: Final = 24_000
DEFAULT_PROMPT: Final = "Streaming Omni Conversation."
#: Tokens one frame costs in the KV cache (1 slice, 64 resampler queries).
FRAME_TOKENS: Final = 64
#: Audio tokens per 1 s unit (50 Whisper frames/s pooled by 5).
AUDIO_TOKENS_PER_UNIT: Final = 10
GENERATE_KEYS: Final = (
    "is_listen",
    "text",
    "audio_waveform",
    "end_of_turn",
    "current_time",
    "cost_llm",
    "cost_tts_prep",
    "cost_tts",
    "cost_token2wav",
    "cost_all",
    "n_tokens",
    "n_tts_tokens",
)

LISTEN: Final = "listen"


@dataclass(frozen=True)
class Speak:
    """A scripted speak decision: the unit's text and whether it ends the turn."""

    text: str = ""
    end_of_turn: bool = False


Decision = Speak | str


@dataclass
class Fault:
    """Fault injected into one method of the double.

    Attributes:
        delay_s: sleep this long at the start of each call.
        exception: raise this at the start of each call (after the delay).
        hang: block until :attr:`DuplexApiDouble.release` is set (a hung CUDA kernel, a deadlock).
        times: how many calls the fault applies to (None = every call).
    """

    delay_s: float = 0.0
    exception: BaseException | None = None
    hang: bool = False
    times: int | None = None


@dataclass
class _DecoderDouble:
    """Stands in for ``duplex.decoder``: records the sliding-window calls."""

    window_config: dict[str, Any] = field(default_factory=dict)
    window_enabled: bool | None = None

    def set_window_config(self, **kwargs: Any) -> None:
        self.window_config.update(kwargs)

    def set_window_enabled(self, enabled: bool) -> None:
        self.window_enabled = bool(enabled)


class DuplexApiDouble:
    """A test double of the HF remote code's ``MiniCPMODuplex`` (see the module docstring).

    Args:
        script: speak/listen decisions, consumed one per generate that is not forced listen; when it
            runs out the model listens.
        force_listen_count: the first N generates after prepare() are forced listen.
        tts_fill_units: speech units of a turn whose audio is ``None`` while the TTS buffer fills.
        sliding_window_mode: as given to ``as_duplex``.
        cost_s: every ``cost_*`` value reported, in seconds.
        **as_duplex_kwargs: everything else ``as_duplex`` received (recorded).
    """

    def __init__(
        self,
        *,
        script: Iterable[Decision] = (),
        force_listen_count: int = 0,
        tts_fill_units: int = 1,
        sliding_window_mode: str = "off",
        cost_s: float = 0.01,
        **as_duplex_kwargs: Any,
    ) -> None:
        self.script: list[Decision] = list(script)
        self.force_listen_count = int(force_listen_count)
        self.tts_fill_units = int(tts_fill_units)
        self.sliding_window_mode = sliding_window_mode
        self.cost_s = float(cost_s)
        self.as_duplex_kwargs = dict(as_duplex_kwargs)
        self.decoder = _DecoderDouble()

        self._break = threading.Event()
        self._stop = threading.Event()

        # Test hooks.
        self.faults: dict[str, Fault] = {}
        self.release = threading.Event()
        self.result_mutator: Callable[[dict[str, Any]], Any] | None = None
        self.prefill_result_mutator: Callable[[dict[str, Any]], Any] | None = None

        # Records.
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.prepare_count = 0
        self.reentrant_calls = 0
        self.max_backlog_samples = 0
        self.consumed_unit_lengths: list[int] = []
        self.delivered_audio_lengths: list[int] = []
        self.non_float32_audio_calls = 0
        self.short_unit_pads = 0
        self.stray_unit_tokens = 0
        self.frames_seen: list[Image.Image] = []
        self.texts_seen: list[str] = []
        self.break_noops = 0
        self.generates_without_prefill = 0
        self.prefills_without_generate = 0
        self._active = 0
        self._active_lock = threading.Lock()

        # Session state (reset by prepare()).
        self.wrapped_prompt = ""
        self.ref_audio: np.ndarray | None = None
        self.prompt_wav_path: str | None = None
        self._reset_session()

    # ------------------------------------------------------------------------------------ session
    def _reset_session(self) -> None:
        self.kv_tokens = 0
        self.backlog = np.zeros(0, dtype=np.float32)
        self.first_unit_pending = True
        self.pending_prefill = False
        self.generate_count = 0
        self.current_time = 0
        self.in_turn = False
        self.turn_units = 0
        self.audio_chunks_in_turn = 0
        self._script_pos = 0

    @property
    def backlog_samples(self) -> int:
        """Samples received but not yet consumed (the carry-over the real object keeps)."""
        return int(self.backlog.size)

    def prepare(
        self,
        prefix_system_prompt: str | None = None,
        ref_audio: np.ndarray | None = None,
        prompt_wav_path: str | None = None,
        context_previous_marker: str = "",
        **unknown: Any,
    ) -> None:
        """Start a session (unknown keyword arguments are silently dropped, like the real one)."""
        with self._call(
            "prepare",
            prefix_system_prompt=prefix_system_prompt,
            ref_audio=ref_audio,
            prompt_wav_path=prompt_wav_path,
            **unknown,
        ):
            self.prepare_count += 1
            text = prefix_system_prompt if prefix_system_prompt is not None else DEFAULT_PROMPT
            # The API wraps the prompt itself: a caller's pre-wrapped prompt ends up wrapped twice.
            self.wrapped_prompt = f"<|im_start|>system\n{text}<|im_end|>"
            self.ref_audio = None if ref_audio is None else np.asarray(ref_audio)
            self.prompt_wav_path = prompt_wav_path
            if prompt_wav_path is None:
                _LOG.warning("no prompt_wav_path: speech audio will be None")
            self._break.clear()
            self._stop.clear()
            self._reset_session()
            ref_units = 0 if self.ref_audio is None else -(-self.ref_audio.size // UNIT_SAMPLES)
            self.kv_tokens = len(self.wrapped_prompt.split()) + AUDIO_TOKENS_PER_UNIT * ref_units

    # ------------------------------------------------------------------------------------ prefill
    def streaming_prefill(
        self,
        audio_waveform: np.ndarray | None = None,
        frame_list: list[Any] | None = None,
        text_list: list[str] | None = None,
        max_slice_nums: int = 1,
        batch_vision_feed: bool = False,
    ) -> dict[str, Any]:
        """Feed one unit (consumes at most one unit of audio per call)."""
        with self._call(
            "streaming_prefill",
            audio_waveform=audio_waveform,
            frame_list=frame_list,
            text_list=text_list,
            max_slice_nums=max_slice_nums,
        ):
            if self._stop.is_set() or self._break.is_set():
                self.break_noops += 1
                reason = "session stopped" if self._stop.is_set() else "break event set"
                return self._prefill_result(False, reason)
            # The real code feeds <unit> before it validates anything.
            self.kv_tokens += 1
            if audio_waveform is None and not frame_list and not text_list:
                self.stray_unit_tokens += 1
                return self._prefill_result(False, "no input")
            if self.pending_prefill:
                self.prefills_without_generate += 1
            if frame_list:
                for frame in frame_list:
                    if not isinstance(frame, Image.Image):
                        self.stray_unit_tokens += 1
                        # What the real image processor does with a numpy array.
                        raise AttributeError(
                            f"'{type(frame).__name__}' object has no attribute 'convert'"
                        )
                    self.frames_seen.append(frame)
                    self.kv_tokens += FRAME_TOKENS
            if audio_waveform is not None:
                self._consume_audio(audio_waveform)
            if text_list:
                self.texts_seen.extend(text_list)
                self.kv_tokens += sum(len(t.split()) for t in text_list)
            self.pending_prefill = True
            return self._prefill_result(True, "")

    def _consume_audio(self, audio_waveform: Any) -> None:
        audio = np.asarray(audio_waveform)
        if audio.ndim != 1:
            # The real code hits a numpy broadcasting error on 2-D input.
            raise ValueError(
                f"operands could not be broadcast together with shapes {audio.shape} (160,)"
            )
        if audio.dtype != np.float32:
            # Unchecked: int16 goes through unscaled (values up to 32767 instead of 1.0).
            self.non_float32_audio_calls += 1
        self.delivered_audio_lengths.append(int(audio.size))
        self.backlog = np.concatenate([self.backlog, audio.astype(np.float32)])
        need = FIRST_UNIT_SAMPLES if self.first_unit_pending else UNIT_SAMPLES
        if self.backlog.size < need:
            # The notes document the left-pad for the first unit only. ASSUMPTION: a short later
            # unit is padded the same way (counted, so a test can insist it never happens).
            if not self.first_unit_pending:
                self.short_unit_pads += 1
            pad = np.zeros(need - self.backlog.size, dtype=np.float32)
            self.backlog = np.concatenate([pad, self.backlog])
        self.consumed_unit_lengths.append(need)
        self.backlog = self.backlog[need:]
        self.max_backlog_samples = max(self.max_backlog_samples, int(self.backlog.size))
        self.first_unit_pending = False
        self.kv_tokens += AUDIO_TOKENS_PER_UNIT

    def _prefill_result(self, success: bool, reason: str) -> dict[str, Any]:
        cost = self.cost_s if success else 0.0
        result: dict[str, Any] = {
            "success": success,
            "reason": reason,
            "cost_vision_process": cost,
            "cost_vision_embed": cost,
            "cost_vision_feed": cost,
            "cost_audio_process": cost,
            "cost_audio_embed": cost,
            "cost_audio_feed": cost,
            "cost_all": 6 * cost,
        }
        if self.prefill_result_mutator is not None:
            mutated: dict[str, Any] = self.prefill_result_mutator(result)
            return mutated
        return result

    # ----------------------------------------------------------------------------------- generate
    def streaming_generate(
        self,
        prompt_wav_path: str | None = None,
        max_new_speak_tokens_per_chunk: int = 20,
        decode_mode: str = "sampling",
        temperature: float = 0.7,
        top_k: int = 100,
        top_p: float = 0.8,
        listen_prob_scale: float = 1.0,
        listen_top_k: int | None = None,
        text_repetition_penalty: float = 1.05,
        text_repetition_window_size: int = 512,
    ) -> Any:
        """Decide listen/speak for the pending unit and return the 12-key result."""
        with self._call(
            "streaming_generate",
            prompt_wav_path=prompt_wav_path,
            max_new_speak_tokens_per_chunk=max_new_speak_tokens_per_chunk,
            decode_mode=decode_mode,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            listen_prob_scale=listen_prob_scale,
            listen_top_k=listen_top_k,
            text_repetition_penalty=text_repetition_penalty,
            text_repetition_window_size=text_repetition_window_size,
        ):
            return self._generate(decode_mode, force_listen_override=False)

    def _generate(self, decode_mode: str, *, force_listen_override: bool) -> Any:
        if decode_mode not in ("sampling", "greedy"):
            raise ValueError(f"Unknown decode_mode: {decode_mode}")
        if self._stop.is_set() or self._break.is_set():
            self.break_noops += 1
            return self._finish(self._listen(end_of_turn=True, cost=0.0))
        if not self.pending_prefill:
            self.generates_without_prefill += 1
            return self._finish(self._listen(end_of_turn=False, cost=0.0))
        self.pending_prefill = False
        self.generate_count += 1
        self.current_time += 1
        if force_listen_override:
            return self._finish(self._close_turn_by_override())
        if self.generate_count <= self.force_listen_count:
            return self._finish(self._listen(end_of_turn=False, cost=self.cost_s))
        decision: Decision = LISTEN
        if self._script_pos < len(self.script):
            decision = self.script[self._script_pos]
            self._script_pos += 1
        if decision == LISTEN and self.in_turn:
            # The model cannot switch to listen mid-turn: the sample becomes <|tts_bos|>.
            decision = Speak("")
        if isinstance(decision, Speak):
            return self._finish(self._speak(decision))
        self.kv_tokens += 1
        return self._finish(self._listen(end_of_turn=False, cost=self.cost_s))

    def _close_turn_by_override(self) -> dict[str, Any]:
        """Only the demo API has this: feed <|turn_eos|> and reset the TTS state."""
        was_in_turn = self.in_turn
        self.in_turn = False
        self.turn_units = 0
        self.audio_chunks_in_turn = 0
        self.kv_tokens += 1
        return self._listen(end_of_turn=was_in_turn, cost=self.cost_s)

    def _speak(self, decision: Speak) -> dict[str, Any]:
        self.in_turn = True
        self.turn_units += 1
        n_tokens = 1 + len(decision.text.split()) + 1
        self.kv_tokens += n_tokens
        audio: np.ndarray | None = None
        if self.prompt_wav_path is not None and self.turn_units > self.tts_fill_units:
            if self.audio_chunks_in_turn == 0:
                length = OUTPUT_UNIT_SAMPLES + 4_800  # the first chunk of a turn is longer
            elif decision.end_of_turn:
                length = OUTPUT_UNIT_SAMPLES // 2  # the last one may be shorter
            else:
                length = OUTPUT_UNIT_SAMPLES
            t = np.arange(length, dtype=np.float32) / OUTPUT_SAMPLE_RATE
            audio = (0.2 * np.sin(2.0 * np.pi * 220.0 * t)).astype(np.float32)
            self.audio_chunks_in_turn += 1
        if decision.end_of_turn:
            self.in_turn = False
            self.turn_units = 0
            self.audio_chunks_in_turn = 0
        return self._result(
            is_listen=False,
            text=decision.text,
            audio=audio,
            end_of_turn=decision.end_of_turn,
            cost=self.cost_s,
            n_tokens=n_tokens,
            n_tts_tokens=0 if audio is None else 25,
        )

    def _listen(self, *, end_of_turn: bool, cost: float) -> dict[str, Any]:
        return self._result(
            is_listen=True,
            text="",
            audio=np.zeros(OUTPUT_UNIT_SAMPLES, dtype=np.float32),
            end_of_turn=end_of_turn,
            cost=cost,
            n_tokens=1 if cost else 0,
            n_tts_tokens=0,
        )

    def _result(
        self,
        *,
        is_listen: bool,
        text: str,
        audio: np.ndarray | None,
        end_of_turn: bool,
        cost: float,
        n_tokens: int,
        n_tts_tokens: int,
    ) -> dict[str, Any]:
        return {
            "is_listen": is_listen,
            "text": text,
            "audio_waveform": audio,
            "end_of_turn": end_of_turn,
            "current_time": self.current_time,
            "cost_llm": cost,
            "cost_tts_prep": cost,
            "cost_tts": cost,
            "cost_token2wav": cost,
            "cost_all": 4 * cost,
            "n_tokens": n_tokens,
            "n_tts_tokens": n_tts_tokens,
        }

    def _finish(self, result: dict[str, Any]) -> Any:
        if self.result_mutator is not None:
            return self.result_mutator(result)
        return result

    # ----------------------------------------------------------------------------------- controls
    def set_break_event(self) -> None:
        self._break.set()

    def clear_break_event(self) -> None:
        self._break.clear()

    def is_break_set(self) -> bool:
        return self._break.is_set()

    def set_session_stop(self) -> None:
        self._stop.set()

    def clear_session_stop(self) -> None:
        self._stop.clear()

    def is_session_stop_set(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------------------- test hooks
    def method_calls(self, name: str) -> list[dict[str, Any]]:
        """Keyword arguments of every call to ``name``, oldest first."""
        return [kwargs for method, kwargs in self.calls if method == name]

    def _call(self, name: str, **kwargs: Any) -> _CallScope:
        return _CallScope(self, name, kwargs)


class _CallScope:
    """Records a call, applies its fault, and counts re-entrant calls."""

    def __init__(self, double: DuplexApiDouble, name: str, kwargs: dict[str, Any]) -> None:
        self._double = double
        self._name = name
        self._kwargs = kwargs

    def __enter__(self) -> None:
        double = self._double
        with double._active_lock:
            if double._active:
                double.reentrant_calls += 1
            double._active += 1
        double.calls.append((self._name, self._kwargs))
        fault = double.faults.get(self._name)
        if fault is None or fault.times == 0:
            return
        if fault.times is not None:
            fault.times -= 1
        try:
            if fault.delay_s:
                time.sleep(fault.delay_s)
            if fault.hang:
                double.release.wait()
            if fault.exception is not None:
                raise fault.exception
        except BaseException:
            self._leave()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self._leave()

    def _leave(self) -> None:
        with self._double._active_lock:
            self._double._active -= 1


class DemoDuplexApiDouble(DuplexApiDouble):
    """The official demo's ``DuplexCapability`` variant: ``streaming_generate`` also takes
    ``length_penalty`` and ``force_listen_override`` (which closes a spoken turn by feeding
    ``<|turn_eos|>`` and resetting the TTS state)."""

    def streaming_generate(
        self,
        prompt_wav_path: str | None = None,
        max_new_speak_tokens_per_chunk: int = 20,
        decode_mode: str = "sampling",
        temperature: float = 0.7,
        top_k: int = 100,
        top_p: float = 0.8,
        listen_prob_scale: float = 1.0,
        listen_top_k: int | None = None,
        text_repetition_penalty: float = 1.05,
        text_repetition_window_size: int = 512,
        length_penalty: float = 1.1,
        force_listen_override: bool = False,
    ) -> Any:
        with self._call(
            "streaming_generate",
            decode_mode=decode_mode,
            temperature=temperature,
            top_k=top_k,
            length_penalty=length_penalty,
            force_listen_override=force_listen_override,
        ):
            return self._generate(decode_mode, force_listen_override=force_listen_override)


class ModelDouble:
    """A test double of the loaded model: ``as_duplex()`` returns a :class:`DuplexApiDouble`.

    Args:
        duplex_class: the double class ``as_duplex`` builds.
        as_duplex_error: raised by ``as_duplex`` (e.g. the ImportError a missing stepaudio2 gives).
        **double_kwargs: passed to the double (``script``, ``tts_fill_units``, ``cost_s``).
    """

    def __init__(
        self,
        duplex_class: type[DuplexApiDouble] = DuplexApiDouble,
        as_duplex_error: BaseException | None = None,
        **double_kwargs: Any,
    ) -> None:
        self.duplex_class = duplex_class
        self.as_duplex_error = as_duplex_error
        self.double_kwargs = double_kwargs
        self.init_tts_calls = 0
        self.as_duplex_calls: list[dict[str, Any]] = []
        self.duplex: DuplexApiDouble | None = None

    def init_tts(self) -> None:
        self.init_tts_calls += 1

    def eval(self) -> ModelDouble:
        return self

    def to(self, device: Any) -> ModelDouble:
        return self

    def as_duplex(self, device: Any = None, **kwargs: Any) -> DuplexApiDouble:
        self.as_duplex_calls.append({"device": device, **kwargs})
        # The real as_duplex always calls init_tts(), which is where a missing stepaudio2 surfaces.
        self.init_tts()
        if self.as_duplex_error is not None:
            raise self.as_duplex_error
        as_duplex_kwargs = dict(kwargs)
        force_listen_count = int(as_duplex_kwargs.pop("force_listen_count", 0))
        sliding_window_mode = str(as_duplex_kwargs.pop("sliding_window_mode", "off"))
        self.duplex = self.duplex_class(
            force_listen_count=force_listen_count,
            sliding_window_mode=sliding_window_mode,
            **as_duplex_kwargs,
            **self.double_kwargs,
        )
        return self.duplex
