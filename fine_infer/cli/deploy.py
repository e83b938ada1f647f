"""Deployment commands of the ``fine-infer`` CLI: ``lint``, ``build-engine``, ``triton-repo``.

Registered by :func:`add_commands`, called from ``fine_infer.cli.build_parser``. Like the other commands they are a
thin layer over the Python API (``fine_infer.export.lint``, ``.engines``, ``.triton_repo``), print one line
per result, and raise :class:`fine_infer.errors.FineInferError` subclasses that ``cli.main`` turns into one-line
errors with a non-zero exit. TensorRT is imported only by ``build-engine``, and on a machine without it that
command fails with one line saying so while the others work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fine_infer.cli._args import AddCommand, add_bundle_arg, positive, print_json
from fine_infer.errors import ConfigError



def _triple(text: str) -> tuple[int, int, int]:
    """``"1,4,16"`` → (1, 4, 16) for --batch/--sequence."""
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX integers, got {text!r}") from None
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX (three integers), got {text!r}")
    return vals  # type: ignore[return-value]


def _axes(items: list[str] | None) -> dict[str, tuple[int, int, int]]:
    """``--axis height=224,224,448`` (repeatable) → {"height": (224, 224, 448)}."""
    out = {}
    for item in items or []:
        name, sep, rng = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--axis takes NAME=MIN,OPT,MAX, got {item!r}")
        try:
            out[name] = _triple(rng)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--axis {item!r}: {exc}") from None
        from fine_infer.export.engines import profile_range  # the order rule build-engine applies (lint too)

        profile_range(name, out[name])
    return out


def cmd_lint(args: argparse.Namespace) -> int:
    """Check that TensorRT's ONNX parser takes a bundle's graphs (or one .onnx file): ops, dtypes, opset, dims."""
    from fine_infer.export.lint import lint_bundle, lint_onnx

    target = Path(args.target)
    axes = {"batch", "sequence", *_axes(args.axis)}
    if target.is_dir():
        reports = lint_bundle(target, profile_axes=axes)
    elif target.suffix == ".onnx" and target.is_file():
        reports = {target.name: lint_onnx(target, profile_axes=axes)}
    else:
        raise ConfigError(f"{target} is neither a bundle folder nor an .onnx file")
    if args.json:
        print_json({name: r.to_dict() for name, r in reports.items()})
    else:
        for name, r in reports.items():
            print(f"{name}: {r.summary()}")
            for f in r.findings if args.verbose else r.errors[:5]:
                print("  " + f.line())
    return 0 if all(r.passed for r in reports.values()) else 1


def cmd_build_engine(args: argparse.Namespace) -> int:
    """Build TensorRT engines for a bundle's graphs on this device (profiles, timing cache) and record them."""
    from fine_infer.export.engines import DEFAULT_BATCH, build_bundle_engines

    infos = build_bundle_engines(
        args.bundle, graphs=args.graphs, fp16=args.fp16, batch=args.batch or DEFAULT_BATCH, sequence=args.sequence,
        axes=_axes(args.axis), timing_cache=args.timing_cache, workspace_mib=args.workspace, lint=not args.no_lint,
        device=args.device, version_compatible=args.version_compatible,
        hardware_compatibility=args.hardware_compatible,
    )
    if args.json:
        print_json([i.to_dict() for i in infos])
    else:
        for i in infos:
            modes = [m for m, on in (("version-compatible", i.version_compatible),
                                     (f"hardware-compatible {i.hardware_compatibility}",
                                      i.hardware_compatibility != "none")) if on]
            print(f"built {i.engine} from {i.onnx}: {i.precision} ({i.typing}ly typed"
                  f"{', ' + ', '.join(modes) if modes else ''}), TensorRT {i.tensorrt_version} on {i.gpu} "
                  f"(sm {i.compute_capability}, device {i.device}) in {i.seconds:.1f} s; timing cache: "
                  f"{i.timing_cache_status}")
    return 0


def cmd_triton_repo(args: argparse.Namespace) -> int:
    """Write an NVIDIA Triton Inference Server model repository for a bundle: per graph an ensemble taking raw text and
    image bytes (the bundle's preprocessing in a Python-backend model), the graph with dynamic batching, and with
    --index a search ensemble."""
    from fine_infer.export.triton_repo import write_triton_repo

    if args.index:
        _check_index(args.bundle, args.index)
    models = write_triton_repo(args.bundle, args.out, variant=args.variant, engines=not args.no_engines,
                               max_batch_size=args.max_batch_size, force=args.force,
                               tensorrt_version=args.tensorrt_version, backend=args.backend,
                               tensors_only=args.tensors_only, index=args.index, k=args.k, instances=args.instances,
                               preprocess_instances=args.preprocess_instances, threads=args.threads,
                               prefix=args.prefix)
    if args.json:
        print_json(models)
    else:
        print(f"wrote {args.out}: " + ", ".join(f"{n} ({m['platform']})" for n, m in models.items()))
    return 0


