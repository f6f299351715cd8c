"""Test doubles of MiniCPM-o 4.5's duplex API: ``DuplexApiDouble`` and ``ModelDouble``.

These are NOT the model. They behave like the ``MiniCPMODuplex`` object of the model's remote code,
so that the real adapter, ``omni_ros.backends.minicpmo``, can be tested here without weights or a GPU.
Each behaviour was read in the upstream code and measured by running it on the CPU with tiny random
weights (``omni-ros check-model``). Citations: ``modeling_minicpmo.py:N`` is line N of the HF remote
code's ``modeling_minicpmo.py`` (the public copy with ``as_duplex``: ZZQ987/Interaction_Train @
4e331681); ``processing_minicpmo.py:N`` and ``utils.py:N`` are lines of OpenBMB/MiniCPM-o-Demo @
28b60cfb, folder ``MiniCPMO45/``. Where the double goes beyond what was read or measured it says so in
a comment marked ``ASSUMPTION``.

What the double reproduces:

- ``prepare()`` wraps the prompt in ``<|im_start|>system\\n ... <|im_end|>`` itself (a pre-wrapped
  prompt is wrapped twice), clears break/stop, resets the unit counter, audio buffer and turn state,
  drops unknown keyword arguments (modeling_minicpmo.py:2692-2775); it does NOT clear the model's
  Whisper streaming cache (``audio_past_key_values``, only ``reset_session`` does: :176-178); without
  ``prompt_wav_path`` speech audio is always ``None`` (:2716, :3553-3555).
- ``streaming_prefill()`` (modeling_minicpmo.py:2777-3148): break/stop set -> ``success False``, reason
  ``""``, no side effects (:2838); no input -> ``success False`` BEFORE ``<unit>`` is fed (:2849-2854);
  otherwise ``<unit>`` is fed first (:2864). Audio: the first unit after prepare is left-padded to
  16,560 samples (:3050-3056), 16,480 are taken (the mel processor aligns 1,035 ms down to whole
  160-sample hops: processing_minicpmo.py:745-749, :777) and consumed (:3104-3107, the processor's
  ``effective_first_chunk_ms``: processing_minicpmo.py:932), so 80 stay buffered for good; later calls
  take and consume 16,000 and, with fewer buffered, fail with "audio not enough" after ``<unit>``
  (:3059-3063); leftovers carry over and only ONE unit is consumed per call, so extra audio becomes a
  backlog (:attr:`DuplexApiDouble.backlog_samples` / ``max_backlog_samples``). float32 1-D audio
  (int16 is accepted and silently mis-scaled, 2-D raises inside numpy); frames must be ``PIL.Image``
  (numpy arrays fail in the image processor after ``<unit>``). Text is fed after the audio and the
  decision logits come from the audio feed (:3097, :3115-3140), so a text changes the decision of the
  NEXT unit (see :attr:`DuplexApiDouble.replies`).
- ``streaming_generate()`` always returns the 12 keys (:3151-3400); break/stop set -> listen, 24,000
  zeros, ``end_of_turn True`` (:3166-3180); no pending logits -> listen, zeros, ``end_of_turn False``,
  no state change (:3183-3197); the first ``force_listen_count`` generates are forced listen (:3203-3204);
  listen units return 24,000 zeros (:3300-3315); the model cannot switch to listen mid-turn: a sampled
  ``<|listen|>`` becomes ``<|tts_bos|>`` until ``<|turn_eos|>`` (:3238-3240, :3266-3269), and a unit
  that speaks ``<|turn_eos|>`` and then ``<|listen|>`` comes back as a bare listen (text ``""``,
  ``end_of_turn False``, no TTS and no TTS reset: :3300) while its words stay in ``res_ids``
  (:3257); with a voice, the first speech unit of a turn is force-flushed and left-padded to 24,000
  samples (:3348-3350, :3609-3612), later ones are ~24,000, and the last one of a turn is longer: the
  vocoder flushes its buffered lookahead with it (:3588-3595); ``listen_top_k`` with the decoder's
  listen id (``<|im_end|>``, utils.py:1172) differing from the loop's (``<|listen|>``,
  modeling_minicpmo.py:2563) makes every unit speech (utils.py:2172-2183); an unknown ``decode_mode``
  raises ``ValueError`` (utils.py:2197).
- Controls are ``threading.Event`` objects, safe from another thread, checked only when a call starts.
- Speak/listen decisions come from a script (:class:`Speak` items and :data:`LISTEN`).
- Fault injection per method (:class:`Fault`: delay, exception, hang until released) and a
  ``result_mutator`` to return malformed results; re-entrant calls are counted (the real object is not
  re-entrant).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from PIL import Image

_LOG = logging.getLogger(__name__)

#: The first unit is left-padded to this many samples (1,035 ms: modeling_minicpmo.py:3050-3056) ...
FIRST_UNIT_SAMPLES: Final = 16_560
#: ... of which the mel processor takes and the API consumes 16,480 (1,030 ms, whole 160-sample
#: hops: processing_minicpmo.py:745-749, :777, :932; modeling_minicpmo.py:3104-3111).
FIRST_UNIT_TAKEN: Final = 16_480
UNIT_SAMPLES: Final = 16_000
#: Token ids (the real tokenizer): the decoder's listen id is the eos ``<|im_end|>`` (utils.py:1172),
#: the duplex loop's is ``<|listen|>`` (modeling_minicpmo.py:2563).
IM_END_ID: Final = 151_645
LISTEN_ID: Final = 151_705
#: Extra samples of a turn's last chunk, which flushes the vocoder's buffered lookahead unpadded
#: (modeling_minicpmo.py:3588-3595). Measured by check-model's scripted turn through the remote
#: code: 26,880 = 24,000 + 3 lookahead tokens x 960 samples, with check-model's vocoder double.
#: ASSUMPTION: the real stepaudio2 (lookahead and samples per token) gives the same.
LAST_CHUNK_EXTRA_SAMPLES: Final = 2_880
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
    """A scripted speak decision: the unit's text and whether it ends the turn.

    ``then_listen``: the unit speaks its words and ``<|turn_eos|>`` and then samples ``<|listen|>``
    in the same unit; the API returns that as a bare listen (modeling_minicpmo.py:3266-3269, :3300).
    """

    text: str = ""
    end_of_turn: bool = False
    then_listen: bool = False


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
    listen_id: int = IM_END_ID  # utils.py:1172: tokenizer.eos_token_id

    def set_window_config(self, **kwargs: Any) -> None:
        self.window_config.update(kwargs)

    def set_window_enabled(self, enabled: bool) -> None:
        self.window_enabled = bool(enabled)


class _TokenizerDouble:
    """Stands in for ``duplex.tokenizer``: tokens are words; special tokens look like ``<|x|>``."""

    def decode(self, ids: list[Any], skip_special_tokens: bool = False) -> str:
        words = [str(t) for t in ids]
        if skip_special_tokens:
            words = [w for w in words if not (w.startswith("<|") and w.endswith("|>"))]
        return " ".join(words)


class DuplexApiDouble:
    """A test double of the HF remote code's ``MiniCPMODuplex`` (see the module docstring).

    Args:
        script: speak/listen decisions, consumed one per generate that is not forced listen; when it
            runs out the model listens.
        force_listen_count: the first N generates after prepare() are forced listen.
        tts_fill_units: speech units of a turn whose audio is ``None``. 0 as measured: the first
            speech unit of a turn is force-flushed (modeling_minicpmo.py:3348-3350). ASSUMPTION for
            > 0: a TTS that emits too few tokens would leave the vocoder nothing to release (:3614).
        sliding_window_mode: as given to ``as_duplex``.
        cost_s: every ``cost_*`` value reported, in seconds.
        **as_duplex_kwargs: everything else ``as_duplex`` received (recorded).
    """

    def __init__(
        self,
        *,
        script: Iterable[Decision] = (),
        force_listen_count: int = 0,
        tts_fill_units: int = 0,
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
        self.tokenizer = _TokenizerDouble()
        self.listen_token_id = LISTEN_ID
        #: The loaded model (``instance.model``: modeling_minicpmo.py:2504); set by ModelDouble.
        self.model: Any = None
        #: Injected text -> the decision of the unit AFTER the one that carried it.
        self.replies: dict[str, Decision] = {}

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
        self.audio_not_enough = 0
        self.stale_encoder_cache_units = 0
        self.stale_tts_turns = 0
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
        # modeling_minicpmo.py:2659-2690 (_reset_streaming_state), called by prepare (:2711).
        self.kv_tokens = 0
        self.backlog = np.zeros(0, dtype=np.float32)
        self.first_unit_pending = True
        self.pending_prefill = False
        self.generate_count = 0
        self.current_time = 0
        self.in_turn = False
        self.turn_units = 0
        self.audio_chunks_in_turn = 0
        self.res_ids: list[Any] = []
        self.tts_text_start_pos = 0
        self.tts_past_key_values: Any = None
        self.tts_current_turn_start_time: int | None = None
        self._script_pos = 0
        self._reply: Decision | None = None
        self._reply_at = 0

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
            if prompt_wav_path and not os.path.isfile(prompt_wav_path):
                # :2716-2717 -> _init_token2wav_cache -> the vocoder's set_stream_cache(path).
                # ASSUMPTION: stepaudio2 fails on a missing file with an OSError, as the
                # check-model vocoder double does.
                raise FileNotFoundError(f"No such file or directory: {prompt_wav_path!r}")
            self.prompt_wav_path = prompt_wav_path
            if prompt_wav_path is None:
                _LOG.warning("no prompt_wav_path: speech audio will be None")
            self._break.clear()
            self._stop.clear()
            # Not cleared here (nor anywhere in prepare): self.model.audio_past_key_values.
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
                return self._prefill_result(False, "")  # :2838-2839, no reason given
            has_audio = audio_waveform is not None and len(audio_waveform) > 0
            if not has_audio and not frame_list and not text_list:
                return self._prefill_result(False, "")  # :2849-2854, before <unit> is fed
            # :2864: <unit> is fed before the frames and audio are checked.
            self.kv_tokens += 1
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
            if has_audio and not self._consume_audio(audio_waveform):
                self.stray_unit_tokens += 1
                need = FIRST_UNIT_TAKEN if self.first_unit_pending else UNIT_SAMPLES
                return self._prefill_result(
                    False, f"audio not enough: need {need} samples, only {self.backlog.size}"
                )
            if text_list:
                # :3115-3140: fed after the audio, "mixed mode: just feed" -- the pending logits
                # (this unit's decision) came from the audio feed, so only the next unit can react.
                self.texts_seen.extend(text_list)
                self.kv_tokens += sum(len(t.split()) for t in text_list)
                for text in text_list:
                    if text in self.replies:
                        self._reply = self.replies[text]
                        self._reply_at = self.generate_count + 2
            self.pending_prefill = True
            return self._prefill_result(True, "")

    def _consume_audio(self, audio_waveform: Any) -> bool:
        """modeling_minicpmo.py:3046-3113; False: "audio not enough" (the audio stays buffered)."""
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
        if self.first_unit_pending and self.backlog.size < FIRST_UNIT_SAMPLES:
            # :3050-3056: only the first unit is left-padded, to 16,560.
            self.short_unit_pads += 1
            pad = np.zeros(FIRST_UNIT_SAMPLES - self.backlog.size, dtype=np.float32)
            self.backlog = np.concatenate([pad, self.backlog])
        need = FIRST_UNIT_TAKEN if self.first_unit_pending else UNIT_SAMPLES
        if self.backlog.size < need:
            self.audio_not_enough += 1  # :3059-3063
            return False
        stale = getattr(self.model, "audio_past_key_values", None) is not None
        if self.first_unit_pending and stale:
            # get_audio_embedding_streaming continues from the Whisper cache (:565-616).
            self.stale_encoder_cache_units += 1
        if self.model is not None:
            self.model.audio_past_key_values = ("whisper-cache", self.current_time)
        self.consumed_unit_lengths.append(need)
        self.backlog = self.backlog[need:]
        self.max_backlog_samples = max(self.max_backlog_samples, int(self.backlog.size))
        self.first_unit_pending = False
        self.kv_tokens += AUDIO_TOKENS_PER_UNIT
        return True

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
            return self._generate(decode_mode, listen_top_k)

    def _generate(self, decode_mode: str, listen_top_k: int | None) -> Any:
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
        if self.generate_count <= self.force_listen_count:
            # :3203-3204, :3222-3223: forced <|listen|>, decode() is not even called.
            return self._finish(self._listen(end_of_turn=False, cost=self.cost_s))
        decision: Decision = LISTEN
        if self._script_pos < len(self.script):
            decision = self.script[self._script_pos]
            self._script_pos += 1
        if self._reply is not None and self.generate_count >= self._reply_at:
            # An injected text reached the decision (one unit after the one that carried it).
            decision, self._reply = self._reply, None
        if listen_top_k is not None and self.decoder.listen_id != self.listen_token_id:
            # utils.py:2172-2183 returns <|im_end|> whenever it ranks in the top k; the loop takes
            # it for a spoken token (:3243-3262). ASSUMPTION: it always ranks there (measured:
            # every unit was speech with tiny random weights).
            decision = Speak("<|im_end|>")
        if decision == LISTEN and self.in_turn:
            # :3238-3240: the model cannot switch to listen mid-turn; the sample becomes <|tts_bos|>.
            decision = Speak("")
        if isinstance(decision, Speak):
            return self._finish(self._speak(decision))
        self.kv_tokens += 1
        return self._finish(self._listen(end_of_turn=False, cost=self.cost_s))

    def _reset_token2wav_for_new_turn(self) -> None:
        """:2653-2657: restore the vocoder's stream caches for a new turn."""
        self.audio_chunks_in_turn = 0

    def _speak(self, decision: Speak) -> dict[str, Any]:
        if not self.in_turn and self.tts_text_start_pos != 0:
            # The previous turn's TTS state was never reset (it ended in a listen unit).
            self.stale_tts_turns += 1
        self.in_turn = True
        self.turn_units += 1
        words = decision.text.split()
        ends = decision.end_of_turn or decision.then_listen
        # :3243-3257: every sampled token but <|speak|> goes into res_ids.
        self.res_ids.extend([*words, *(["<|turn_eos|>"] if ends else [])])
        n_tokens = 1 + len(words) + 1
        self.kv_tokens += n_tokens
        if decision.then_listen:
            # :3300-3315: is_listen wins; text and end_of_turn are dropped, the TTS is skipped and
            # its end-of-turn reset (:3371-3388) never runs.
            self.in_turn = False
            self.turn_units = 0
            return self._listen(end_of_turn=False, cost=self.cost_s)
        audio: np.ndarray | None = None
        if self.prompt_wav_path is not None and self.turn_units > self.tts_fill_units:
            if decision.end_of_turn:
                # :3588-3595: the last chunk flushes the buffered lookahead too, unpadded.
                length = OUTPUT_UNIT_SAMPLES + LAST_CHUNK_EXTRA_SAMPLES
            else:
                # :3348-3350 the turn's first chunk is force-flushed; :3609-3612 every chunk but
                # the last is left-padded to one second.
                length = OUTPUT_UNIT_SAMPLES
            t = np.arange(length, dtype=np.float32) / OUTPUT_SAMPLE_RATE
            audio = (0.2 * np.sin(2.0 * np.pi * 220.0 * t)).astype(np.float32)
            self.audio_chunks_in_turn += 1
        if decision.end_of_turn:
            # :3371-3374, :3387-3388
            self.in_turn = False
            self.turn_units = 0
            self.tts_text_start_pos = 0
            self.tts_past_key_values = None
            self.tts_current_turn_start_time = None
            self._reset_token2wav_for_new_turn()
        else:
            self.tts_text_start_pos += 1 + len(words) + 26  # ASSUMPTION: any positive advance
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
        #: The Whisper encoder's streaming cache (modeling_minicpmo.py:178, :565-616).
        self.audio_past_key_values: Any = None
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
        # modeling_minicpmo.py:2525: as_duplex always calls init_tts(), which is where a missing
        # stepaudio2 surfaces.
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
        self.duplex.model = self
        return self.duplex
