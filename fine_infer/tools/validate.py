"""``fine-infer validate``: checksums, then parity of every graph against its PyTorch source.

A zoo bundle (arch and weights inside) re-runs parity on fresh random inputs from its weights. Any bundle that
recorded references at export (``references.npz``: fixed inputs and the fp32 PyTorch outputs for them, per graph, at
batches 1, 3, 8 or fewer rows for big image towers; :func:`fine_infer.export.gates.write_references`) is also gated
on them: ONNX Runtime's fp32 graph against the recorded outputs. For a bundle whose PyTorch source is not in it (a
user module, a Hugging Face model) the recorded references are the PyTorch side of every gate; gating them needs no
torch.

With ``--backend onnxruntime`` / ``openvino`` it also runs the **precision gate of every CPU path** of that backend
(:data:`fine_infer.runtime.paths.CPU_PATHS`) against fp32 PyTorch — fresh random inputs at batches 1, 3 and 8 for a
zoo bundle, the recorded references otherwise — and records each in ``manifest.validation["cpu_gates"][label]`` (the
manifest is rewritten atomically; no other file changes, so every sha256 stays valid). ``backend="auto"`` never picks
a path whose latest gate failed.

=========================  ===================================================================
path                       gate (every output; pooled over every sampled row, as at export)
=========================  ===================================================================
onnxruntime, openvino      max abs error ≤ atol (1e-4), top-10 agreement ≥ 0.9
onnxruntime/int8           min cosine ≥ 0.99, top-10 agreement ≥ 0.9
onnxruntime/cpu-opt        max abs error ≤ 1e-4, top-10 agreement ≥ 0.9
openvino/bf16              min cosine ≥ 0.999, top-10 agreement ≥ 0.9
=========================  ===================================================================

The calibrated paths (``onnxruntime/int8-static``, ``openvino/int8``, from ``export --int8-static``) are not re-gated
here: their gate ran at export on held-out real inputs, and random inputs are outside their calibrated ranges.

Classifier outputs are gated on arg-max agreement instead of top-10. A path the bundle lacks (no int8 graph) or the
CPU cannot run (bf16 without ``BF16`` in OpenVINO's ``OPTIMIZATION_CAPABILITIES``) is recorded as skipped, with the
reason, and is not a failure.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from fine_infer.bundle import Bundle, read_bundle, update_manifest
from fine_infer.compare import Tolerance
from fine_infer.errors import ConfigError
from fine_infer.runtime.choice import GATES_KEY
from fine_infer.runtime.factory import make_runner
from fine_infer.runtime.paths import CALIBRATED, CPU_PATHS, ExecPath, path_unavailable

if TYPE_CHECKING:
    from fine_infer.export.gates import GraphJob

GATE_BACKENDS = ("onnxruntime", "openvino")
GATE_BATCHES = (1, 3, 8)


def gate_tolerance(path: ExecPath, atol: float | None = None) -> Tolerance:
    """The precision gate of a CPU path (fp32 paths: max abs error ≤ ``atol``, default 1e-4)."""
    from fine_infer.export.gates import VARIANT_TOLERANCES, default_tolerance

    return default_tolerance(atol) if path.variant == "fp32" else VARIANT_TOLERANCES[path.variant]


def validate_bundle(
    path: str | Path,
    atol: float | None = None,
    backends: Sequence[str] = (),
    *,
    capabilities: Iterable[str] | None = None,
    record: bool = True,
) -> dict[str, Any]:
    """Verify every file's sha256 (a mismatch raises :class:`BundleError`), re-run the parity gate on fresh random
    inputs for zoo bundles (torch rebuilds the arch from the bundle's weights) and gate every graph on the references
    recorded at export, where the bundle has them.

    ``backends`` (``onnxruntime``, ``openvino``) also runs the precision gate of each of their CPU paths and, with
    ``record``, writes the results into the manifest; ``capabilities`` stands in for the CPU's OpenVINO
    ``OPTIMIZATION_CAPABILITIES``. Returns a report with ``passed`` (every parity check and gate that ran passed),
    ``graphs`` (per graph: fresh parity and/or ``references``), ``gates`` (per path label) and a one-line ``summary``.
    Bundles without a PyTorch source are gated on their recorded references; one that recorded none either (exported
    before references existed) is checked for checksums only."""
    unknown = [b for b in backends if b not in GATE_BACKENDS]
    if unknown:
        raise ConfigError(f"validate --backend takes {' or '.join(GATE_BACKENDS)} (the CPU paths with precision "
                          f"gates), not {', '.join(unknown)}")
    bundle = read_bundle(path, verify=True)
    m = bundle.manifest
    from fine_infer.export.gates import default_tolerance, read_references

    recorded = read_references(bundle.path, m)
    zoo = bool(m.arch and m.weights)
    if not zoo and not recorded:
        return {"passed": True, "checksums": "ok", "graphs": {}, "gates": {},
                "summary": "parity not re-run: the bundle holds no PyTorch source and no reference outputs "
                           "(re-export it with this fine-infer to store them)"}
    if atol is None:
        atol = m.validation.get("tolerance", {}).get("atol")
    tol: Tolerance = default_tolerance(atol)
    graphs: dict[str, Any] = {name: {} for name in m.graphs}
    failures: list[str] = []
    jobs: dict[str, GraphJob] = {}
    if zoo:
        jobs, fresh = _fresh_parity(bundle, tol)
        for name, (result, figures) in fresh.items():
            graphs[name].update(figures)
            failures += [] if result.passed else [result.reason]
    refs = _reference_parity(bundle, recorded, tol)
    for name, (figures, reason) in refs.items():
        g = graphs[name]
        g["references"] = figures
        g["passed"] = g.get("passed", True) and figures["passed"]
        g["max_abs"] = max(g.get("max_abs", 0.0), figures.get("max_abs", 0.0))
        failures += [reason] if reason else []
    worst = max((g.get("max_abs", 0.0) for g in graphs.values()), default=0.0)
    on = "fresh inputs and the export's reference outputs" if zoo and refs else "fresh inputs" if zoo else \
        "the export's reference outputs"
    summary = ("parity passed" if not failures else "parity FAILED: " + "; ".join(failures)) + \
        f" on {len(graphs)} graph(s) ({on}), worst max abs error {worst:.2e} (atol {tol.atol:g})"
    gates: dict[str, Any] = {}
    if backends:
        samples = None if zoo else {name: s for name, (_, s) in recorded.items()}
        if not zoo:
            jobs = {name: job for name, (job, _) in recorded.items()}
        gates = run_gates(bundle, jobs, backends, atol=atol, capabilities=capabilities, samples=samples)
        failed = [label for label, g in gates.items() if not g.get("skipped") and not g["passed"]]
        failures += failed
        summary += "; gates: " + ", ".join(f"{label} {_gate_word(g)}" for label, g in gates.items())
        if record:
            record_gates(bundle.path, gates)
            summary += " (recorded in the manifest)"
    return {"passed": not failures, "checksums": "ok", "graphs": graphs, "gates": gates, "summary": summary}


def _fresh_parity(bundle: Bundle, tol: Tolerance) -> tuple[dict[str, "GraphJob"], dict[str, Any]]:
    """A zoo bundle: rebuild the arch from its weights; parity of every graph on fresh random inputs."""
    from fine_infer.export.gates import GraphJob, check_parity, summarize
    from fine_infer.runtime.torch_runner import model_from_bundle

    m = bundle.manifest
    model = model_from_bundle(bundle)
    jobs = {name: GraphJob(entry.spec, model.graph_module(name).eval(),
                           lambda b, L, g, _n=name: model.example_inputs(_n, b, L, g),
                           m.text.max_length if m.text else None,
                           {t.name: "logits" for t in entry.spec.outputs} if entry.spec.task == "classify" else {})
            for name, entry in m.graphs.items()}
    out = {}
    for name, entry in m.graphs.items():
        job = jobs[name]
        result = check_parity(job.module, entry.spec, bundle.file(entry.file), job.sampler, tol,
                              max_seq_len=job.max_seq_len, output_kinds=job.output_kinds)
        out[name] = (result, {"passed": result.passed, "seed": result.seed, **summarize(result.rows)})
    return jobs, out


def _reference_parity(bundle: Bundle, recorded: dict[str, Any], tol: Tolerance) -> dict[str, tuple[dict, str]]:
    """ONNX Runtime's fp32 graphs against the outputs recorded at export, per graph: (figures, failure reason)."""
    from fine_infer.export.gates import compare_runs, fresh_seed, summarize

    seed = fresh_seed()
    out = {}
    for name, (job, samples) in recorded.items():
        runner = make_runner(bundle, name, ExecPath("onnxruntime"), providers=["CPUExecutionProvider"])
        try:
            rows, reason = compare_runs(runner.run, job, samples, tol, seed, label="fp32 vs the export's reference outputs")
        finally:
            runner.close()
        out[name] = ({"passed": not reason, "batches": [s.batch for s in samples],
                      **summarize([r for r in rows if r["batch"] == "all"])}, reason)
    return out


def _gate_word(g: dict[str, Any]) -> str:
    if g.get("skipped"):
        return f"skipped ({g['skipped']})"
    s = g.get("summary") or {}
    figures = f" (min cosine {s['min_cosine']:.6f}, max abs {s['max_abs']:.2e}, top-k {s['topk_agreement']:.3f})" \
        if s else ""
    return ("passed" if g["passed"] else f"FAILED: {g['reason']}") + figures


def run_gates(
    bundle: Bundle,
    jobs: dict[str, "GraphJob"],
    backends: Sequence[str],
    *,
    atol: float | None = None,
    batch_sizes: Sequence[int] = GATE_BATCHES,
    capabilities: Iterable[str] | None = None,
    seed: int | None = None,
    samples: dict[str, Sequence[Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The precision gate of every CPU path of ``backends`` (per path label: passed, reason or skipped, per-graph
    worst-case figures, tolerance, seed, and the inputs: ``fresh`` or ``recorded``). Every path of a graph is
    compared on the same inputs, against fp32 PyTorch, on the runtime's own runner for that path (ONNX Runtime's CPU
    provider, or OpenVINO): fresh ones sampled from ``jobs``' modules, or, for the graphs in ``samples``, those
    recorded at export (:func:`fine_infer.export.gates.read_references`)."""
    from fine_infer.export.gates import compare_runs, fresh_seed, sample_references, summarize
    from fine_infer.tools.bench import machine_info

    seed = fresh_seed() if seed is None else seed
    # the calibrated int8 paths keep their export gate (held-out real inputs): random inputs and the recorded random
    # references are out of the range they were calibrated on, so a gate on them would say nothing about real use
    paths = [p for p in CPU_PATHS if p.backend in backends and p not in CALIBRATED]
    if "openvino" in backends:
        from fine_infer.runtime.openvino_runner import require_openvino

        require_openvino()  # asked for explicitly: a missing OpenVINO is an error, not a skip
    mach = machine_info()
    stamp = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "cpu": mach["cpu"],
             "versions": {k: v for k, v in mach["versions"].items() if k in ("onnxruntime", "openvino", "torch")}}
    gates: dict[str, dict[str, Any]] = {}
    runnable = []
    for p in paths:
        why = path_unavailable(bundle.manifest, p, capabilities)
        if why:
            gates[p.label] = {"passed": False, "skipped": why, **stamp}
        else:
            runnable.append(p)
            tol = gate_tolerance(p, atol)
            gates[p.label] = {"passed": True, "reason": "", "seed": seed, "batch_sizes": list(batch_sizes),
                              "inputs": "recorded" if samples else "fresh",
                              "tolerance": {"atol": tol.atol, "min_cosine": tol.min_cosine, "min_topk": tol.min_topk,
                                            "k": tol.k}, "graphs": {}, **stamp}
    for name, job in jobs.items():
        if not runnable:
            break
        drawn = samples[name] if samples and name in samples else sample_references(job, batch_sizes, seed)
        for p in runnable:
            g = gates[p.label]
            runner = make_runner(bundle, name, p, providers=["CPUExecutionProvider"])
            try:
                rows, reason = compare_runs(runner.run, job, drawn, gate_tolerance(p, atol), seed)
            finally:
                runner.close()
            g["graphs"][name] = {"passed": not reason, "batches": [d.batch for d in drawn],
                                 **summarize([r for r in rows if r["batch"] == "all"])}
            if reason:
                g["passed"] = False
                g["reason"] = "; ".join(x for x in (g["reason"], reason) if x)
    for p in runnable:
        g = gates[p.label]
        g["summary"] = summarize([s for s in g["graphs"].values() if "max_abs" in s])
    return gates


def record_gates(path: str | Path, gates: dict[str, dict[str, Any]]) -> None:
    """Write ``gates`` into ``manifest.validation["cpu_gates"]`` (atomically; other labels are kept)."""

    def mutate(m) -> list[str]:
        m.validation.setdefault(GATES_KEY, {}).update(gates)
        return []

    update_manifest(path, mutate)
