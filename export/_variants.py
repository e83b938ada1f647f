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
int8-     ORT static QDQ int8, calibrated         min cosine ≥ 0.99, top-10 agreement ≥ 0.9,      no
static                                            on HELD-OUT real inputs
openvino- NNCF int8 OpenVINO IR (.xml + .bin),    min cosine ≥ 0.99, top-10 agreement ≥ 0.9,      no
int8      calibrated                              on HELD-OUT real inputs, run on OpenVINO
========  ======================================  ==============================================  ==========

The two calibrated variants (``export --int8-static``, both at once) are quantised on real inputs
(:class:`fine_infer.export._calibrate.CalibrationData`, through the bundle's own preprocessing and tokenisation) and
gated on held-out ones the calibration never saw, against fp32 PyTorch on those inputs. A graph whose inputs the data
cannot feed (a text graph given only images, a custom input) is calibrated and gated on the export's random sampler
instead, and its row says so (``calibration.random``).

For classifier outputs (``kind="logits"``) the agreement criterion is arg-max agreement, as in the fp32 gate, and
agreement is measured over every sampled row of batches 1, 3 and 8 together.

The gates run the variant with ONNX Runtime on CPU. That alone cannot fail an fp16 graph for overflow: the CPU
provider runs fp16 nodes without an fp16 kernel in fp32 and removes the casts between them, so no intermediate is
ever stored in fp16 (a naive all-fp16 LayerNorm passes there). The fp16 gate therefore also runs the graph on
``onnx.reference`` (numpy; every value stored in fp16) at batches 1 and 3 (batch 1 only from 64 MB, not at all from
256 MB: it takes ~18 s for a ResNet-50 at batch 1), gated on cosine; the ``gpu`` tests run fp16 on TensorRT.

Every requested variant of every graph is gated before anything is decided, so a failure names all that passed and
all that failed (:func:`gate_line`). A failed variant fails the export; with ``drop_failed`` (``export
--drop-failed-variants``) it is left out of the bundle on every graph instead, and why is recorded in the manifest's
``validation.dropped_variants``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from typing import Any, Callable, Sequence


from fine_infer.bundle import GraphEntry
from fine_infer.compare import Tolerance
from fine_infer.errors import ConfigError, ExportError
from fine_infer.bundle.variants import ORT_CPU_ONLY
from fine_infer.export._onnx import check_onnx
from fine_infer.export.gates import (
    DEFAULT_BATCHES,
    Sample,
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

VARIANTS = ("fp16", "int8", "int8-static", "openvino-int8", "cpu-opt")
CALIBRATED = ("int8-static", "openvino-int8")
TOLERANCES = {v: VARIANT_TOLERANCES[v] for v in VARIANTS}
OPENVINO_IR = ("openvino-int8",)  # variants written as an OpenVINO IR (.xml + .bin), not ONNX
# fp16 graphs also run on onnx.reference (numpy, every value stored in fp16), which is slow: ~18 s for a ResNet-50
# (48 MB in fp16) at batch 1 here. Small graphs run at batches 1 and 3, mid-size ones at batch 1 only, and larger
# ones are left to the gpu tests on TensorRT (the row records why).
EMULATE_FP16_FULL_BYTES = 64 << 20
EMULATE_FP16_MAX_BYTES = 256 << 20


def variant_file(graph: str, variant: str) -> str:
    """File name of ``variant`` of ``graph`` inside a bundle (``image.fp16.onnx``; ``image.openvino-int8.xml``, whose
    weights are the ``.bin`` of the same name)."""
    return f"{graph}.{variant}.{'xml' if variant in OPENVINO_IR else 'onnx'}"


def variant_files(graph: str, variant: str) -> list[str]:
    """Every file ``variant`` of ``graph`` writes (an OpenVINO IR: the .xml and its .bin)."""
    name = variant_file(graph, variant)
    return [name, name[:-4] + ".bin"] if variant in OPENVINO_IR else [name]


def _build(variant: str, src: Path, dst: Path, calibrate: Sequence[dict] | None = None,
           calibration: Any = None, score: Callable | None = None) -> dict[str, Any]:
    """Write one variant; returns what the converter reports. ``calibrate``: the calibration samples of the
    calibrated variants (``calibration``: their :class:`~fine_infer.export._calibrate.CalibrationData`, ``score``:
    rates an OpenVINO candidate on them)."""
    if variant == "fp16":
        from fine_infer.export._fp16 import convert_to_fp16

        return convert_to_fp16(src, dst).to_dict()
    if variant == "int8-static":
        from fine_infer.export._calibrate import quantize_static_ort

        return quantize_static_ort(src, dst, calibrate or [])
    if variant == "openvino-int8":
        from fine_infer.export._calibrate import quantize_openvino

        return quantize_openvino(src, dst, calibrate or [], subset_size=getattr(calibration, "subset_size", None),
                                 smooth_quant=getattr(calibration, "smooth_quant", "auto"), score=score)
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
    samples: Sequence[Sample] | None = None,
) -> tuple[list[dict], int, str]:
    """Compare ``onnx_path`` with ``job.module`` (fp32 PyTorch) on fresh inputs at ``batch_sizes``.

    The variant runs on ONNX Runtime's CPU provider. An fp16 graph also runs on ``onnx.reference`` at the batch
    sizes up to 3 (up to 1 for graphs over 64 MB; ``runtime="fp16-reference"``), gated on cosine only (agreement
    is gated on the ONNX Runtime run): ONNX Runtime's CPU provider executes fp16 nodes that lack an fp16 kernel in
    fp32 and drops the casts between them, so an fp16 overflow (x² > 65504 in a variance) never shows there, while
    the reference evaluator stores every value in fp16 as a GPU does.

    ``samples``: the inputs and fp32 PyTorch outputs to compare on (the calibrated variants' held-out real inputs;
    default: fresh random ones from ``seed``). An ``openvino-int8`` IR runs on OpenVINO (float ops at f32) instead.

    Returns (rows: per runtime, those of :func:`fine_infer.export.gates.compare_runs`; the seed; the reasons it
    failed or "")."""
    seed = fresh_seed() if seed is None else seed
    names = [t.name for t in job.spec.outputs]
    if variant in OPENVINO_IR:
        from fine_infer.export._calibrate import openvino_runner

        runtimes: dict[str, tuple[RunFn, int | None, Tolerance]] = {
            "openvino": (openvino_runner(onnx_path), None, tolerance)}
    else:
        runtimes = {"onnxruntime": (ort_cpu_runner(onnx_path, variant), None if samples else max(batch_sizes),
                                    tolerance)}
    rows: list[dict] = []
    if variant == "fp16":
        ref, max_batch, why_not = _reference_runner(onnx_path, names)
        if ref is None:
            rows.append({"runtime": "fp16-reference", "skipped": why_not})
        else:
            cosine_only = Tolerance(atol=None, min_cosine=tolerance.min_cosine, min_topk=None, k=tolerance.k)
            runtimes["fp16-reference"] = (ref, max_batch, cosine_only)
    samples = list(samples) if samples is not None else sample_references(job, batch_sizes, seed)
    reasons: list[str] = []
    for runtime, (run, max_batch, tol) in runtimes.items():
        checks, reason = compare_runs(run, job, samples, tol, seed, label=f"{variant} on {runtime}",
                                      max_batch=max_batch)
        rows += [{"runtime": runtime, **r} for r in checks]
        if reason:
            reasons.append(reason)
    return rows, seed, "; ".join(reasons)


# The command-line flag that asks for each variant (the failure line says what to rerun).
CLI_FLAGS = {"fp16": "--fp16", "int8": "--int8", "int8-static": "--int8-static", "openvino-int8": "--int8-static",
             "cpu-opt": "--optimize cpu"}


def _real_samples(job: GraphJob, held: Sequence[dict]) -> list[Sample]:
    """The held-out real inputs and fp32 PyTorch's outputs for them."""
    import torch

    out = []
    for feeds in held:
        with torch.no_grad():
            ref = job.module(*[torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in job.spec.inputs])
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        seq = int(feeds["input_ids"].shape[1]) if "input_ids" in feeds else None
        out.append(Sample(int(next(iter(feeds.values())).shape[0]), seq, dict(feeds),
                          [r.detach().float().numpy() for r in refs]))
    return out


def _random_calibration(job: GraphJob, n: int, seed: int) -> list[dict]:
    """``n`` batch-1 samples of the export's random sampler (a graph the calibration data cannot feed)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [{k: v.numpy() for k, v in job.sampler(1, job.max_seq_len, gen).items()} for _ in range(n)]


def _calibration_for(job: GraphJob, calibration: Any, preprocessing: tuple, seed: int) -> dict[str, Any]:
    """The calibrated variants' inputs for one graph: ``calibrate`` (samples), ``held`` (gate samples or None for
    fresh random ones) and ``record`` (what the row says about them)."""
    from fine_infer.export._calibrate import graph_calibration

    image, text, tokenizer = preprocessing
    gc = graph_calibration(job.spec, calibration, image, text, tokenizer)
    if gc.random:
        return {"calibrate": _random_calibration(job, calibration.size, seed), "held": None,
                "record": {"random": gc.random, "samples": calibration.size,
                           "note": "calibrated and gated on the export's random sampler"}}
    return {"calibrate": gc.calibrate, "held": _real_samples(job, gc.held_out),
            "record": {"data": gc.what, "samples": len(gc.calibrate),
                       "held_out": sum(len(next(iter(f.values()))) for f in gc.held_out)}}


def _score(job: GraphJob, calibrate: Sequence[dict]) -> Callable:
    """Rates a candidate runner by its min cosine against fp32 PyTorch on (up to 16 of) the calibration inputs: how
    :func:`fine_infer.export._calibrate.quantize_openvino` keeps SmoothQuant on or off without seeing the held-out
    inputs."""
    from fine_infer.compare import compare

    refs = _real_samples(job, list(calibrate)[:16])

    def score(run: Callable) -> float:
        worst = 1.0
        for s in refs:
            got = run(s.feeds)
            for t, r in zip(job.spec.outputs, s.references):
                c = compare(r, np.asarray(got[t.name], np.float32), Tolerance(atol=None, min_topk=None))
                worst = min(worst, c.min_cosine)
        return worst

    return score


def _gate_one(folder: Path, name: str, entry: GraphEntry, job: GraphJob, variant: str, gates: bool,
              tol: Tolerance, batch_sizes: Sequence[int], seed: int | None,
              cal: dict[str, Any] | None = None, calibration: Any = None) -> dict[str, Any]:
    """Build, check and gate one (graph, variant); a build or checker error is a failed row, not an exception.
    ``cal``: the calibrated variants' inputs for this graph (:func:`_calibration_for`)."""
    fname = variant_file(name, variant)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"graph": name, "variant": variant, "file": fname,
                           "tensorrt": variant not in ORT_CPU_ONLY and variant not in CALIBRATED}
    if cal is not None:
        row["calibration"] = cal["record"]
    try:
        score = _score(job, cal["calibrate"]) if variant in OPENVINO_IR and cal and cal["held"] is not None else None
        row.update(_build(variant, folder / entry.file, folder / fname, cal["calibrate"] if cal else None,
                          calibration, score))
        if variant in OPENVINO_IR:
            row["checker"] = "n/a (OpenVINO IR)"
        else:
            check_onnx(folder / fname)  # contrib-op domains are skipped by the checker, the rest is checked
            row["checker"] = "passed"
    except ExportError as exc:
        row.update(passed=False, reason=str(exc).splitlines()[0], seed=None)
    else:
        if gates:
            held = cal["held"] if cal else None
            checks, used_seed, reason = check_variant_parity(job, folder / fname, variant, tol, batch_sizes, seed,
                                                             samples=held)
            pooled = [r for r in checks if r.get("batch") == "all"]
            row.update(passed=not reason, reason=reason, seed=used_seed,
                       inputs="held-out real" if held is not None else "fresh random",
                       tolerance={"atol": tol.atol, "min_cosine": tol.min_cosine, "min_topk": tol.min_topk,
                                  "k": tol.k},
                       summary=summarize(pooled), checks=checks)
        else:
            row.update(passed=True, reason="", gate="skipped")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def gate_line(rows: Sequence[dict[str, Any]], dropped: bool = False) -> str:
    """One line over every (graph, variant) row: which variants passed, which failed (the first figure of each
    failed graph, with its seed) and what to rerun; ``dropped``: the line of an export that kept the bundle
    without the failed variants."""
    order = list(dict.fromkeys(r["variant"] for r in rows))
    failed = {v: [r for r in rows if r["variant"] == v and not r["passed"]] for v in order}
    bad = [v for v in order if failed[v]]
    good = [v for v in order if not failed[v]]

    def why(r: dict[str, Any]) -> str:
        first = r["reason"].split("; ")[0]
        return first + (f", seed {r['seed']}" if r.get("seed") is not None else "")

    flags = " / ".join(dict.fromkeys(CLI_FLAGS[v] for v in bad))
    line = (f"variant gates: passed {', '.join(good) or 'none'}; FAILED "
            + "; ".join(f"{v} ({'; '.join(why(r) for r in failed[v])})" for v in bad))
    if dropped:
        return (f"{line}; wrote the bundle without {', '.join(bad)} (why is recorded in its manifest's "
                f"validation.dropped_variants); rerun without {flags} to ask only for variants that pass")
    return (f"{line}; nothing was written: rerun without {flags}, or with --drop-failed-variants (Python: "
            f"drop_failed_variants=True) to keep the bundle without {'it' if len(bad) == 1 else 'them'}")


