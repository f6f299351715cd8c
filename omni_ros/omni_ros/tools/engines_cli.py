"""``omni-ros engines build|list|verify``: build, list and verify TensorRT engines.

Wire it into the ``omni-ros`` entry point with::

    sub = parser.add_subparsers(dest="command", required=True)
    add_engines_subparser(sub)
    args = parser.parse_args(argv)
    return args.func(args)

Exit codes: 0 success, 1 an entry failed verification / a build failed, 2 usage or environment
problem (no TensorRT, no GPU, no model path, too little memory for the export).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from omni_ros.core.errors import EngineError, OmniError
from omni_ros.tensorrt.cache import (
    DEFAULT_ENGINE_ROOT,
    ENGINE_FILE,
    EngineCache,
    Environment,
    detect_environment,
    verify_entry,
)
from omni_ros.tensorrt.specs import COMPONENTS, PRECISIONS, parse_components

log = logging.getLogger(__name__)

#: fp32 bytes per parameter: engines are exported from an fp32 copy of the model.
_FP32_BYTES = 4
#: Headroom over the weights for tracing, the ONNX protobuf and the checker [fraction of weights].
_EXPORT_OVERHEAD = 0.25


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none: not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reference_export_bytes(size: str) -> tuple[int, int]:
    """(parameters, bytes needed) to build the reference model of ``size`` in fp32 and export it.

    The parameters are counted on torch's ``meta`` device (no memory is allocated); the whole
    model is built before its components are exported, so its fp32 weights are the floor.
    """
    import torch

    from omni_ros.backends.reference_model import build_model, dims_for

    model = build_model(
        dims_for(size), seed=0, device="meta", dtype=torch.float32, attn_implementation="sdpa"
    )
    params = sum(p.numel() for p in model.parameters())
    return params, int(params * _FP32_BYTES * (1.0 + _EXPORT_OVERHEAD))


def check_memory(needed: int, available: int | None, what: str) -> None:
    """Refuse, before minutes of work end in the kernel's OOM killer, when memory is short.

    Raises:
        EngineError: ``available`` is known and below ``needed``.
    """
    if available is None or available >= needed:
        return
    gib = 1 << 30
    raise EngineError(
        f"{what} needs about {needed / gib:.1f} GiB of memory and {available / gib:.1f} GiB is "
        "available: use --size tiny, or a machine with more memory (--skip-memory-check to try "
        "anyway)"
    )


def add_engines_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``engines`` (with ``build``, ``list``, ``verify``) to an argparse subparsers object."""
    formatter = argparse.ArgumentDefaultsHelpFormatter
    engines: argparse.ArgumentParser = subparsers.add_parser(
        "engines",
        help="build, list and verify TensorRT engines",
        description=__doc__.split("\n")[0],
        formatter_class=formatter,
    )
    sub = engines.add_subparsers(dest="engines_command", required=True)

    build = sub.add_parser(
        "build", help="export components to ONNX and build engines", formatter_class=formatter
    )
    build.add_argument("--backend", choices=("reference", "minicpmo"), required=True)
    build.add_argument(
        "--components", default=",".join(COMPONENTS), help=f"comma list of {', '.join(COMPONENTS)}"
    )
    build.add_argument("--precision", choices=PRECISIONS, default="fp16")
    build.add_argument("--out", type=Path, default=DEFAULT_ENGINE_ROOT, help="engine cache root")
    build.add_argument("--model", help="minicpmo: local folder with the weights and remote code")
    build.add_argument(
        "--revision",
        default="",
        help="minicpmo: the pinned commit (required; recorded in manifests)",
    )
    build.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="minicpmo: allow the model's Python code to run (required, with --revision)",
    )
    build.add_argument("--size", choices=("tiny", "full"), default="full", help="reference size")
    build.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="export even when the memory estimate says this machine has too little",
    )
    build.add_argument("--seed", type=int, default=0, help="reference backend seed")
    build.add_argument("--max-slices", type=int, default=10, help="vision profile: max slices")
    build.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace limit")
    build.add_argument(
        "--onnx-only",
        type=Path,
        metavar="DIR",
        help="export + check the ONNX files into DIR and stop (no TensorRT needed)",
    )
    build.set_defaults(func=run_build)

    lister = sub.add_parser("list", help="list cached engines", formatter_class=formatter)
    lister.add_argument("--out", type=Path, default=DEFAULT_ENGINE_ROOT, help="engine cache root")
    lister.set_defaults(func=run_list)

    verify = sub.add_parser(
        "verify",
        help="re-hash engines and compare manifests with this machine",
        formatter_class=formatter,
    )
    verify.add_argument("--out", type=Path, default=DEFAULT_ENGINE_ROOT, help="engine cache root")
    verify.add_argument(
        "--integrity-only",
        action="store_true",
        help="check hashes and manifests only, not TensorRT version / GPU",
    )
    verify.set_defaults(func=run_verify)
    return engines


