"""Tests for proactive-turn classification."""

from __future__ import annotations

import pytest
from omni_ros.core.proactive import ProactiveClassifier, TagClassifier, split_leading_tag


@pytest.mark.parametrize(
    ("text", "kind", "confidence"),
    [
        ("[reminder] Your meeting starts soon.", "reminder", 1.0),
        ("  [Alert]  The door is open.", "alert", 1.0),
        ("[greeting] Good morning!", "greeting", 1.0),
        ("[comment] Nice weather.", "comment", 1.0),
        ("[safety_note] Mind the step.", "safety_note", 0.8),
        ("The plants need water.", "comment", 0.5),
        ("", "comment", 0.5),
        ("[not a tag] text", "comment", 0.5),
        ("I said [reminder] mid-sentence", "comment", 0.5),
    ],
)
def test_tag_classifier_reads_a_leading_tag_and_falls_back_to_comment(
    text: str, kind: str, confidence: float
) -> None:
    assert TagClassifier().classify(text) == (kind, confidence)


def test_the_tag_is_stripped_and_the_rest_keeps_its_case() -> None:
    assert split_leading_tag("[Reminder]  Call Anna.") == ("reminder", "Call Anna.")
    assert split_leading_tag("No tag here.") == (None, "No tag here.")


def test_a_custom_fallback_kind_is_used_for_untagged_text() -> None:
    assert TagClassifier(fallback_kind="remark").classify("hmm") == ("remark", 0.5)


def test_any_object_with_classify_is_a_proactive_classifier() -> None:
    class Keyword:
        def classify(self, text: str) -> tuple[str, float]:
            return ("alert", 0.9) if "fire" in text else ("comment", 0.1)

    assert isinstance(Keyword(), ProactiveClassifier)
    assert isinstance(TagClassifier(), ProactiveClassifier)
