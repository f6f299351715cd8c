"""``omni-ros check-model``: the remote-code gate and the parts that run without the remote code.

The checks themselves run against a real remote-code folder in test_minicpmo_conformance.py (opt-in).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from omni_ros.core.errors import ConfigError
from omni_ros.tools import check_model
from omni_ros.tools.cli import main

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _booby_trapped_folder(tmp_path: Path) -> Path:
    """A complete-looking remote-code folder whose Python files record that they ran."""
    marker = tmp_path / "ran"
    for name in check_model.CODE_FILES:
        path = tmp_path / name
        if name.endswith(".py"):
            path.write_text(f"open({str(marker)!r}, 'w').write('executed')\n")
        else:
            path.write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    return tmp_path


def test_without_trust_remote_code_nothing_in_the_folder_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _booby_trapped_folder(tmp_path)
    rc = main(["check-model", "--code", str(code), "--revision", REVISION])
    assert rc == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()
    assert not any(name.startswith("_omni_ros_remote_minicpmo_") for name in sys.modules)


def test_without_a_revision_nothing_in_the_folder_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _booby_trapped_folder(tmp_path)
    rc = main(["check-model", "--code", str(code), "--trust-remote-code"])
    assert rc == 2
    assert "--revision" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists()


def test_a_folder_without_the_remote_code_names_every_missing_file(tmp_path: Path) -> None:
    (tmp_path / "modeling_minicpmo.py").write_text("")
    with pytest.raises(ConfigError) as excinfo:
        check_model.check_code_dir(tmp_path)
    message = str(excinfo.value)
    for name in ("configuration_minicpmo.py", "processing_minicpmo.py", "tokenizer_config.json"):
        assert name in message
    assert "modeling_minicpmo.py," not in message
    assert "vocab.json + merges.txt" in message


def test_the_vocoder_double_releases_tokens_minus_its_lookahead_as_int16_pcm(
    tmp_path: Path,
) -> None:
    vocoder = check_model.Token2wavDouble()
    with pytest.raises(FileNotFoundError):
        vocoder.set_stream_cache(str(tmp_path / "missing.wav"))
    pcm = np.frombuffer(vocoder.stream(list(range(28))), dtype="<i2")
    assert pcm.size == 25 * 960  # 28 tokens, 3 held back as lookahead
    last = np.frombuffer(vocoder.stream(list(range(5)), last_chunk=True), dtype="<i2")
    assert last.size == 5 * 960


def test_the_report_prints_pass_fail_and_the_per_unit_times() -> None:
    report = check_model.Report(
        checks=[check_model.Check("a", True, "x"), check_model.Check("b", False)],
        unit_ms=[100.0, 200.0, 300.0],
        unit_cpu_ms=[50.0, 60.0, 70.0],
    )
    text = check_model.format_report(report)
    assert "PASS  a  [x]" in text
    assert "FAIL  b" in text
    assert "wall time" in text
    assert "median 200 ms" in text
    assert "1 passed, 1 failed" in text
    assert not report.passed