def _sources(args: argparse.Namespace, components: tuple[str, ...]) -> tuple[dict[str, Any], str]:
    import torch

    from omni_ros.tensorrt import export

    if args.backend == "reference":
        from omni_ros.backends.reference import ReferenceBackend, ReferenceConfig

        params, needed = reference_export_bytes(args.size)
        if not getattr(args, "skip_memory_check", False):
            check_memory(
                needed,
                available_memory_bytes(),
                f"the {args.size} reference model ({params / 1e9:.2f} B parameters, fp32)",
            )
        print(
            f"building the {args.size} reference model ({params / 1e9:.2f} B parameters, "
            f"~{needed / (1 << 30):.1f} GiB) ...",
            flush=True,
        )
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # Engines are exported from an fp32 copy; the precision comes from the build (ONNX / flags).
        backend = ReferenceBackend(
            ReferenceConfig(size=args.size, seed=args.seed, device=device, dtype="float32")
        )
        modules = export.reference_components(backend, components, max_slices=args.max_slices)
        return modules, export.model_revision(backend)
    if not args.model:
        raise EngineError("--backend minicpmo needs --model PATH (a local copy of the weights)")
    # The same gate as the backend: remote code runs only with --trust-remote-code and a pinned
    # --revision (a ConfigError says which is missing), through the backend's own loader.
    from omni_ros.backends.minicpmo import MiniCPMOConfig, load_pretrained

    config = MiniCPMOConfig.from_mapping(
        {
            "model": args.model,
            "trust_remote_code": bool(args.trust_remote_code),
            "revision": args.revision or None,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        }
    )
    model = load_pretrained(config, build_vocoder=True)  # the vocoder engine reads its flow
    modules = export.minicpmo_components(model, components, max_slices=args.max_slices)
    return modules, str(config.revision)


def run_build(args: argparse.Namespace) -> int:
    """Handler of ``engines build``."""
    from omni_ros.tensorrt import export
    from omni_ros.tensorrt.build import build_component, import_tensorrt

    try:
        components = parse_components(args.components)
        trt: Any = None
        env: Environment | None = None
        if not args.onnx_only:
            # Fail fast, before loading a model for minutes, when the build cannot happen here.
            trt = import_tensorrt()
            env = detect_environment(trt)
            if env.compute_capability is None:
                raise EngineError("no CUDA GPU: engines are built on the GPU they will run on")
        modules, revision = _sources(args, components)
        total = len(modules)
        if args.onnx_only:
            for k, (name, (module, spec)) in enumerate(modules.items(), 1):
                started = time.monotonic()
                print(f"[{k}/{total}] {name}: exporting to ONNX ...", flush=True)
                path = export.export_onnx(module, spec, args.onnx_only / f"{name}.onnx")
                export.check_onnx(path, spec)
                print(
                    f"[{k}/{total}] {name}: {path} (onnx.checker passed, "
                    f"{time.monotonic() - started:.1f} s)",
                    flush=True,
                )
            return 0
        cache = EngineCache(args.out)
        for k, (name, (module, spec)) in enumerate(modules.items(), 1):
            print(f"[{k}/{total}] {name}: exporting and building the engine ...", flush=True)
            result = build_component(
                module,
                spec,
                precision=args.precision,
                cache=cache,
                backend=args.backend,
                model_revision=revision,
                trt=trt,
                env=env,
                workspace_bytes=int(args.workspace_gb * (1 << 30)),
                show_progress=sys.stderr.isatty(),
            )
            print(f"[{k}/{total}] {name}: {'built' if result.built else 'cached'} {result.path}")
    except EngineError as exc:
        print(f"engines build: {exc}", file=sys.stderr)
        missing = any(t in str(exc) for t in ("not installed", "no CUDA GPU", "GiB of memory"))
        return 2 if missing else 1
    except OmniError as exc:
        print(f"engines build: {exc}", file=sys.stderr)
        return 2
    return 0


def run_list(args: argparse.Namespace) -> int:
    """Handler of ``engines list``: one row per entry (integrity is not checked here)."""
    cache = EngineCache(args.out)
    entries = cache.entries()
    if not entries:
        print(f"no engines under {cache.root}")
        return 0
    header = ("entry", "precision", "tensorrt", "cc", "gpu", "MiB", "created")
    rows = [header]
    for path in entries:
        report = verify_entry(path)
        m = report.manifest
        engine = path / ENGINE_FILE
        size = f"{engine.stat().st_size / (1 << 20):.1f}" if engine.is_file() else "-"
        if m is None:
            rows.append((path.name, "?", "?", "?", "?", size, "(no valid manifest)"))
        else:
            rows.append(
                (
                    path.name,
                    m.precision,
                    m.tensorrt_version,
                    m.compute_capability,
                    m.gpu_name,
                    size,
                    m.created,
                )
            )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return 0


def run_verify(args: argparse.Namespace, env: Environment | None = None) -> int:
    """Handler of ``engines verify``: OK / STALE / INVALID per entry with reasons; 1 if any fails."""
    cache = EngineCache(args.out)
    entries = cache.entries()
    if not entries:
        print(f"no engines under {cache.root}")
        return 0
    if not args.integrity_only:
        env = env or detect_environment()
    failed = 0
    for path in entries:
        report = verify_entry(path, None if args.integrity_only else env)
        if report.ok:
            print(f"OK       {path.name}")
            continue
        failed += 1
        stale = all(r.startswith(("stale", "TensorRT is not", "no CUDA")) for r in report.reasons)
        print(f"{'STALE' if stale else 'INVALID':8} {path.name}: " + "; ".join(report.reasons))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m omni_ros.tools.engines_cli engines list``)."""
    parser = argparse.ArgumentParser(prog="omni-ros")
    add_engines_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
