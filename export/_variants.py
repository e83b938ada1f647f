"""Deployment variants of an export's graphs (``--fp16``, ``--int8``, ``--optimize cpu``), each behind its own gate.

:func:`write_variants` runs inside an export, after the fp32 graphs have passed their gates and before the bundle is
committed: it writes ``<graph>.<variant>.onnx`` beside each portable graph in the bundle writer's temp folder,
compares every variant with the fp32 **PyTorch** module on fresh random inputs (the same samplers, batch sizes and
:func:`fine_infer.compare.compare` as the fp32 parity gate), and records the file in ``GraphEntry.variants``.

========  ======================================  ==============================================  ==========
variant   what                                    gate (vs fp32 PyTorch, every output)            TensorRT
========  ======================================  ==============================================  ==========
fp16      fp16 graph, norms/softmax/reductions    min cosine ≥ 0.999, top-10 agreement ≥ 0.9      yes (the
          in fp32, fp32 inputs/outputs                                                             fp16 input)
int8      ORT dynamic quantisation, int8 weights  min cosine ≥ 0.99, top-10 agreement ≥ 0.9       no
cpu-opt   ORT transformer fusions (contrib ops)   max abs error ≤ 1e-4, top-10 agreement ≥ 0.9    no
========  ======================================  ==============================================  ==========

For classifier outputs (``kind="logits"``) the agreement criterion is arg-max agreement, as in the fp32 gate, and
agreement is measured over every sampled row of batches 1, 3 and 8 together.

The gates run the variant with ONNX Runtime on CPU. That alone cannot fail an fp16 graph for overflow: the CPU
provider runs fp16 nodes without an fp16 kernel in fp32 and removes the casts between them, so no intermediate is
ever stored in fp16 (a naive all-fp16 LayerNorm passes there). The fp16 gate therefore also runs the graph on
``onnx.reference`` (numpy; every value stored in fp16) at batches 1 and 3 (batch 1 only from 64 MB, not at all from
256 MB: it takes ~18 s for a ResNet-50 at batch 1), gated on cosine; the ``gpu`` tests run fp16 on TensorRT.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence


from fine_infer.bundle import GraphEntry
from fine_infer.compare import Tolerance
from fine_infer.errors import ConfigError, ExportError
from fine_infer.bundle.variants import ORT_CPU_ONLY
from fine_infer.export._onnx import check_onnx
from fine_infer.export.gates import (
    DEFAULT_BATCHES,
    VARIANT_TOLERANCES,
    GraphJob,
    RunFn,
    compare_runs,
    fresh_seed,
    ort_cpu_runner,
    sample_references,
    summarize,
)
from fine_infer.export.report import ExportReport, GateFailure

VARIANTS = ("fp16", "int8", "cpu-opt")
TOLERANCES = {v: VARIANT_TOLERANCES[v] for v in VARIANTS}
# fp16 graphs also run on onnx.reference (numpy, every value stored in fp16), which is slow: ~18 s for a ResNet-50
# (48 MB in fp16) at batch 1 here. Small graphs run at batches 1 and 3, mid-size ones at batch 1 only, and larger
# ones are left to the gpu tests on TensorRT (the row records why).
EMULATE_FP16_FULL_BYTES = 64 << 20
EMULATE_FP16_MAX_BYTES = 256 << 20


def variant_file(graph: str, variant: str) -> str:
    """File name of ``variant`` of ``graph`` inside a bundle (``image.fp16.onnx``)."""
    return f"{graph}.{variant}.onnx"


def _build(variant: str, src: Path, dst: Path) -> dict[str, Any]:
    """Write one variant; returns what the converter reports."""
    if variant == "fp16":
        from fine_infer.export._fp16 import convert_to_fp16

        return convert_to_fp16(src, dst).to_dict()
    from fine_infer.export._int8 import optimize_cpu, quantize_int8

    if variant == "int8":
        ops = quantize_int8(src, dst)
        return {"quantized_ops": {k: v for k, v in ops.items() if "Integer" in k or "Quantize" in k}}
    return {"fusions": optimize_cpu(src, dst)}


def _reference_runner(onnx_path: str | Path, output_names: list[str]) -> tuple[Callable | None, int, str]:
    """(a runner on ``onnx.reference.ReferenceEvaluator``, the largest batch to give it, why not if None)."""
    size = os.path.getsize(onnx_path)
    if size > EMULATE_FP16_MAX_BYTES:
        return None, 0, f"graph over {EMULATE_FP16_MAX_BYTES >> 20} MB: too slow for the numpy reference evaluator"
    from onnx.reference import ReferenceEvaluator

    try:
        ev = ReferenceEvaluator(os.fspath(onnx_path))
    except Exception as exc:  # noqa: BLE001 - an op without a reference implementation: report, do not fail
        return None, 0, f"reference evaluator cannot load the graph: {type(exc).__name__}: {str(exc)[:120]}"
    return (lambda feeds: ev.run(output_names, feeds)), (3 if size <= EMULATE_FP16_FULL_BYTES else 1), ""


def check_variant_parity(
    job: GraphJob,
    onnx_path: str | Path,
    variant: str,
    tolerance: Tolerance,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    seed: int | None = None,
) -> tuple[list[dict], int, str]:
    """Compare ``onnx_path`` with ``job.module`` (fp32 PyTorch) on fresh inputs at ``batch_sizes``.

    The variant runs on ONNX Runtime's CPU provider. An fp16 graph also runs on ``onnx.reference`` at the batch
    sizes up to 3 (up to 1 for graphs over 64 MB; ``runtime="fp16-reference"``), gated on cosine only (agreement
    is gated on the ONNX Runtime run): ONNX Runtime's CPU provider executes fp16 nodes that lack an fp16 kernel in
    fp32 and drops the casts between them, so an fp16 overflow (x² > 65504 in a variance) never shows there, while
    the reference evaluator stores every value in fp16 as a GPU does.

    Returns (rows: per runtime, those of :func:`fine_infer.export.gates.compare_runs`; the seed; the reasons it
    failed or "")."""
    seed = fresh_seed() if seed is None else seed
    names = [t.name for t in job.spec.outputs]
    runtimes: dict[str, tuple[RunFn, int, Tolerance]] = {
        "onnxruntime": (ort_cpu_runner(onnx_path, variant), max(batch_sizes), tolerance)}
    rows: list[dict] = []
    if variant == "fp16":
        ref, max_batch, why_not = _reference_runner(onnx_path, names)
        if ref is None:
            rows.append({"runtime": "fp16-reference", "skipped": why_not})
        else:
            cosine_only = Tolerance(atol=None, min_cosine=tolerance.min_cosine, min_topk=None, k=tolerance.k)
            runtimes["fp16-reference"] = (ref, max_batch, cosine_only)
    samples = sample_references(job, batch_sizes, seed)
    reasons: list[str] = []
    for runtime, (run, max_batch, tol) in runtimes.items():
        checks, reason = compare_runs(run, job, samples, tol, seed, label=f"{variant} on {runtime}",
                                      max_batch=max_batch)
        rows += [{"runtime": runtime, **r} for r in checks]
        if reason:
            reasons.append(reason)
    return rows, seed, "; ".join(reasons)


def write_variants(
    folder: str | Path,
    entries: dict[str, GraphEntry],
    jobs: Sequence[GraphJob],
    variants: Sequence[str],
    *,
    report: ExportReport | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    gates: bool = True,
    tolerances: dict[str, Tolerance] | None = None,
    seed: int | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Write each requested variant of each graph into ``folder``, gate it, and record it in ``entries``.

    ``folder`` is the bundle writer's temp folder (``writer.tmp``) holding the fp32 graphs named by ``entries``;
    ``jobs`` are the export's :class:`GraphJob` (module + sampler). Returns one report row per (graph, variant); with
    ``report`` the rows also go to ``report.graphs[graph]["variants"][variant]`` and a failed gate raises
    :class:`fine_infer.export.GateFailure` carrying that report (otherwise :class:`ExportError`)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    tolerances = {**TOLERANCES, **(tolerances or {})}
    folder = Path(folder)
    rows: list[dict[str, Any]] = []
    by_name = {job.spec.name: job for job in jobs}
    for name, entry in entries.items():
        job = by_name.get(name)
        if job is None:
            raise ConfigError(f"no export job for graph {name!r}; jobs: {', '.join(by_name)}")
        for variant in dict.fromkeys(variants):  # keep order, drop repeats
            fname = variant_file(name, variant)
            t0 = time.perf_counter()
            info = _build(variant, folder / entry.file, folder / fname)
            row: dict[str, Any] = {"graph": name, "variant": variant, "file": fname,
                                   "tensorrt": variant not in ORT_CPU_ONLY, **info}
            check_onnx(folder / fname)  # contrib-op domains are skipped by the checker, the rest is checked
            row["checker"] = "passed"
            if gates:
                tol = tolerances[variant]
                checks, used_seed, reason = check_variant_parity(job, folder / fname, variant, tol, batch_sizes, seed)
                pooled = [r for r in checks if r.get("batch") == "all"]
                row.update(passed=not reason, reason=reason, seed=used_seed,
                           tolerance={"atol": tol.atol, "min_cosine": tol.min_cosine, "min_topk": tol.min_topk,
                                      "k": tol.k},
                           summary=summarize(pooled), checks=checks)
            else:
                row.update(passed=True, reason="", gate="skipped")
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            if report is not None:
                report.graphs.setdefault(name, {}).setdefault("variants", {})[variant] = row
            if log:
                s = row.get("summary") or {}
                log(f"{name}.{variant}: " + (f"min cosine {s['min_cosine']:.6f} agreement "
                                             f"{s['topk_agreement']:.3f}" if s else "gate skipped"))
            if not row["passed"]:
                msg = f"{variant} gate failed: {row['reason']} (seed {row['seed']})"
                if report is not None:
                    report.passed = False
                    report.reason = msg
                    raise GateFailure(msg, report)
                raise ExportError(msg)
            entry.variants[variant] = fname
    return rows
