"""``fine-infer validate``: checksums, then a fresh parity run of every graph against its PyTorch source.

With ``--backend onnxruntime`` / ``openvino`` it also runs the **precision gate of every CPU path** of that backend
(:data:`fine_infer.runtime.paths.CPU_PATHS`) against fp32 PyTorch on fresh random inputs at batches 1, 3 and 8, and records
each in ``manifest.validation["cpu_gates"][label]`` (the manifest is rewritten atomically; no other file changes,
so every sha256 stays valid). ``backend="auto"`` never picks a path whose latest gate failed.

=========================  ===================================================================
path                       gate (every output; pooled over every sampled row, as at export)
=========================  ===================================================================
onnxruntime, openvino      max abs error ≤ atol (1e-4), top-10 agreement ≥ 0.9
onnxruntime/int8           min cosine ≥ 0.99, top-10 agreement ≥ 0.9
onnxruntime/cpu-opt        max abs error ≤ 1e-4, top-10 agreement ≥ 0.9
openvino/bf16              min cosine ≥ 0.999, top-10 agreement ≥ 0.9
=========================  ===================================================================

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
from fine_infer.runtime.paths import CPU_PATHS, ExecPath, path_unavailable

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
    """Verify every file's sha256 (a mismatch raises :class:`BundleError`) and re-run the parity gate on fresh
    random inputs for zoo bundles (torch rebuilds the arch from the bundle's weights).

    ``backends`` (``onnxruntime``, ``openvino``) also runs the precision gate of each of their CPU paths and, with
    ``record``, writes the results into the manifest; ``capabilities`` stands in for the CPU's OpenVINO
    ``OPTIMIZATION_CAPABILITIES``. Returns a report with ``passed`` (every parity check and gate that ran passed),
    ``gates`` (per path label) and a one-line ``summary``; user-module bundles are checked for checksums only, since
    their PyTorch source is not in the bundle."""
    unknown = [b for b in backends if b not in GATE_BACKENDS]
    if unknown:
        raise ConfigError(f"validate --backend takes {' or '.join(GATE_BACKENDS)} (the CPU paths with precision "
                          f"gates), not {', '.join(unknown)}")
    bundle = read_bundle(path, verify=True)
    m = bundle.manifest
    if not (m.arch and m.weights):
        return {"passed": True, "checksums": "ok", "graphs": {}, "gates": {},
                "summary": "parity not re-run: the bundle holds no PyTorch source (exported from a user module)"}
    from fine_infer.export.gates import GraphJob, check_parity, default_tolerance, summarize
    from fine_infer.runtime.torch_runner import model_from_bundle

    model = model_from_bundle(bundle)
    if atol is None:
        atol = m.validation.get("tolerance", {}).get("atol")
    tol: Tolerance = default_tolerance(atol)
    jobs = {name: GraphJob(entry.spec, model.graph_module(name).eval(),
                           lambda b, L, g, _n=name: model.example_inputs(_n, b, L, g),
                           m.text.max_length if m.text else None,
                           {t.name: "logits" for t in entry.spec.outputs} if entry.spec.task == "classify" else {})
            for name, entry in m.graphs.items()}
    graphs: dict[str, Any] = {}
    failures = []
    for name, entry in m.graphs.items():
        job = jobs[name]
        result = check_parity(job.module, entry.spec, bundle.file(entry.file), job.sampler, tol,
                              max_seq_len=job.max_seq_len, output_kinds=job.output_kinds)
        graphs[name] = {"passed": result.passed, "seed": result.seed, **summarize(result.rows)}
        if not result.passed:
            failures.append(result.reason)
    worst = max((g["max_abs"] for g in graphs.values()), default=0.0)
    summary = ("parity passed" if not failures else "parity FAILED: " + "; ".join(failures)) + \
        f" on {len(graphs)} graph(s), worst max abs error {worst:.2e} (atol {tol.atol:g})"
    gates: dict[str, Any] = {}
    if backends:
        gates = run_gates(bundle, jobs, backends, atol=atol, capabilities=capabilities)
        failed = [label for label, g in gates.items() if not g.get("skipped") and not g["passed"]]
        failures += failed
        summary += "; gates: " + ", ".join(f"{label} {_gate_word(g)}" for label, g in gates.items())
        if record:
            record_gates(bundle.path, gates)
            summary += " (recorded in the manifest)"
    return {"passed": not failures, "checksums": "ok", "graphs": graphs, "gates": gates, "summary": summary}


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
) -> dict[str, dict[str, Any]]:
    """The precision gate of every CPU path of ``backends`` (per path label: passed, reason or skipped, per-graph
    worst-case figures, tolerance, seed). Every path of a graph is compared on the same fresh inputs, against fp32
    PyTorch, on the runtime's own runner for that path (ONNX Runtime's CPU provider, or OpenVINO)."""
    from fine_infer.export.gates import compare_runs, fresh_seed, sample_references, summarize
    from fine_infer.tools.bench import machine_info

    seed = fresh_seed() if seed is None else seed
    paths = [p for p in CPU_PATHS if p.backend in backends]
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
                              "tolerance": {"atol": tol.atol, "min_cosine": tol.min_cosine, "min_topk": tol.min_topk,
                                            "k": tol.k}, "graphs": {}, **stamp}
    for name, job in jobs.items():
        if not runnable:
            break
        samples = sample_references(job, batch_sizes, seed)
        for p in runnable:
            g = gates[p.label]
            runner = make_runner(bundle, name, p, providers=["CPUExecutionProvider"])
            try:
                rows, reason = compare_runs(runner.run, job, samples, gate_tolerance(p, atol), seed)
            finally:
                runner.close()
            g["graphs"][name] = {"passed": not reason, **summarize([r for r in rows if r["batch"] == "all"])}
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
