"""The ``fine-infer eval`` command: the papers' retrieval protocols on the generated catalogue, PyTorch vs bundle.

Registered by :func:`add_commands` from ``fine_infer.cli.build_parser``. A thin layer over
:mod:`fine_infer.tools.evaluate`: the bundle's PyTorch model (rebuilt from its ``weights.safetensors``) and each ONNX
variant asked for are evaluated on the same held-out items and printed side by side, or as JSON.
"""

from __future__ import annotations

import argparse
import sys
import json
from pathlib import Path

from fine_infer.cli._args import AddCommand
from fine_infer.errors import ConfigError


def _variants(bundle: Path, asked: list[str] | None) -> list[str]:
    """The ONNX variants to evaluate: those asked for, or fp32 plus every ONNX Runtime variant the bundle has."""
    from fine_infer.bundle import read_bundle
    from fine_infer.bundle.variants import available_variants

    b = read_bundle(bundle, verify=False)
    have = sorted({v for e in b.manifest.graphs.values() for v in available_variants(e) if not v.startswith("trt")})
    if not asked:
        return ["fp32", *[v for v in have if v != "fp32"]]
    unknown = [v for v in asked if v != "fp32" and v not in have]
    if unknown:
        raise ConfigError(f"bundle {bundle} has no variant {', '.join(unknown)}; it has fp32"
                          + "".join(f", {v}" for v in have if v != "fp32")
                          + " (export with --fp16/--int8/--optimize cpu to add one)")
    return asked


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a zoo bundle on the catalogue's held-out split: FashionGen R@1/5/10 (text↔image), FashionIQ
    R@10/50 (composed), image R@K (triplet) or attribute accuracy; PyTorch and each ONNX variant side by side."""
    from fine_infer.tools.evaluate import evaluate_bundle, evaluate_reference, side_by_side

    bundle = Path(args.bundle)
    if args.n < 2 * 101:
        raise ConfigError(f"--n {args.n} is too small: the FashionGen protocol needs 100 negatives a query; use ≥ 202")
    variants = _variants(bundle, args.variant)
    from fine_infer.bundle import read_manifest

    if (read_manifest(bundle).weights_origin or {}).get("kind") == "random":
        print(f"fine-infer eval: note: {bundle} holds random weights (exported without --pretrained or --checkpoint): "
              "expect chance-level recall", file=sys.stderr)
    reports = []
    if not args.no_reference:
        reports.append(evaluate_reference(bundle, n=args.n, seed=args.seed))
    for v in variants:
        reports.append(evaluate_bundle(bundle, backend=args.backend, variant=v, n=args.n, seed=args.seed))
    if args.json:
        print(json.dumps({"bundle": str(bundle), "reports": [r.to_dict() for r in reports]}, indent=2))
    else:
        print(side_by_side(reports))
        if not args.no_reference:
            ref = reports[0].headline
            worst = max(abs(r.headline - ref) for r in reports[1:]) if len(reports) > 1 else 0.0
            print(f"largest gap to PyTorch on the headline metric: {100 * worst:.2f} points")
    return 0


def register(add: AddCommand) -> None:
    """Register ``eval`` on the CLI's subparsers (``add(name, fn, help)`` makes one)."""
    from fine_infer.tools.evaluate import DEFAULT_N, DEFAULT_SEED

    ev = add("eval", cmd_eval, "retrieval quality on the generated catalogue, PyTorch vs the bundle's variants")
    ev.add_argument("bundle", help="a bundle exported from a zoo arch (fashion-fine, maaf, raf, triplet, attributes)")
    ev.add_argument("--variant", action="append", metavar="NAME",
                    help="ONNX variant to evaluate (repeatable; default: fp32 and every variant the bundle has)")
    ev.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "auto"],
                    help="runtime for the bundle's graphs")
    ev.add_argument("--n", type=int, default=DEFAULT_N, help="held-out items")
    ev.add_argument("--seed", type=int, default=DEFAULT_SEED, help="catalogue seed (default: the training one)")
    ev.add_argument("--no-reference", action="store_true",
                    help="skip the PyTorch model (needs no torch; bundles exported with --no-weights need this)")
    ev.add_argument("--json", action="store_true", help="print the reports as JSON")


__all__ = ["cmd_eval", "register"]
