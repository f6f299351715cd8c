"""Classify what the model said when it spoke unprompted (a proactive turn).

MiniCPM-o has no separate proactive API: it speaks while the user is silent, steered by the system
prompt. A prompt can ask the model to open such turns with a tag, e.g.
``"[reminder] Your meeting starts in five minutes."``; :class:`TagClassifier` reads that tag. Any
classifier with the :class:`ProactiveClassifier` shape can replace it (a keyword table, a small text
model, ...).
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

#: Tags a system prompt is expected to use; others are accepted as long as they are one word.
KNOWN_KINDS = ("reminder", "alert", "greeting", "comment")

# A leading "[word]" (letters, digits, '_' or '-', up to 32 characters), case-insensitive.
_TAG = re.compile(r"^\s*\[([A-Za-z][A-Za-z0-9_-]{0,31})\]\s*")


def split_leading_tag(text: str) -> tuple[str | None, str]:
    """Split ``"[kind] rest"`` into ``("kind", "rest")``; ``(None, text)`` without a tag.

    The kind is lower-cased; the rest keeps its case.
    """
    match = _TAG.match(text)
    if match is None:
        return None, text
    return match.group(1).lower(), text[match.end() :]


@runtime_checkable
class ProactiveClassifier(Protocol):
    """Anything that names the kind of a proactive utterance."""

    def classify(self, text: str) -> tuple[str, float]:
        """Return ``(kind, confidence in [0, 1])`` for the full text of a proactive turn."""
        ...


class TagClassifier:
    """Reads the leading ``[kind]`` tag the system prompt asks for; falls back to ``"comment"``.

    Args:
        fallback_kind: kind for text without a tag.
        known_confidence: confidence for a tag in :data:`KNOWN_KINDS`.
        free_confidence: confidence for any other one-word tag.
        fallback_confidence: confidence of the fallback (the model gave no hint).
    """

    def __init__(
        self,
        fallback_kind: str = "comment",
        known_confidence: float = 1.0,
        free_confidence: float = 0.8,
        fallback_confidence: float = 0.5,
    ) -> None:
        self.fallback_kind = fallback_kind
        self.known_confidence = known_confidence
        self.free_confidence = free_confidence
        self.fallback_confidence = fallback_confidence

    def classify(self, text: str) -> tuple[str, float]:
        """Return the tag's kind (lower-case) and a confidence; see the class docstring."""
        kind, _ = split_leading_tag(text)
        if kind is None:
            return self.fallback_kind, self.fallback_confidence
        if kind in KNOWN_KINDS:
            return kind, self.known_confidence
        return kind, self.free_confidence
