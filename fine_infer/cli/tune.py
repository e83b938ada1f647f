"""The ``tune`` command of the ``fine-infer`` CLI (registered by :func:`add_commands`).

``fine-infer tune BUNDLE`` times every CPU path of the bundle that can run here (ONNX Runtime fp32 / int8 /
int8-static / cpu-opt, OpenVINO f32 / bf16 / int8) at batch 1 and 8 in interleaved rounds, prints each path's median
speedup over ONNX Runtime fp32, its spread and gate, and stores the result in the bundle, where
``load(bundle, backend="auto")`` runs the pick (ONNX Runtime fp32 when the best margin is inside the noise). A thin
layer over :mod:`fine_infer.tools.tune`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fine_infer.cli._args import AddCommand, add_bundle_arg



def format_tune(result: dict[str, Any]) -> str:
    """One line per CPU path (median speedup over rounds, its spread, gate, p50 per graph@batch or why skipped), then
    the choice, its verdict and why, the runs and the load seen."""
    lines = [f"{'path':<26} {'speedup':>8} {'q25-q75':>11} {'gate':<8} median ms per graph@batch"]
    for label, p in result["paths"].items():
        speed = f"{p['speedup']:.2f}×" if p.get("speedup") else "-"
        sp = p.get("spread")
        spread = f"{sp['q25']:.2f}-{sp['q75']:.2f}" if sp else ""
        cells = ", ".join(f"{k} {v:.2f}" for k, v in (p.get("p50_ms") or {}).items())
        lines.append(f"{label:<26} {speed:>8} {spread:>11} {p['gate']:<8} "
                     + (cells or f"skipped: {p.get('skipped', '')}"))
        if p["gate"] not in ("passed",) and p.get("speedup"):
            lines.append(f"{'':<26} {'':>8} {'':>11} {'':<8} gate: {p['gate_detail']}")
    verdict = f" [{result['verdict']}]" if result.get("verdict") else ""
    lines.append(f"choice: {result['choice']}{verdict}: {result['reason']}")
    if result.get("runs"):
        lines.append(f"runs: {', '.join(r['choice'] for r in result['runs'])} ({result.get('rounds')} rounds each; "
                     + ("they agree" if result.get("agree") else "they DO NOT agree") + ")")
    sig = result.get("signature") or {}
    load = result.get("load") or {}
    lines.append(f"machine: {sig.get('cpu')} ({sig.get('cores')} cores)"
                 + (f"; load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after" if load else ""))
    return "\n".join(lines)


def cmd_tune(args: argparse.Namespace) -> int:
    """Time every CPU path of a bundle here, pick the fastest that passed its precision gate, store it in the bundle.

    Gate the paths first with `fine-infer validate BUNDLE --backend onnxruntime openvino`: an ungated or failed path is
    measured and shown but never picked."""
    from fine_infer.tools import bench
    from fine_infer.tools.tune import tune_bundle, write_tune

    result = tune_bundle(args.bundle, batch_sizes=args.batch_sizes, graphs=args.graphs,
                         budget=bench.QUICK if args.quick else bench.Budget(), threads=args.threads,
                         progress=not args.no_progress, rounds=args.rounds, runs=args.runs)
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        print(format_tune(result))
    if not args.dry_run:
        name = write_tune(args.bundle, result)
        if not args.json:
            print(f"wrote {name} into {args.bundle}; load(..., backend='auto') now runs {result['choice']} here")
    return 0


def register(add: AddCommand) -> None:
    """Register ``tune`` with the CLI's ``add(name, fn, help)`` helper."""
    t = add("tune", cmd_tune, "measure the CPU paths of a bundle and store the fastest gated one for backend=auto")
    add_bundle_arg(t)
    t.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="batch sizes to time")
    t.add_argument("--graphs", nargs="+", help="graphs to time (default: all)")
    t.add_argument("--threads", type=int, help="intra-op threads of ONNX Runtime and OpenVINO (default: theirs)")
    t.add_argument("--quick", action="store_true", help="a smoke run: 3 rounds, 1 run (noisier)")
    t.add_argument("--rounds", type=int, help="interleaved rounds per run (default 7; every path once per round)")
    t.add_argument("--runs", type=int, help="independent runs (default 3); the result says whether they agree")
    t.add_argument("--dry-run", action="store_true", help="measure and print, but do not write into the bundle")
    t.add_argument("--json", action="store_true", help="print the tune result as JSON")
    t.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
