"""Torch eager vs TensorRT per accelerated component, in one run; the ratio goes to docs/BENCHMARKS.md.

On a CUDA machine with TensorRT 10.x/11.x::

    python benchmarks/engines_bench.py --size full --precision fp16 --write-docs

builds (or reuses) engines of the reference backend's vision / audio / vocoder components (MiniCPM-o
4.5 dimensions with ``--size full``), then times torch eager and the TensorRT runner on the same CUDA
inputs (profile ``opt`` shapes; CUDA-synchronised wall time; median / p95 over ``--iters``).

Anywhere else it says why the TensorRT comparison cannot run and exits 0 after measuring what this
machine can: CPU torch eager vs onnxruntime (CPU) on the same exported ONNX graphs, for the tiny
configurations. That CPU figure says nothing about TensorRT; it only shows the exported graphs run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "omni_ros"))

DOCS = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## TensorRT"


def _time(
    fn: Callable[[], Any], iters: int, warmup: int, sync: Callable[[], None]
) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    return statistics.median(samples), p95


def _why_no_tensorrt() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    from omni_ros.core.errors import EngineError
    from omni_ros.tensorrt.build import import_tensorrt

    try:
        import_tensorrt()
    except EngineError as exc:
        return str(exc).split(":")[0]
    return None


def _shape_text(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in shapes.items())


def gpu_rows(args: argparse.Namespace) -> tuple[list[str], str]:
    """Build engines and time torch eager vs TensorRT per component (CUDA)."""
    import torch
    from omni_ros.backends.reference import ReferenceBackend, ReferenceConfig
    from omni_ros.tensorrt.build import build_component
    from omni_ros.tensorrt.cache import EngineCache
    from omni_ros.tensorrt.export import make_inputs, model_revision, reference_components
    from omni_ros.tensorrt.runtime import TrtRunner

    backend = ReferenceBackend(
        ReferenceConfig(size=args.size, seed=0, device="cuda", dtype=args.torch_dtype)
    )
    cache = EngineCache(args.out or tempfile.mkdtemp(prefix="engines-"))
    rows = []
    for name, (module, spec) in reference_components(backend, args.components.split(",")).items():
        # Export from an fp32 copy: the engine's precision comes from the build.
        export_module = module.float() if args.torch_dtype != "float32" else module
        result = build_component(
            export_module,
            spec,
            precision=args.precision,
            cache=cache,
            backend="reference",
            model_revision=model_revision(backend),
            show_progress=True,
        )
        if args.torch_dtype != "float32":
            module.to(getattr(torch, args.torch_dtype))
        runner = TrtRunner(result.path)
        shapes = spec.profile_shapes("opt")
        inputs = make_inputs(spec, shapes, device="cuda")
        with torch.inference_mode():
            eager_ms, eager_p95 = _time(
                lambda m=module, x=inputs: m(*x), args.iters, 10, torch.cuda.synchronize
            )
        trt_ms, trt_p95 = _time(
            lambda r=runner, x=inputs: r(*x), args.iters, 10, torch.cuda.synchronize
        )
        rows.append(
            f"| {name} | {_shape_text(shapes)} | {eager_ms:.3f} / {eager_p95:.3f} | "
            f"{trt_ms:.3f} / {trt_p95:.3f} | {eager_ms / trt_ms:.2f}x |"
        )
    import tensorrt

    machine = (
        f"{torch.cuda.get_device_name()}, TensorRT {tensorrt.__version__}, torch {torch.__version__}; "
        f"reference `{args.size}`, torch eager in {args.torch_dtype}, engines {args.precision}"
    )
    return rows, machine


def cpu_rows(args: argparse.Namespace) -> list[str]:
    """CPU torch eager vs onnxruntime (CPU) on the same exported graphs, tiny configurations."""
    import onnxruntime as ort
    import torch
    from omni_ros.backends.reference import ReferenceBackend, ReferenceConfig
    from omni_ros.tensorrt.export import export_onnx, make_inputs, reference_components
    from omni_ros.tensorrt.tiny import tiny_components

    torch.set_num_threads(args.threads)
    backend = ReferenceBackend(ReferenceConfig(size="tiny", seed=0))
    sources = [
        (f"reference tiny {n}", m, s)
        for n, (m, s) in reference_components(backend, ["vision", "audio", "vocoder"]).items()
    ]
    sources += [
        (f"tiny.py {n}", m, s)
        for n, (m, s) in tiny_components().items()
        if n in ("vision", "vocoder")
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, module, spec in sources:
            path = export_onnx(module, spec, Path(tmp) / f"{label.replace(' ', '_')}.onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            shapes = spec.profile_shapes("opt")
            inputs = make_inputs(spec, shapes)
            feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)}
            with torch.inference_mode():
                eager_ms, eager_p95 = _time(
                    lambda m=module, x=inputs: m(*x), args.iters, 5, lambda: None
                )
            ort_ms, ort_p95 = _time(
                lambda s=session, f=feeds: s.run(None, f), args.iters, 5, lambda: None
            )
            rows.append(
                f"| {label} | {_shape_text(shapes)} | {eager_ms:.3f} / {eager_p95:.3f} | "
                f"{ort_ms:.3f} / {ort_p95:.3f} | {eager_ms / ort_ms:.2f}x |"
            )
    return rows


def write_section(text: str) -> None:
    """Replace (or append) the ``## TensorRT`` section of docs/BENCHMARKS.md, leaving the rest."""
    doc = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n"
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = doc.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        new = (
            "\n".join(
                [
                    *lines[:start],
                    *text.rstrip("\n").splitlines(),
                    *([""] if end < len(lines) else []),
                    *lines[end:],
                ]
            )
            + "\n"
        )
    DOCS.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp16")
    parser.add_argument(
        "--torch-dtype",
        choices=("float32", "float16", "bfloat16"),
        default="bfloat16",
        help="dtype of the torch eager baseline on the GPU",
    )
    parser.add_argument("--components", default="vision,audio,vocoder")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU comparison)")
    parser.add_argument("--out", type=Path, help="engine cache (default: a temporary one)")
    parser.add_argument(
        "--write-docs", action="store_true", help="write the section into docs/BENCHMARKS.md"
    )
    args = parser.parse_args(argv)

    why = _why_no_tensorrt()
    header = "| component | input (opt profile) | torch eager ms (median / p95) | {} ms (median / p95) | speedup (torch / other) |\n|---|---|---|---|---|"
    if why is None:
        rows, machine = gpu_rows(args)
        body = (
            f"### torch eager vs TensorRT, per component (GPU)\n\nMachine: {machine}. One run, "
            f"{args.iters} timed calls after 10 warm-up calls, CUDA-synchronised wall time.\n\n"
            + header.format("TensorRT")
            + "\n"
            + "\n".join(rows)
            + "\n"
        )
    else:
        print(
            f"engines_bench: cannot compare against TensorRT here: {why}. "
            "Measuring CPU torch eager vs onnxruntime on the tiny configurations instead."
        )
        rows = cpu_rows(args)
        body = (
            "### CPU only: torch eager vs onnxruntime on the exported graphs (not TensorRT)\n\n"
            f"Machine: {os.cpu_count()}-core {platform.machine()} CPU, {args.threads} thread(s), no GPU, no TensorRT ({why}); "
            f"torch {__import__('torch').__version__}, onnxruntime {__import__('onnxruntime').__version__}. "
            f"One run, {args.iters} timed calls after 5 warm-up calls. Tiny configurations "
            "(seeded random weights), so these numbers only show that the exported graphs run and how "
            "per-call overhead compares; they say nothing about TensorRT speedups. Other jobs shared the cores, so p95 is noisy.\n\n"
            + header.format("onnxruntime CPU")
            + "\n"
            + "\n".join(rows)
            + "\n\n"
            "### torch eager vs TensorRT (GPU)\n\nNot measured: no machine of this workplace has "
            "TensorRT (see docs/TENSORRT.md). Published encoder speedups for comparison: WhisperTRT on "
            "Orin 2.7-3.0x, CLIP ViT-L fp16 TensorRT vs torch fp32 on a T4 ~5x.\n"
        )
    print(body)
    if args.write_docs:
        write_section(
            f"{SECTION}\n\n"
            + body
            + "\nReproduce: `python benchmarks/engines_bench.py --write-docs` "
            "(on a GPU with TensorRT it builds engines and compares torch eager vs TensorRT instead).\n"
        )
        print(f"wrote the {SECTION!r} section of {DOCS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
