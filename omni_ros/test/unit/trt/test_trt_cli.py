"""`omni-ros engines list|verify|build` on a fake cache directory (no TensorRT, no GPU)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from omni_ros.core.errors import EngineError
from omni_ros.tensorrt.cache import ENGINE_FILE, EngineCache, Environment
from omni_ros.tools.engines_cli import add_engines_subparser, main, run_verify
from trt_cache_workers import fake_manifest

HERE = Environment("10.13.0.35", "8.9", "NVIDIA L4")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="omni-ros")
    add_engines_subparser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def fake_cache(tmp_path: Path) -> EngineCache:
    cache = EngineCache(tmp_path)
    cache.store(fake_manifest(b"good"), b"good")
    cache.store(fake_manifest(b"old", component="vision", tensorrt_version="10.9.0.34"), b"old")
    bad = cache.store(fake_manifest(b"tamper", component="vocoder"), b"tamper")
    (bad / ENGINE_FILE).write_bytes(b"tampered")
    return cache


def test_list_shows_one_row_per_entry(fake_cache: EngineCache, capsys):
    assert main(["engines", "list", "--out", str(fake_cache.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["entry", "precision", "tensorrt", "cc", "gpu", "MiB", "created"]
    assert sorted(line.split()[0].split("-")[0] for line in lines[1:]) == [
        "audio",
        "vision",
        "vocoder",
    ]
    assert any("10.9.0.34" in line for line in lines)


def test_verify_reports_ok_stale_and_invalid_entries(fake_cache: EngineCache, capsys):
    args = _parse(["engines", "verify", "--out", str(fake_cache.root)])
    assert run_verify(args, env=HERE) == 1
    out = {
        line.split()[1].rstrip(":").split("-")[0]: line
        for line in capsys.readouterr().out.splitlines()
    }
    assert out["audio"].startswith("OK")
    assert out["vision"].startswith("STALE")
    assert "tensorrt_version 10.9.0.34" in out["vision"]
    assert out["vocoder"].startswith("INVALID")
    assert "file altered" in out["vocoder"]


def test_verify_integrity_only_ignores_the_environment(tmp_path: Path, capsys):
    cache = EngineCache(tmp_path)
    cache.store(fake_manifest(b"x", tensorrt_version="10.9.0.34"), b"x")
    assert main(["engines", "verify", "--integrity-only", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("OK")


def test_verify_without_tensorrt_says_it_is_missing(fake_cache: EngineCache, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert main(["engines", "verify", "--out", str(fake_cache.root)]) == 1
    assert "TensorRT is not installed here" in capsys.readouterr().out


def test_list_and_verify_of_an_empty_cache_succeed(tmp_path: Path, capsys):
    assert main(["engines", "list", "--out", str(tmp_path / "none")]) == 0
    assert main(["engines", "verify", "--out", str(tmp_path / "none")]) == 0
    assert "no engines" in capsys.readouterr().out


def test_build_without_tensorrt_exits_2_with_the_reason(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code = main(
        [
            "engines",
            "build",
            "--backend",
            "reference",
            "--size",
            "tiny",
            "--components",
            "audio",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "TensorRT is not installed" in capsys.readouterr().err
    assert EngineCache(tmp_path).entries() == []


def test_build_onnx_only_exports_checked_onnx_files(tmp_path: Path, capsys):
    code = main(
        [
            "engines",
            "build",
            "--backend",
            "reference",
            "--size",
            "tiny",
            "--components",
            "audio,vocoder",
            "--onnx-only",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio.onnx", "vocoder.onnx"]
    assert capsys.readouterr().out.count("onnx.checker passed") == 2


def test_build_rejects_unknown_components(tmp_path: Path, capsys):
    assert (
        main(
            [
                "engines",
                "build",
                "--backend",
                "reference",
                "--components",
                "llm",
                "--out",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "unknown component 'llm'" in capsys.readouterr().err


def test_the_package_imports_without_tensorrt_or_pycuda():
    code = (
        "import sys; sys.modules['tensorrt'] = None; sys.modules['pycuda'] = None\n"
        "import omni_ros.tensorrt.runtime, omni_ros.tensorrt.build, omni_ros.tensorrt.cache\n"
        "import omni_ros.tools.engines_cli\n"
        "import omni_ros.tensorrt.cache as c\n"
        "assert 'torch' not in sys.modules, 'cache/runtime/cli must not import torch eagerly'\n"
        "assert c.detect_environment().tensorrt_version is None\n"
    )
    root = Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_building_minicpmo_engines_runs_no_remote_code_without_trust_and_a_revision(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from omni_ros.tools.cli import main

    weights = tmp_path / "weights"
    weights.mkdir()
    base = ["engines", "build", "--backend", "minicpmo", "--model", str(weights)]
    base += ["--onnx-only", str(tmp_path / "onnx")]
    assert main(base) == 2
    assert "trust_remote_code" in capsys.readouterr().err
    assert main([*base, "--trust-remote-code"]) == 2
    assert "revision is required" in capsys.readouterr().err


def test_a_full_size_export_that_cannot_fit_in_memory_is_refused_at_once(tmp_path: Path) -> None:
    import os

    from omni_ros.tools.engines_cli import available_memory_bytes, reference_export_bytes

    params, needed = reference_export_bytes("full")
    assert params > 9e9  # MiniCPM-o 4.5's dimensions: the whole model is built in fp32
    available = available_memory_bytes()
    if available is None or available >= needed:
        pytest.skip(f"this machine has {available} bytes available, enough for {needed}")
    result = subprocess.run(
        [sys.executable, "-m", "omni_ros.tools.cli", "engines", "build", "--backend",
         "reference", "--onnx-only", str(tmp_path / "onnx")],
        capture_output=True, text=True, timeout=120, env=os.environ.copy(),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "GiB of memory" in result.stderr
    assert "--size tiny" in result.stderr
    assert not (tmp_path / "onnx").exists()


def test_the_memory_check_passes_when_there_is_room_or_no_figure() -> None:
    from omni_ros.tools.engines_cli import check_memory

    check_memory(10, 11, "x")
    check_memory(10, None, "x")
    with pytest.raises(EngineError, match="needs about"):
        check_memory(10 << 30, 1 << 30, "x")


def test_onnx_export_reports_progress_per_component(tmp_path: Path, capsys) -> None:
    from omni_ros.tools.cli import main

    code = main(
        ["engines", "build", "--backend", "reference", "--size", "tiny",
         "--components", "audio,vocoder", "--onnx-only", str(tmp_path / "onnx")]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "building the tiny reference model" in out
    assert "[1/2] audio: exporting to ONNX" in out
    assert "[2/2] vocoder: exporting to ONNX" in out
