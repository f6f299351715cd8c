"""Code paths that differ between Python 3.10 (Humble), 3.11 (Kilted) and 3.12 (Jazzy)."""

from __future__ import annotations

import datetime

from omni_ros.tensorrt.cache import utc_now_iso


def test_manifest_stamps_are_utc_iso_on_every_supported_python() -> None:
    # datetime.UTC exists only from 3.11: on 3.10 this raised AttributeError (31 tests failed).
    stamp = datetime.datetime.fromisoformat(utc_now_iso())
    assert stamp.utcoffset() == datetime.timedelta(0)
