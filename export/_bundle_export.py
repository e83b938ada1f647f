"""Export a zoo model or any user ``nn.Module`` to a bundle, behind the checker and parity gates."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from fine_infer.bundle import BundleWriter, GraphEntry, Manifest, tool_versions
from fine_infer.compare import Tolerance
from fine_infer.errors import ConfigError
from fine_infer.export._onnx import check_onnx, export_graph
from fine_infer.export.gates import (
    DEFAULT_BATCHES,
    GraphJob,
    InputSampler,
    ParityResult,
    check_parity,
    default_tolerance,
    summarize,
)
from fine_infer.export.report import ExportReport, GateFailure, SealedCheck
from fine_infer.specs import GraphSpec, TensorSpec


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
        written = export_graph(job.module, job.spec, args, writer.path(fname), opset, exporter)
        g = report.graphs.setdefault(name, {"file": fname, "opset": written, "exporter": exporter})
        entries[name] = GraphEntry(job.spec, fname, written)
        if not gates:
            g["checker"] = "skipped"
            continue
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
) -> list[str]:
    """After the fp32 gates: write and gate every requested variant, then (``lint``) check the TensorRT-bound files
    (fp32 and fp16) with the TensorRT op lint. A failure raises :class:`GateFailure` and nothing is written; with
    ``drop_failed_variants`` a variant whose gate failed is left out instead (see
    :func:`fine_infer.export._variants.write_variants`). Returns the variants written."""
    kept: list[str] = []
    if variants:
        from fine_infer.export._variants import write_variants

        rows = write_variants(writer.tmp, entries, jobs, variants, report=report, batch_sizes=batch_sizes,
                              gates=gates, drop_failed=drop_failed_variants)
        kept = [v for v in dict.fromkeys(variants) if not any(r.get("dropped") for r in rows if r["variant"] == v)]
    if not lint:
        return kept
    from fine_infer.export.lint import lint_onnx

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
    opset: int | None = None,
    exporter: str = "dynamo",
    atol: float | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    force: bool = False,
    gates: bool = True,
    include_weights: bool = True,
    preset: str | None = None,
    variants: Sequence[str] = (),
    lint: bool = False,
    checks: Sequence[SealedCheck] = (),
    drop_failed_variants: bool = False,
) -> ExportReport:
    """Export a zoo model (:class:`fine_infer.models.ZooModel`) to a bundle folder ``out``.

    Every graph is exported, checked with ``onnx.checker`` and compared with PyTorch at ``batch_sizes``; a
    failing gate raises :class:`GateFailure` (an :class:`ExportError`) and nothing is written. ``variants``
    (``fp16``, ``int8``, ``cpu-opt``) are written beside each graph behind their own gates; ``lint`` checks the
    TensorRT-bound graphs against TensorRT's ONNX operator support; every variant is gated before a failure fails the
    export, and ``drop_failed_variants`` keeps the bundle without the failed ones instead (recorded in the manifest's
    ``validation.dropped_variants``). ``checks`` run on the sealed bundle before it is
    moved into place (e.g. :class:`fine_infer.tools.recall.RecallCheck`, the catalogue recall gate); each result
    is recorded in the report and the manifest, and a failed one fails the export."""
    from fine_infer.models import config_to_dict

    t0 = time.perf_counter()
    report = ExportReport(str(out))
    tolerance = default_tolerance(atol)
    all_graphs = model.graphs()
    names = list(graphs or all_graphs)
    unknown = [n for n in names if n not in all_graphs]
    if unknown:
        raise ConfigError(f"arch {model.arch} has no graph(s) {unknown}; it has: {', '.join(all_graphs)}")
    text = model.text_preprocess
    labels = model.class_labels
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
    with BundleWriter(out, force=force) as writer:
        entries = _run_jobs(jobs, writer, report, opset, exporter, tolerance, batch_sizes, gates)
        variants = _deploy_steps(writer, entries, jobs, report, variants, lint, batch_sizes, gates,
                                 drop_failed_variants)
        tokenizer_file = None
        tok = model.build_tokenizer()
        if tok is not None:
            tokenizer_file = "tokenizer.json"
            tok.save(os.fspath(writer.path(tokenizer_file)))
        weights_file = None
        if include_weights:
            from safetensors.torch import save_file

            weights_file = "weights.safetensors"
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(state, os.fspath(writer.path(weights_file)))
        manifest = Manifest(
            graphs=entries, files={}, arch=model.arch, preset=preset, config=config_to_dict(model.config),
            source="zoo", embed_dim=model.embed_dim, image=model.image_preprocess, text=text,
            tokenizer=tokenizer_file, weights=weights_file, class_labels=labels, versions=tool_versions(),
            validation=_validation_block(report, tolerance, batch_sizes),
        )
        _run_checks(checks, model, writer, manifest, report, variants)
        report.seconds = time.perf_counter() - t0
        writer.commit(manifest)
    return report


def _run_checks(checks: Sequence[SealedCheck], model, writer: BundleWriter, manifest: Manifest, report: ExportReport,
                variants: Sequence[str]) -> None:
    """Run ``checks`` on the sealed (complete, not yet committed) bundle; record each in the report and manifest."""
    if not checks:
        return
    sealed = writer.seal(manifest)
    for check in checks:
        result = check(model, sealed.path, ["fp32", *variants])
        if result is None:  # the check does not apply to this bundle
            continue
        report.checks[check.name] = result
        manifest.validation[check.name] = result
        if not result.get("passed"):
            report.passed = False
            report.reason = f"{check.name} gate failed: {result.get('reason', '')}"
            raise GateFailure(report.reason, report)
    writer.seal(manifest, rehash=False)


def _probe_output_axes(module, inputs: dict[str, torch.Tensor], axes: dict[str, dict[int, str]]):
    """Which output dims follow which named input axis: run the module with each axis grown by one."""
    with torch.no_grad():
        base = module(**inputs)
    base_t = base if isinstance(base, (tuple, list)) else (base,)
    out_axes: list[dict[int, str]] = [{} for _ in base_t]
    axis_names = sorted({a for per in axes.values() for a in per.values()})
    for axis in axis_names:
        grown = {}
        for name, x in inputs.items():
            for dim, a in axes.get(name, {}).items():
                if a == axis:
                    x = torch.cat([x, x.narrow(dim, 0, 1)], dim=dim)
            grown[name] = x
        with torch.no_grad():
            out = module(**grown)
        out_t = out if isinstance(out, (tuple, list)) else (out,)
        for i, (a, b) in enumerate(zip(base_t, out_t)):
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


def export_module(
    module: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor],
    out: str | Path,
    *,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    output_names: Sequence[str] | None = None,
    graph_name: str = "model",
    task: str | None = None,
    source: str = "python",
    opset: int | None = None,
    exporter: str = "dynamo",
    atol: float | None = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    force: bool = False,
    gates: bool = True,
    variants: Sequence[str] = (),
    lint: bool = False,
    drop_failed_variants: bool = False,
) -> ExportReport:
    """Export any ``nn.Module`` with named example inputs to a one-graph bundle.

    Axis 0 of every input is the dynamic ``batch``; ``dynamic_axes`` adds more (``{"ids": {1: "sequence"}}``:
    inputs sharing an axis name share its size). Output axes that follow an input axis are found by probing.
    """
    if not example_inputs or not all(isinstance(v, torch.Tensor) for v in example_inputs.values()):
        raise ConfigError("example_inputs must be a non-empty dict of name -> torch.Tensor")
    t0 = time.perf_counter()
    module = module.eval()
    axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in example_inputs}
    for name, per in (dynamic_axes or {}).items():
        if name not in example_inputs:
            raise ConfigError(f"dynamic axis for unknown input {name!r}; inputs are {', '.join(example_inputs)}")
        for dim, axis in per.items():
            if not 0 < int(dim) < example_inputs[name].ndim:
                raise ConfigError(f"input {name!r} has {example_inputs[name].ndim} dims; cannot make dim {dim} dynamic")
            axes[name][int(dim)] = axis
    outputs, out_axes = _probe_output_axes(module, example_inputs, axes)
    names = list(output_names or (["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]))
    if len(names) != len(outputs):
        raise ConfigError(f"{len(names)} output names for {len(outputs)} outputs")
    inputs = tuple(
        TensorSpec(n, str(x.dtype).replace("torch.", ""), tuple(axes[n].get(d, s) for d, s in enumerate(x.shape)))
        for n, x in example_inputs.items()
    )
    outs = tuple(
        TensorSpec(n, str(o.dtype).replace("torch.", ""), tuple(ax.get(d, s) for d, s in enumerate(o.shape)))
        for n, o, ax in zip(names, outputs, out_axes)
    )
    spec = GraphSpec(graph_name, task or "custom", inputs, outs)

    class _Positional(torch.nn.Module):
        # torch.onnx wants positional inputs in spec order; the user's forward takes them by name.
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(example_inputs, args)))

    has_seq = any(a != "batch" for per in axes.values() for a in per.values())
    job = GraphJob(spec, _Positional(module).eval(), _user_sampler(example_inputs, axes), 1 if has_seq else None)
    tolerance = default_tolerance(atol)
    report = ExportReport(str(out))
    with BundleWriter(out, force=force) as writer:
        entries = _run_jobs([job], writer, report, opset, exporter, tolerance, batch_sizes, gates)
        _deploy_steps(writer, entries, [job], report, variants, lint, batch_sizes, gates, drop_failed_variants)
        report.seconds = time.perf_counter() - t0
        manifest = Manifest(graphs=entries, files={}, source=source, versions=tool_versions(),
                            embed_dim=outs[0].shape[-1] if isinstance(outs[0].shape[-1], int) else None,
                            validation=_validation_block(report, tolerance, batch_sizes))
        writer.commit(manifest)
    return report
