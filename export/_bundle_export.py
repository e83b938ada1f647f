"""Export graphs to a bundle behind the checker and parity gates: a zoo model (:func:`export_model`), or any list of
graph jobs with their tokenizer and preprocessing (:func:`_export_jobs`, behind user modules and Hugging Face
folders). Every export records its reference inputs and outputs (``references.npz``) for later gates."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from fine_infer.bundle import BundleWriter, GraphEntry, Manifest, tool_versions
from fine_infer.compare import Tolerance
from fine_infer.errors import ConfigError
from fine_infer.export._onnx import check_onnx, export_graph
from fine_infer.export.gates import (
    DEFAULT_BATCHES,
    REFERENCES_FILE,
    REFERENCES_KEY,
    GraphJob,
    InputSampler,
    ParityResult,
    check_parity,
    default_tolerance,
    summarize,
    write_references,
)
from fine_infer.export.report import ExportReport, GateFailure, SealedCheck, say
from fine_infer.specs import ImagePreprocess, TextPreprocess


def _run_jobs(
    jobs: Sequence[GraphJob],
    writer: BundleWriter,
    report: ExportReport,
    opset: int | None,
    exporter: str,
    tolerance: Tolerance,
    batch_sizes: Sequence[int],
    gates: bool,
) -> dict[str, GraphEntry]:
    entries: dict[str, GraphEntry] = {}
    for job in jobs:
        name = job.spec.name
        fname = f"{name}.onnx"
        example = job.sampler(2, job.max_seq_len, torch.Generator().manual_seed(0))
        args = [example[t.name] for t in job.spec.inputs]
        say(f"{name}: exporting to ONNX ({exporter} exporter)")
        written = export_graph(job.module, job.spec, args, writer.path(fname), opset, exporter)
        g = report.graphs.setdefault(name, {"file": fname, "opset": written, "exporter": exporter})
        entries[name] = GraphEntry(job.spec, fname, written)
        if not gates:
            g["checker"] = "skipped"
            continue
        say(f"{name}: onnx.checker, then parity with PyTorch at batch sizes {', '.join(map(str, batch_sizes))}")
        check_onnx(writer.path(fname))
        g["checker"] = "passed"
        result: ParityResult = check_parity(
            job.module, job.spec, writer.path(fname), job.sampler, tolerance, batch_sizes, job.max_seq_len,
            job.output_kinds,
        )
        g["parity"] = result.to_dict()
        g["parity_summary"] = summarize(result.rows)
        if not result.passed:
            report.passed = False
            report.reason = f"parity gate failed: {result.reason} (seed {result.seed})"
            raise GateFailure(report.reason, report)
    return entries


def _deploy_steps(
    writer: BundleWriter,
    entries: dict[str, GraphEntry],
    jobs: Sequence[GraphJob],
    report: ExportReport,
    variants: Sequence[str],
    lint: bool,
    batch_sizes: Sequence[int],
    gates: bool,
    drop_failed_variants: bool = False,
    calibration: Any = None,
    preprocessing: tuple = (None, None, None),
) -> list[str]:
    """After the fp32 gates: write and gate every requested variant, then (``lint``) check the TensorRT-bound files
    (fp32 and fp16) with the TensorRT op lint. A failure raises :class:`GateFailure` and nothing is written; with
    ``drop_failed_variants`` a variant whose gate failed is left out instead (see
    :func:`fine_infer.export._variants.write_variants`). Returns the variants written."""
    kept: list[str] = []
    if variants:
        from fine_infer.export._variants import write_variants

        rows = write_variants(writer.tmp, entries, jobs, variants, report=report, batch_sizes=batch_sizes,
                              gates=gates, drop_failed=drop_failed_variants, log=say, calibration=calibration,
                              preprocessing=preprocessing)
        kept = [v for v in dict.fromkeys(variants) if not any(r.get("dropped") for r in rows if r["variant"] == v)]
    if not lint:
        return kept
    from fine_infer.export.lint import lint_onnx

    say("TensorRT lint of the fp32 (and fp16) graphs")

    axes = {a for job in jobs for t in job.spec.inputs for a in t.shape if isinstance(a, str)}
    for name, entry in entries.items():
        files = {"fp32": entry.file, **({"fp16": entry.variants["fp16"]} if "fp16" in entry.variants else {})}
        for variant, fname in files.items():
            lint_report = lint_onnx(writer.path(fname), profile_axes=axes)
            report.graphs.setdefault(name, {}).setdefault("lint", {})[variant] = lint_report.summary()
            if not lint_report.passed:
                report.passed = False
                report.reason = (f"TensorRT lint of {fname} failed ({len(lint_report.errors)} errors); "
                                 f"first: {lint_report.errors[0].line()}")
                raise GateFailure(report.reason, report)
    return kept


def _validation_block(report: ExportReport, tolerance: Tolerance, batch_sizes: Sequence[int]) -> dict[str, Any]:
    from fine_infer.export._variants import dropped_variants

    dropped = dropped_variants(report.graphs)  # variants left out by drop_failed_variants: why, per failed graph
    return {
        "passed": report.passed,
        "tolerance": {"atol": tolerance.atol, "min_topk": tolerance.min_topk, "k": tolerance.k},
        "batch_sizes": list(batch_sizes),
        "graphs": {n: {k: v for k, v in g.items() if k != "parity"} | {"parity": g.get("parity")}
                   for n, g in report.graphs.items()},
        **({"dropped_variants": dropped} if dropped else {}),
    }


def export_model(
    model,
    out: str | Path,
    *,
    graphs: Sequence[str] | None = None,
    include_weights: bool = True,
    preset: str | None = None,
    checks: Sequence[SealedCheck] = (),
    **options: Any,
) -> ExportReport:
    """Export a zoo model (:class:`fine_infer.models.ZooModel`) to a bundle folder ``out``.

    Every graph is exported, checked with ``onnx.checker`` and compared with PyTorch at ``batch_sizes``; a
    failing gate raises :class:`GateFailure` (an :class:`ExportError`) and nothing is written. ``variants``
    (``fp16``, ``int8``, ``cpu-opt``; ``int8-static`` and ``openvino-int8`` with ``calibration``) are written beside
    each graph behind their own gates; ``lint`` checks the
    TensorRT-bound graphs against TensorRT's ONNX operator support; every variant is gated before a failure fails the
    export, and ``drop_failed_variants`` keeps the bundle without the failed ones instead (recorded in the manifest's
    ``validation.dropped_variants``). ``checks`` run on the sealed bundle before it is
    moved into place (e.g. :class:`fine_infer.tools.recall.RecallCheck`, the catalogue recall gate); each result
    is recorded in the report and the manifest, and a failed one fails the export. ``references`` records fixed
    inputs and the fp32 PyTorch outputs for them (``references.npz``; :func:`fine_infer.export.gates.write_references`).

    ``options``: ``opset``, ``exporter`` (``dynamo``/``legacy``), ``atol`` (fp32 parity, default 1e-4),
    ``batch_sizes`` (default 1, 3, 8), ``force``, ``gates`` (default on), ``variants``, ``lint``,
    ``drop_failed_variants``, ``references`` (default on), ``calibration`` (the calibrated int8 variants' data), as
    :func:`_export_jobs` takes them.
    """
    from fine_infer.models import config_to_dict

    t0 = time.perf_counter()
    all_graphs = model.graphs()
    names = list(graphs or all_graphs)
    unknown = [n for n in names if n not in all_graphs]
    if unknown:
        raise ConfigError(f"arch {model.arch} has no graph(s) {unknown}; it has: {', '.join(all_graphs)}")
    text = model.text_preprocess
    jobs = [
        GraphJob(
            all_graphs[n],
            model.graph_module(n).eval(),
            (lambda b, L, g, _n=n: model.example_inputs(_n, b, L, g)),
            text.max_length if text else None,
            {t.name: "logits" for t in all_graphs[n].outputs} if all_graphs[n].task == "classify" else {},
        )
        for n in names
    ]

    def weights(writer: BundleWriter) -> dict[str, Any]:
        if not include_weights:
            return {}
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, os.fspath(writer.path("weights.safetensors")))
        return {"weights": "weights.safetensors"}

    return _export_jobs(
        jobs, out, source="zoo", text=text, image=model.image_preprocess, tokenizer=model.build_tokenizer(),
        config=config_to_dict(model.config), checks=checks, check_model=model, write_extra=weights,
        fields={"arch": model.arch, "preset": preset, "embed_dim": model.embed_dim, "class_labels": model.class_labels,
                "weights_origin": getattr(model, "weights_origin", None)},
        started=t0, **options)


def _run_checks(checks: Sequence[SealedCheck], model, writer: BundleWriter, manifest: Manifest, report: ExportReport,
                variants: Sequence[str], drop_failed: bool = False) -> None:
    """Run ``checks`` on the sealed (complete, not yet committed) bundle; record each in the report and manifest.

    A failed check fails the export, unless ``drop_failed`` and the check names only variants other than fp32 in its
    ``failed_variants``: those are then removed from the bundle (files, manifest entries) and recorded as dropped,
    as a failed variant gate is, and the check's result is kept with ``dropped`` listing them."""
    if not checks:
        return
    sealed = writer.seal(manifest)
    rehash = False
    variants = list(variants)
    for check in checks:
        say(f"{check.name} gate on the finished bundle")
        result = check(model, sealed.path, ["fp32", *variants])
        if result is None:  # the check does not apply to this bundle
            continue
        report.checks[check.name] = result
        manifest.validation[check.name] = result
        if result.get("passed"):
            continue
        reason = f"{check.name} gate failed: {result.get('reason', '')}"
        failed = [v for v in result.get("failed_variants") or () if v in variants]
        droppable = bool(failed) and "fp32" not in (result.get("failed_variants") or ())
        if not (drop_failed and droppable):
            report.passed = False
            report.reason = reason + (f"; nothing was written: rerun with --drop-failed-variants (Python: "
                                      f"drop_failed_variants=True) to keep the bundle without {', '.join(failed)}"
                                      if droppable else "")
            raise GateFailure(report.reason, report)
        _drop_after_check(writer, manifest, report, failed, reason)
        variants = [v for v in variants if v not in failed]
        result["dropped"] = failed
        result["line"] = f"{result.get('line', check.name)}; dropped {', '.join(failed)}"
        say("warning: " + reason + f"; wrote the bundle without {', '.join(failed)} (--drop-failed-variants)")
        sealed, rehash = writer.seal(manifest), True
    if not rehash:
        writer.seal(manifest, rehash=False)


def _drop_after_check(writer: BundleWriter, manifest: Manifest, report: ExportReport, failed: Sequence[str],
                      reason: str) -> None:
    """Remove ``failed`` variants from the sealed bundle after a check on the whole bundle failed them: their files,
    their manifest entries, and rows marked dropped (why: ``reason``) in the report and ``validation``."""
    from fine_infer.export._variants import dropped_variants, variant_files

    for name, entry in manifest.graphs.items():
        for v in failed:
            if entry.variants.pop(v, None) is None:
                continue
            for f in variant_files(name, v):
                writer.path(f).unlink(missing_ok=True)
            row = report.graphs.setdefault(name, {}).setdefault("variants", {}).setdefault(v, {"variant": v})
            row.update(passed=False, dropped=True, reason=reason)
    manifest.validation["dropped_variants"] = dropped_variants(report.graphs)
    for name, g in report.graphs.items():
        if name in manifest.validation.get("graphs", {}):
            manifest.validation["graphs"][name]["variants"] = g.get("variants", {})


def _export_jobs(
    jobs: Sequence[GraphJob],
    out: str | Path,
    *,
    source: str,
    text: TextPreprocess | None = None,
    image: ImagePreprocess | None = None,
    tokenizer: Any = None,
    config: dict[str, Any] | None = None,
    versions: dict[str, str] | None = None,
    checks: Sequence[SealedCheck] = (),
    check_model: Any = None,
    fields: dict[str, Any] | None = None,
    write_extra: Callable[[BundleWriter], dict[str, Any]] | None = None,
    opset: int | None = None,
    exporter: str = "dynamo",
    atol: float | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    force: bool = False,
    gates: bool = True,
    variants: Sequence[str] = (),
    lint: bool = False,
    drop_failed_variants: bool = False,
    references: bool = True,
    calibration: Any = None,
    started: float | None = None,
) -> ExportReport:
    """Export ``jobs`` to a bundle at ``out`` behind the gates (what :func:`export_model`, user modules and Hugging
    Face folders share): every graph exported, checked and compared with PyTorch; the variants and lint; ``tokenizer``
    (a ``tokenizers.Tokenizer``) written as ``tokenizer.json``; ``references`` recording fixed inputs and fp32 PyTorch
    outputs; ``checks`` run on the sealed bundle (called with ``check_model``). ``text``/``image`` are the manifest's
    preprocessing; ``fields`` more manifest fields (arch, preset, embed_dim, class_labels), and ``write_extra(writer)``
    writes more files and returns their manifest fields (weights). The embedding dimension defaults to the last dim of
    the first graph's first output. ``calibration`` (:class:`~fine_infer.export._calibrate.CalibrationData`): the real
    inputs of the calibrated int8 variants (``int8-static``, ``openvino-int8``), fed through ``image``, ``text`` and
    ``tokenizer``."""
    t0 = time.perf_counter() if started is None else started
    tolerance = default_tolerance(atol)
    report = ExportReport(str(out))
    first = jobs[0].spec.outputs[0].shape[-1] if jobs and jobs[0].spec.outputs else None
    with BundleWriter(out, force=force) as writer:
        entries = _run_jobs(jobs, writer, report, opset, exporter, tolerance, batch_sizes, gates)
        variants = _deploy_steps(writer, entries, jobs, report, variants, lint, batch_sizes, gates,
                                 drop_failed_variants, calibration, (image, text, tokenizer))
        validation = _validation_block(report, tolerance, batch_sizes)
        if references and gates:
            say("recording reference outputs (validate gates any CPU path against them)")
            validation[REFERENCES_KEY] = write_references(writer.path(REFERENCES_FILE), jobs, batch_sizes=batch_sizes)
        tokenizer_file = None
        if tokenizer is not None:
            tokenizer_file = "tokenizer.json"
            tokenizer.save(os.fspath(writer.path(tokenizer_file)))
        more = {"embed_dim": first if isinstance(first, int) else None, **(fields or {}),
                **(write_extra(writer) if write_extra else {})}
        manifest = Manifest(graphs=entries, files={}, source=source, config=config, text=text, image=image,
                            tokenizer=tokenizer_file, versions={**tool_versions(), **(versions or {})},
                            validation=validation, **more)
        _run_checks(checks, check_model, writer, manifest, report, variants, drop_failed_variants)
        report.seconds = time.perf_counter() - t0
        writer.commit(manifest)
    return report


def _outputs(module: torch.nn.Module, args: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = module(*args)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _probe_output_axes(module, names: Sequence[str], inputs: dict[str, torch.Tensor], axes: dict[str, dict[int, str]]):
    """Which output dims follow which named input axis: run the module with each axis grown by one."""
    base_t = _outputs(module, [inputs[n] for n in names])
    out_axes: list[dict[int, str]] = [{} for _ in base_t]
    for axis in sorted({a for per in axes.values() for a in per.values()}):
        grown = {}
        for name, x in inputs.items():
            for dim, a in axes.get(name, {}).items():
                if a == axis:
                    x = torch.cat([x, x.narrow(dim, 0, 1)], dim=dim)
            grown[name] = x
        for i, (a, b) in enumerate(zip(base_t, _outputs(module, [grown[n] for n in names]))):
            for d, (sa, sb) in enumerate(zip(a.shape, b.shape)):
                if sa != sb:
                    out_axes[i][d] = axis
    return base_t, out_axes


def _user_sampler(example: dict[str, torch.Tensor], axes: dict[str, dict[int, str]]) -> InputSampler:
    """Fresh inputs shaped like ``example`` with the batch set and other dynamic axes varied.

    Floats: Gaussian with the example's mean/std. Integers: uniform over the example's range; an integer input
    holding only 0/1 is taken as a padding mask and drawn as ragged prefixes of ones (never an empty row)."""
    def sample(batch: int, seq_len: int | None, gen: torch.Generator) -> dict[str, torch.Tensor]:
        factor = {1: 1.0, 3: 0.5}.get(batch, 0.75) if seq_len is not None else 1.0
        sizes: dict[str, int] = {}
        out = {}
        for name, x in example.items():
            shape = list(x.shape)
            for d, a in axes.get(name, {}).items():
                if a == "batch":
                    shape[d] = batch
                else:
                    shape[d] = sizes.setdefault(a, max(1, round(x.shape[d] * factor)))
            if x.dtype.is_floating_point:
                std = float(x.float().std()) if x.numel() > 1 else 1.0
                out[name] = (torch.randn(shape, generator=gen) * (std or 1.0) + float(x.float().mean())).to(x.dtype)
            elif x.dtype == torch.bool or (x.numel() and int(x.min()) >= 0 and int(x.max()) <= 1):
                L = shape[-1]
                lengths = torch.randint(1, L + 1, (shape[0],), generator=gen)
                lengths[0] = L
                m = torch.arange(L)[None, :] < lengths[:, None]
                out[name] = m.reshape(shape).to(x.dtype) if len(shape) == 2 else m.expand(shape).to(x.dtype)
            else:
                lo, hi = int(x.min()), int(x.max())
                out[name] = torch.randint(lo, hi + 1, shape, generator=gen, dtype=x.dtype)
        return out

    return sample
