"""The ``minicpmo`` backend on the real MiniCPM-o 4.5 weights (GPU only).

Runs when ``OMNI_ROS_MINICPMO_PATH`` points at a local folder with the weights and remote code and
CUDA is available; skips with the reason otherwise. Optional environment:

- ``OMNI_ROS_MINICPMO_REVISION``: recorded with the run (the folder's code is what runs);
- ``OMNI_ROS_MINICPMO_VOICE``: a WAV file for the TTS voice (without it the model returns text only);
- ``OMNI_ROS_MINICPMO_VARIANT`` (bf16 | awq | int4) and ``OMNI_ROS_MINICPMO_ATTN``
  (sdpa | flash_attention_2).

Setting the path is the opt-in to run the folder's Python code (``trust_remote_code``).

    OMNI_ROS_MINICPMO_PATH=/models/MiniCPM-o-4_5 pytest omni_ros/test/gpu/test_minicpmo_real.py -m gpu
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

_PATH = os.environ.get("OMNI_ROS_MINICPMO_PATH", "")


def _skip_reason() -> str | None:
    if not _PATH:
        return "set OMNI_ROS_MINICPMO_PATH to a local MiniCPM-o 4.5 folder to run the real model"
    if not os.path.isdir(os.path.expanduser(_PATH)):
        return f"OMNI_ROS_MINICPMO_PATH={_PATH!r} is not a folder"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "CUDA is not available (MiniCPM-o 4.5 needs a GPU with > 28 GB for bf16)"
    if importlib.util.find_spec("stepaudio2") is None:
        return "minicpmo-utils is not installed: pip install --no-deps minicpmo-utils==1.0.7"
    from omni_ros.backends.minicpmo import missing_runtime_packages

    missing = missing_runtime_packages()
    if missing:
        return "missing packages (requirements/minicpmo.txt): " + "; ".join(missing)
    return None


_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


@pytest.fixture(scope="module")
def backend() -> Iterator[Any]:
    from omni_ros.backends.minicpmo import MiniCPMOBackend, MiniCPMOConfig

    params: dict[str, Any] = {
        "model": os.path.expanduser(_PATH),
        "trust_remote_code": True,
        # A Hugging Face cache snapshot folder is named after its commit; any other folder needs
        # OMNI_ROS_MINICPMO_REVISION (the config requires a pinned revision with remote code).
        "revision": os.environ.get("OMNI_ROS_MINICPMO_REVISION")
        or os.path.basename(os.path.normpath(os.path.expanduser(_PATH))),
        "variant": os.environ.get("OMNI_ROS_MINICPMO_VARIANT", "bf16"),
        "attn_implementation": os.environ.get("OMNI_ROS_MINICPMO_ATTN", "sdpa"),
        "prompt_wav_path": os.environ.get("OMNI_ROS_MINICPMO_VOICE") or None,
        "force_listen_count": 0,
        # The first call on a fresh GPU compiles kernels: be generous.
        "generate_timeout_s": 60.0,
        "prefill_timeout_s": 60.0,
    }
    instance = MiniCPMOBackend(MiniCPMOConfig.from_mapping(params))
    yield instance
    instance.close()


def _unit(backend: Any, index: int, with_frame: bool) -> Any:
    from omni_ros.core.types import Unit, VideoFrame

    duration_ns = backend.first_unit_ns if index == 0 else backend.unit_ns
    start_ns = 0 if index == 0 else backend.first_unit_ns + (index - 1) * backend.unit_ns
    n = duration_ns * backend.input_sample_rate // 1_000_000_000
    frames: tuple[VideoFrame, ...] = ()
    if with_frame:
        rgb = np.zeros((480, 640, 3), dtype=np.uint8)
        rgb[120:360, 160:480] = (200, 30, 30)  # a red box on black
        frames = (VideoFrame(stamp_ns=start_ns, rgb=rgb),)
    return Unit(
        index=index,
        start_ns=start_ns,
        end_ns=start_ns + duration_ns,
        audio=np.zeros(n, dtype=np.float32),
        sample_rate=backend.input_sample_rate,
        frames=frames,
    )


def test_five_silent_units_with_a_frame_return_well_formed_results(backend: Any) -> None:
    from omni_ros.core.types import UnitResult

    backend.prepare("Streaming Omni Conversation.")
    for index in range(5):
        backend.prefill(_unit(backend, index, with_frame=index == 0))
        result = backend.generate()
        assert isinstance(result, UnitResult)
        assert isinstance(result.text, str)
        assert result.timings_ms["generate_total"] > 0.0
        if result.is_listen:
            assert result.audio is None
            assert result.text == ""
        elif result.audio is not None:
            assert result.audio.dtype == np.float32
            assert result.audio.ndim == 1
            # ~1 s per unit at 24 kHz; the first chunk of a turn is longer.
            assert 0 < result.audio.size <= 3 * backend.output_sample_rate
            assert float(np.max(np.abs(result.audio))) <= 1.0
    backend.interrupt()
    backend.prefill(_unit(backend, 5, with_frame=False))
    after = backend.generate()
    assert after.is_listen
    assert after.audio is None
