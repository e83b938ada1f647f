"""``fine-infer validate``: checksums, then a fresh parity run of every graph against its PyTorch source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fine_infer.bundle import read_bundle


def validate_bundle(path: str | Path, atol: float | None = None) -> dict[str, Any]:
    """Verify every file's sha256 (a mismatch raises :class:`BundleError`) and re-run the parity gate on fresh
    random inputs for zoo bundles (torch rebuilds the arch from the bundle's weights).

    Returns a report with ``passed`` and a one-line ``summary``; user-module bundles are checked for checksums
    only, since their PyTorch source is not in the bundle."""
    from fine_infer.compare import Tolerance

    bundle = read_bundle(path, verify=True)
    m = bundle.manifest
    if not (m.arch and m.weights):
        return {"passed": True, "checksums": "ok", "graphs": {},
                "summary": "parity not re-run: the bundle holds no PyTorch source (exported from a user module)"}
    from fine_infer.export._bundle_export import default_tolerance
    from fine_infer.export._parity import check_parity, summarize
    from fine_infer.runtime.torch_runner import model_from_bundle

    model = model_from_bundle(bundle)
    tol: Tolerance = default_tolerance(atol if atol is not None else m.validation.get("tolerance", {}).get("atol"))
    graphs: dict[str, Any] = {}
    failures = []
    for name, entry in m.graphs.items():
        kinds = {t.name: "logits" for t in entry.spec.outputs} if entry.spec.task == "classify" else {}
        result = check_parity(
            model.graph_module(name), entry.spec, bundle.file(entry.file),
            lambda b, L, g, _n=name: model.example_inputs(_n, b, L, g), tol,
            max_seq_len=m.text.max_length if m.text else None, output_kinds=kinds,
        )
        graphs[name] = {"passed": result.passed, "seed": result.seed, **summarize(result.rows)}
        if not result.passed:
            failures.append(result.reason)
    worst = max((g["max_abs"] for g in graphs.values()), default=0.0)
    summary = ("parity passed" if not failures else "parity FAILED: " + "; ".join(failures)) + \
        f" on {len(graphs)} graph(s), worst max abs error {worst:.2e} (atol {tol.atol:g})"
    return {"passed": not failures, "checksums": "ok", "graphs": graphs, "summary": summary}