def _check_index(bundle: str, index: str) -> None:
    """An index whose vectors the bundle's embeddings cannot search is refused before anything is written."""
    from fine_infer.bundle import read_manifest
    from fine_infer.index import Index

    dim = read_manifest(bundle).embed_dim
    have = Index.load(index, mmap=True, verify=False).dim  # the header only; the server verifies the whole file
    if dim is not None and have != dim:
        raise ConfigError(f"index {index} holds {have}-dimensional vectors; the bundle's embeddings have {dim}")


def register(add: AddCommand) -> None:
    """Register ``lint``, ``build-engine`` and ``triton-repo`` with ``add(name, fn, help)`` from ``build_parser``."""
    lint = add("lint", cmd_lint, "check a bundle or .onnx file against the TensorRT ONNX parser's supported ops")
    lint.add_argument("target", help="bundle folder or .onnx file")
    lint.add_argument("--axis", action="append", metavar="NAME=MIN,OPT,MAX",
                      help="another dynamic axis an optimisation profile will cover (batch and sequence always are)")
    lint.add_argument("--verbose", action="store_true", help="print every finding, warnings too")
    lint.add_argument("--json", action="store_true", help="print the lint reports as JSON")

    be = add("build-engine", cmd_build_engine, "build TensorRT engines for a bundle on this GPU")
    add_bundle_arg(be)
    be.add_argument("--fp16", action="store_true",
                    help="fp16 engines: from the bundle's fp16 graphs (export --fp16; required on TensorRT 11)")
    be.add_argument("--graphs", nargs="+", help="only these graphs (default: all)")
    be.add_argument("--batch", type=_triple, metavar="MIN,OPT,MAX", help="batch profile (default 1,4,16)")
    be.add_argument("--sequence", type=_triple, metavar="MIN,OPT,MAX",
                    help="sequence profile (default 1,MAX,MAX with the bundle's max text length)")
    be.add_argument("--axis", action="append", metavar="NAME=MIN,OPT,MAX", help="profile of another dynamic axis")
    be.add_argument("--timing-cache", help="timing cache file to reuse and update (default: one kept in the bundle)")
    be.add_argument("--workspace", type=int, metavar="MIB", help="builder workspace limit in MiB")
    be.add_argument("--device", type=int, default=0, help="CUDA device index to build on (and for)")
    be.add_argument("--version-compatible", action="store_true",
                    help="a plan later TensorRT releases of the same major (and 10 -> 11) also run (lean runtime "
                         "embedded; may be slower; Triton needs --backend-config=tensorrt,version-compatible=true)")
    be.add_argument("--hardware-compatible", choices=["none", "ampere+", "same-cc"], default="none",
                    help="a plan other GPUs run: any Ampere or newer (ampere+) or any of this compute capability "
                         "(same-cc); may be slower (none: this GPU's architecture only)")
    be.add_argument("--no-lint", action="store_true", help="skip the TensorRT lint before building")
    be.add_argument("--json", action="store_true", help="print the engine records as JSON")

    tr = add("triton-repo", cmd_triton_repo, "write a Triton Inference Server model repository for a bundle")
    add_bundle_arg(tr)
    tr.add_argument("--out", required=True, help="repository folder to write")
    tr.add_argument("--variant", choices=["fp32", "fp16", "int8", "cpu-opt"], default=None,
                    help="which graph variant to serve (default: the portable fp32 graph, or its engine)")
    tr.add_argument("--no-engines", action="store_true", help="serve ONNX even where the bundle has a TensorRT engine")
    tr.add_argument("--max-batch-size", type=int, default=16, help="Triton max_batch_size")
    tr.add_argument("--force", action="store_true", help="replace an existing repository")
    tr.add_argument("--tensorrt-version", metavar="X.Y.Z",
                    help="the TensorRT version of the Triton server that will load the plans: an engine that will "
                         "not run on it is refused (without this flag: a warning naming the version each plan needs)")
    tr.add_argument("--backend", choices=["onnxruntime", "tensorrt", "python"], default=None,
                    help="what runs each graph: Triton's ONNX Runtime or TensorRT backend, or the Python backend "
                         "through fine_infer.load (ONNX Runtime / OpenVINO on CPU: a CPU-only Triton serves the whole "
                         "repository) (default: the bundle's engine where it has one, else onnxruntime)")
    tr.add_argument("--tensors-only", action="store_true",
                    help="write the graph models alone (tensor inputs, no Python-backend preprocessing or ensembles)")
    tr.add_argument("--index", metavar="FILE", help="an index file (fine-infer index): adds a search model and, per "
                                                    "embedding graph, a search ensemble (raw query in, top-k out)")
    tr.add_argument("--k", type=positive("--k"), default=10, help="hits a search ensemble returns unless asked")
    tr.add_argument("--instances", type=positive("--instances"), default=1, help="instances of each graph model")
    tr.add_argument("--preprocess-instances", type=positive("--preprocess-instances"), default=1,
                    help="instances (processes) of the preprocessing model")
    tr.add_argument("--threads", type=positive("--threads"),
                    help="with --backend python: intra-op threads of each graph instance (default: the runtime's)")
    tr.add_argument("--prefix", help="model names start with this (default: the bundle's arch)")
    tr.add_argument("--json", action="store_true", help="print what was written as JSON")