def dropped_variants(graphs: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """From an export report's ``graphs``: each variant dropped by ``drop_failed_variants`` → why (one reason per
    failed graph, ``graph: reason``); empty when none was."""
    out: dict[str, list[str]] = {}
    for name, g in graphs.items():
        for variant, row in g.get("variants", {}).items():
            if row.get("dropped"):
                out.setdefault(variant, [])
                if not row.get("passed"):
                    out[variant].append(f"{name}: {row['reason']}")
    return out


def drop_warning(graphs: dict[str, dict[str, Any]]) -> str:
    """From an export report's ``graphs``: the :func:`gate_line` of an export that dropped failed variants, or ""."""
    rows = [row for g in graphs.values() for row in g.get("variants", {}).values()]
    return gate_line(rows, dropped=True) if any(r.get("dropped") for r in rows) else ""


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
    drop_failed: bool = False,
    calibration: Any = None,
    preprocessing: tuple = (None, None, None),
) -> list[dict[str, Any]]:
    """Write each requested variant of each graph into ``folder``, gate it, and record it in ``entries``.

    ``folder`` is the bundle writer's temp folder (``writer.tmp``) holding the fp32 graphs named by ``entries``;
    ``jobs`` are the export's :class:`GraphJob` (module + sampler). Every requested variant of every graph is built
    and gated before anything is decided (a build or checker error counts as a failed gate). Returns one report row
    per (graph, variant); with ``report`` the rows also go to ``report.graphs[graph]["variants"][variant]``.

    A variant is recorded in ``entries`` only when it passed on every graph. If any failed, a
    :class:`fine_infer.export.GateFailure` carrying ``report`` (without ``report``: :class:`ExportError`) is raised
    with :func:`gate_line` (passed, failed with figures, what to rerun) — unless ``drop_failed``: then the failed
    variants' files are deleted from ``folder`` for every graph, their rows are marked ``dropped`` (see
    :func:`dropped_variants`), ``log`` gets the line, and the export goes on without them.

    The calibrated variants (``int8-static``, ``openvino-int8``) need ``calibration``
    (:class:`~fine_infer.export._calibrate.CalibrationData`) and ``preprocessing`` = (image preprocessing, text
    preprocessing, tokenizer) of the bundle, through which the data is fed."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    tolerances = {**TOLERANCES, **(tolerances or {})}
    folder = Path(folder)
    by_name = {job.spec.name: job for job in jobs}
    missing = [name for name in entries if name not in by_name]
    if missing:
        raise ConfigError(f"no export job for graph {missing[0]!r}; jobs: {', '.join(by_name)}")
    if calibration is None and any(v in CALIBRATED for v in variants):
        raise ConfigError("the calibrated int8 variants (--int8-static) need calibration data (--calibration DATA)")
    rows: list[dict[str, Any]] = []
    for name, entry in entries.items():
        cal = None
        if any(v in CALIBRATED for v in variants):
            if log:
                log(f"{name}: preparing calibration inputs")
            cal = _calibration_for(by_name[name], calibration, preprocessing,
                                   fresh_seed() if seed is None else seed)
        for variant in dict.fromkeys(variants):  # keep order, drop repeats
            if log and variant in CALIBRATED:
                log(f"{name}.{variant}: calibrating")
            row = _gate_one(folder, name, entry, by_name[name], variant, gates, tolerances[variant], batch_sizes, seed,
                            cal if variant in CALIBRATED else None, calibration)
            rows.append(row)
            if report is not None:
                report.graphs.setdefault(name, {}).setdefault("variants", {})[variant] = row
            if log:
                s = row.get("summary") or {}
                log(f"{name}.{variant}: " + (f"min cosine {s['min_cosine']:.6f} agreement {s['topk_agreement']:.3f}"
                                             if s else row["reason"] or "gate skipped"))
    failed = {r["variant"] for r in rows if not r["passed"]}
    if failed and not drop_failed:
        msg = gate_line(rows)
        if report is not None:
            report.passed = False
            report.reason = msg
            raise GateFailure(msg, report)
        raise ExportError(msg)
    for row in rows:
        if row["variant"] in failed:
            row["dropped"] = True
            for f in variant_files(row["graph"], row["variant"]):
                (folder / f).unlink(missing_ok=True)
        else:
            entries[row["graph"]].variants[row["variant"]] = row["file"]
    if failed and log:
        log("warning: " + gate_line(rows, dropped=True))
    return rows
