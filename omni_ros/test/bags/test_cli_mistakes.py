"""Every common user mistake is one line on stderr that says what to change, exit code 2, and no
traceback (``-v`` for that); ``synth`` works for any duration >= 1 s. Each case runs the real CLI
in a subprocess, as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omni_ros.core.clock import NS_PER_S
from omni_ros.tools.bagio import InputBag

PARAMS = "omni_flow_node:\n  ros__parameters:\n{body}"


def omni_ros(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omni_ros.tools.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def assert_one_line_mistake(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit code 2, no traceback, and exactly one stderr line that is not a log line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr + result.stdout
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith(("INFO ", "WARNING ", "DEBUG "))
    ]
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def params_file(tmp_path: Path, body: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(PARAMS.format(body=body))
    return path


# ----------------------------------------------------------------------------------- bad bags
def test_replaying_a_file_that_is_not_a_bag_says_so(tmp_path: Path) -> None:
    readme = Path(__file__).resolve().parents[3] / "README.md"
    result = omni_ros("replay", str(readme), "--out", str(tmp_path / "o"), "--mode", "direct")
    assert_one_line_mistake(result, "is not a rosbag2 bag", "metadata.yaml")


def test_a_truncated_recording_is_one_line_naming_the_damage(
    clean_bag: Path, tmp_path: Path
) -> None:
    bag = tmp_path / "killed"
    shutil.copytree(clean_bag, bag)
    mcap = next(bag.glob("*.mcap"))
    with mcap.open("r+b") as f:
        f.truncate(mcap.stat().st_size // 2)  # what a killed recorder leaves
    result = omni_ros("replay", str(bag), "--out", str(tmp_path / "o"), "--mode", "direct")
    assert_one_line_mistake(result, "cannot read the bag", "cut short")


def test_a_broken_metadata_yaml_is_one_line(clean_bag: Path, tmp_path: Path) -> None:
    bag = tmp_path / "broken"
    shutil.copytree(clean_bag, bag)
    (bag / "metadata.yaml").write_text("rosbag2_bagfile_information:\n  version: [unclosed\n")
    result = omni_ros("replay", str(bag), "--out", str(tmp_path / "o"), "--mode", "direct")
    assert_one_line_mistake(result, "cannot read the bag", "metadata.yaml is broken")


def test_a_remap_of_a_topic_the_bag_does_not_have_is_refused(
    clean_bag: Path, tmp_path: Path
) -> None:
    result = omni_ros(
        "replay", str(clean_bag), "--out", str(tmp_path / "o"), "--mode", "direct",
        "--remap", "/audio/mci:=/audio/mic",
    )  # fmt: skip
    assert_one_line_mistake(result, "no topic /audio/mci", "did you mean '/audio/mic'")


# ----------------------------------------------------------------------------- bad parameters
@pytest.mark.parametrize("mode", ["direct", "graph"])
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "    sesion:\n      output_latency_ms: 80.0\n",
            "did you mean 'session.output_latency_ms'",
        ),
        ("    sytem_prompt: hello\n", "did you mean 'system_prompt'"),
        ("    speech:\n      chunkms: 50\n", "did you mean 'speech.chunk_ms'"),
        (
            "    speech:\n      chunk_ms: hundred\n",
            "speech.chunk_ms = 'hundred' has type str; expected int",
        ),
        ("    speech:\n      encoding: S24LE\n", "speech.encoding = 'S24LE'"),
        ("    reference:\n      sze: tiny\n", "did you mean 'reference.size'"),
    ],
)
def test_unknown_and_mistyped_parameters_fail_identically_in_both_replay_modes(
    clean_bag: Path, tmp_path: Path, mode: str, body: str, expected: str
) -> None:
    params = params_file(tmp_path, "    backend: reference\n" + body)
    result = omni_ros(
        "replay", str(clean_bag), "--out", str(tmp_path / "o"), "--mode", mode,
        "--params", str(params),
    )  # fmt: skip
    assert_one_line_mistake(result, expected)
    assert not (tmp_path / "o" / "outputs").exists()


# ----------------------------------------------------------------------------------- synth
def test_synth_into_an_existing_folder_is_refused_and_leaves_it_alone(tmp_path: Path) -> None:
    existing = tmp_path / "bag"
    existing.mkdir()
    result = omni_ros("synth", str(existing), "--duration", "1")
    assert_one_line_mistake(result, "exists")
    assert existing.is_dir()
    assert not any(existing.iterdir())


@pytest.mark.parametrize("duration", ["0", "-3", "0.5", "nan"])
def test_synth_refuses_less_than_one_second_and_writes_nothing(
    tmp_path: Path, duration: str
) -> None:
    result = omni_ros("synth", str(tmp_path / "b"), "--duration", duration)
    assert_one_line_mistake(result, "--duration must be at least 1 s")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("duration", [1.0, 5.0, 6.0, 7.0, 9.5])
def test_synth_writes_a_bag_of_any_duration_from_one_second(
    tmp_path: Path, duration: float
) -> None:
    result = omni_ros("synth", str(tmp_path / "b"), "--duration", str(duration))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    bag = InputBag(tmp_path / "b")
    assert abs(bag.duration_ns / NS_PER_S - duration) < 0.2


def test_a_failed_synth_removes_its_partial_bag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omni_ros.core.errors import ConfigError
    from omni_ros.tools import synth

    def broken_speak(text: str, rate: int) -> object:
        raise ConfigError("espeak-ng failed")

    monkeypatch.setattr(synth, "speak", broken_speak)
    with pytest.raises(ConfigError, match="espeak-ng failed"):
        synth.write_bag(tmp_path / "b", synth.SynthConfig(duration_s=3.0))
    assert not (tmp_path / "b").exists()  # a rerun is not blocked


# ------------------------------------------------------------------------------- -v and help
def test_verbose_adds_the_traceback_to_the_same_one_line_message(tmp_path: Path) -> None:
    result = omni_ros("-v", "synth", str(tmp_path), "--duration", "1")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("omni-ros synth: ")


def test_verbose_means_omni_ros_debug_lines_and_no_other_librarys(
    clean_bag: Path, tmp_path: Path
) -> None:
    result = omni_ros(
        "-v", "replay", str(clean_bag), "--out", str(tmp_path / "o"), "--mode", "direct"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    debug = [line for line in result.stderr.splitlines() if line.startswith("DEBUG ")]
    assert any(line.startswith("DEBUG omni_ros.") for line in debug), result.stderr[-2000:]
    assert all(line.startswith("DEBUG omni_ros.") for line in debug), debug[:5]


def test_help_shows_defaults() -> None:
    result = omni_ros("replay", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "(default: graph)" in text
    assert "(default: 180.0)" in text  # --load-timeout
    assert "(default: 24.0)" in " ".join(omni_ros("synth", "--help").stdout.split())


def test_backends_lists_each_parameter_with_its_type_and_default() -> None:
    result = omni_ros("backends")
    assert result.returncode == 0, result.stderr
    assert "  size: str = 'tiny'" in result.stdout, result.stdout
    assert "  seed: int = 0" in result.stdout


def test_replay_progress_off_a_terminal_is_periodic_lines_not_carriage_returns(
    clean_bag: Path, tmp_path: Path
) -> None:
    result = omni_ros("replay", str(clean_bag), "--out", str(tmp_path / "o"), "--mode", "direct")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("replay (direct): ")]
    assert lines
    assert lines[-1].split(": ")[1].startswith(f"{InputBag(clean_bag).message_count}/")


@pytest.mark.ros
def test_graph_replay_load_timeout_is_an_option_and_its_expiry_says_how_to_raise_it(
    clean_bag: Path, tmp_path: Path
) -> None:
    result = omni_ros(
        "replay", str(clean_bag), "--out", str(tmp_path / "o"), "--mode", "graph",
        "--load-timeout", "0.5",
    )  # fmt: skip
    assert_one_line_mistake(result, "not ready after 0.5 s", "--load-timeout SECONDS")
    assert "starting omni_flow_node (load timeout 0.5 s)" in result.stderr


def test_with_inputs_puts_the_whole_conversation_into_one_output_bag(
    clean_bag: Path, tmp_path: Path
) -> None:
    from rosbags.rosbag2 import Reader

    result = omni_ros(
        "replay", str(clean_bag), "--out", str(tmp_path / "o"), "--mode", "direct",
        "--with-inputs", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    with Reader(tmp_path / "o" / "outputs") as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    with Reader(clean_bag) as reader:
        inputs = {c.topic: c.msgcount for c in reader.connections}
    assert {t: counts[t] for t in inputs} == inputs
    assert counts["/omni/state"] >= 5
