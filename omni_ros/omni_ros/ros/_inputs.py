"""Checks on what a caller hands ``omni_flow_node`` before any of it reaches the backend.

A system prompt and a reference voice arrive through ``omni/set_prompt`` (and the parameters
``system_prompt`` / ``ref_voice_path`` at configure). Everything is checked here, cheapest first
(sizes before reading, headers before decoding), and a refusal is a :class:`ConfigError` whose
message says what to fix: the node answers the caller with it and keeps the running conversation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from omni_ros.core.audio import inspect_wav
from omni_ros.core.errors import ConfigError, OmniError
from omni_ros.core.types import FloatArray

#: A WAV file larger than this is refused before it is read (30 s of 8-channel float at 48 kHz is
#: 46 MB; anything bigger is not a voice sample).
MAX_REF_VOICE_FILE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class PromptLimits:
    """Bounds on a system prompt and a reference voice.

    Attributes:
        max_prompt_bytes: longest system prompt, in UTF-8 bytes.
        min_voice_s: shortest reference voice [s].
        max_voice_s: longest reference voice [s] (MiniCPM-o uses a few seconds).
    """

    max_prompt_bytes: int = 16_384
    min_voice_s: float = 0.1
    max_voice_s: float = 30.0


def check_prompt(text: str, limits: PromptLimits) -> str:
    """The prompt, if it is within ``limits`` (checked before anything embeds it).

    Raises:
        ConfigError: too long, or it contains a NUL character.
    """
    size = len(text.encode("utf-8", errors="replace"))
    if size > limits.max_prompt_bytes:
        raise ConfigError(
            f"system prompt is {size} bytes; the limit is {limits.max_prompt_bytes} "
            "(prompt.max_bytes)"
        )
    if "\x00" in text:
        raise ConfigError("system prompt contains a NUL character")
    return text


def read_voice(path: str, sample_rate: int, limits: PromptLimits) -> FloatArray | None:
    """Read the reference voice at ``path`` as mono float32 at ``sample_rate`` (None for "").

    The file size and the WAV header are checked before the samples are decoded, so a crafted
    header (zero channels, block align 0, truncated) or a 70 s file is refused with the reason.

    Raises:
        ConfigError: missing, too big, not a valid PCM / float WAV, or outside the duration limits.
    """
    if not path:
        return None
    try:
        size = os.path.getsize(path)
        if size > MAX_REF_VOICE_FILE_BYTES:
            raise ConfigError(f"{size} bytes (limit {MAX_REF_VOICE_FILE_BYTES})")
        with open(path, "rb") as handle:
            info = inspect_wav(handle.read())
        if not limits.min_voice_s <= info.duration_s <= limits.max_voice_s:
            raise ConfigError(
                f"{info.duration_s:.2f} s long; it must last {limits.min_voice_s:g}.."
                f"{limits.max_voice_s:g} s (ref_voice.min_s / ref_voice.max_s)"
            )
        from omni_ros.ros._params import load_ref_voice

        voice: Any = load_ref_voice(path, sample_rate)
    except OmniError as exc:
        raise ConfigError(f"reference voice {path!r} refused: {exc}") from exc
    except Exception as exc:  # a decoder's own error on a file the header check let through
        raise ConfigError(f"reference voice {path!r} refused: {type(exc).__name__}: {exc}") from exc
    return voice
