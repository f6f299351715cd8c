"""``omni-ros engines build|list|verify``: build, list and verify TensorRT engines.

Wire it into the ``omni-ros`` entry point with::

    sub = parser.add_subparsers(dest="command", required=True)
    add_engines_subparser(sub)
    args = parser.parse_args(argv)
    return args.func(args)

Exit codes: 0 success, 1 an entry failed verification / a build failed, 2 usage or environment
problem (no TensorRT, no GPU, no model path).
"""

from __future__ import annotations

import argparse
import logging
import sys
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


def add_engines_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``engines`` (with ``build``, ``list``, ``verify``) to an argparse subparsers object."""
    engines: argparse.ArgumentParser = subparsers.add_parser(
        "engines",
        help="build, list and verify TensorRT engines",
        description=__doc__.split("\n")[0],
    )
    sub = engines.add_subparsers(dest="engines_command", required=True)

    build = sub.add_parser("build", help="export components to ONNX and build engines")
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

    lister = sub.add_parser("list", help="list cached engines")
    lister.add_argument("--out", type=Path, default=DEFAULT_ENGINE_ROOT, help="engine cache root")
    lister.set_defaults(func=run_list)

    verify = sub.add_parser(
        "verify", help="re-hash engines and compare manifests with this machine"
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
        if args.onnx_only:
            for name, (module, spec) in modules.items():
                path = export.export_onnx(module, spec, args.onnx_only / f"{name}.onnx")
                export.check_onnx(path, spec)
                print(f"{name}: {path} (onnx.checker passed)")
            return 0
        cache = EngineCache(args.out)
        for name, (module, spec) in modules.items():
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
            print(f"{name}: {'built' if result.built else 'cached'} {result.path}")
    except EngineError as exc:
        print(f"engines build: {exc}", file=sys.stderr)
        missing = "not installed" in str(exc) or "no CUDA GPU" in str(exc)
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
