"""``fine-infer tune``: time every CPU path of a bundle here and store the fastest gated one with the bundle.

The CPU paths and their gates are listed in :mod:`fine_infer.runtime.paths`; gates are run by ``fine-infer validate
--backend onnxruntime openvino`` (:mod:`fine_infer.tools.validate`). :func:`tune_bundle` times every path that can
run here (``fine-infer bench`` machinery) at batch 1 and 8 and ranks them; :func:`write_tune` stores the result as
``tune.<stamp>.json`` in the bundle through :func:`fine_infer.bundle.update_manifest` (hashed into
``manifest.files`` and pointed to by ``manifest.validation["tune"]``; a crash leaves either the old or the new result
listed, never a file whose checksum fails). ``load(bundle, backend="auto")`` reads it through
:mod:`fine_infer.runtime.choice`. Storing a result changes the bundle (a new file and the manifest): a signed bundle
then fails verification until it is signed again (``fine-infer sign``), so a release pipeline tunes before it signs.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from fine_infer._atomic import atomic_write_bytes
from fine_infer._cpu import cpu_signature
from fine_infer.bundle import Manifest, read_manifest, update_manifest
from fine_infer.errors import ConfigError
from fine_infer.runtime.choice import TUNE_KEY, TUNE_KIND, eligibility, gate_status, pick
from fine_infer.runtime.paths import BASELINE, CPU_PATHS
from fine_infer.tools import bench

TUNE_VERSION = 1
TUNE_BATCHES = (1, 8)


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def rank_paths(bench_result: dict[str, Any], manifest: Manifest) -> dict[str, dict[str, Any]]:
    """Per CPU path label: its speedup over ``onnxruntime`` (geometric mean over graph × batch of the p50 ratio),
    the per-cell ratios, and its gate; paths without rows keep their skip reason."""
    base = {(r["graph"], r["batch"]): r["p50_ms"] for r in bench_result["rows"] if r["backend"] == BASELINE.label}
    skipped = {s["backend"]: s["reason"] for s in bench_result.get("skipped", []) if "graph" not in s}
    out: dict[str, dict[str, Any]] = {}
    for p in CPU_PATHS:
        gate, detail = gate_status(manifest, p)
        rows = [r for r in bench_result["rows"] if r["backend"] == p.label and (r["graph"], r["batch"]) in base]
        entry: dict[str, Any] = {"backend": p.backend, "variant": p.variant, "gate": gate, "gate_detail": detail}
        if rows and base:
            cells = {f"{r['graph']}@{r['batch']}": base[(r["graph"], r["batch"])] / r["p50_ms"] for r in rows}
            complete = len(rows) == len(base)
            entry.update(speedup=_geomean(list(cells.values())) if complete else None, cells=cells,
                         p50_ms={f"{r['graph']}@{r['batch']}": r["p50_ms"] for r in rows})
            if not complete:
                entry["skipped"] = "did not run every graph and batch size (see the bench skips)"
        else:
            entry.update(speedup=None, skipped=skipped.get(p.label, "not measured"))
        out[p.label] = entry
    return out


def tune_bundle(
    bundle: str | Path,
    *,
    batch_sizes: Sequence[int] = TUNE_BATCHES,
    graphs: Sequence[str] | None = None,
    budget: Any = None,
    threads: int | None = None,
    capabilities: Iterable[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Time every CPU path of ``bundle`` that can run here and pick the fastest gated one (not yet stored).

    Returns the tune result: ``choice`` (label), ``reason``, ``paths`` (per label: speedup over ONNX Runtime fp32,
    per-cell ratios, gate, or why it was skipped), the bench rows and the machine."""
    caps = frozenset(capabilities) if capabilities is not None else None
    result = bench.bench_bundle(bundle, backends=[p.label for p in CPU_PATHS], batch_sizes=batch_sizes,
                                graphs=graphs, budget=budget or bench.Budget(), threads=threads, progress=progress,
                                capabilities=caps)
    manifest = read_manifest(bundle)
    ranked = rank_paths(result, manifest)
    choice = pick(ranked, eligibility(manifest, caps))
    return {"kind": TUNE_KIND, "version": TUNE_VERSION, "choice": choice.label, "reason": choice.reason,
            "speedup": choice.speedup, "batch_sizes": list(batch_sizes), "graphs": list(graphs or manifest.graphs),
            "threads": threads, "signature": cpu_signature(), "paths": ranked,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "bench": {"rows": result["rows"], "skipped": result["skipped"], "machine": result.get("machine")}}


def write_tune(bundle: str | Path, result: dict[str, Any]) -> str:
    """Store a :func:`tune_bundle` result in ``bundle`` as ``tune.<stamp>.json``; returns the file name."""
    if result.get("kind") != TUNE_KIND:
        raise ConfigError("not a tune result: make one with fine_infer.tools.tune.tune_bundle")
    folder = Path(bundle)
    read_manifest(folder)  # a clear error for a folder that is not a bundle, before writing into it
    name = f"tune.{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.urandom(2).hex()}.json"
    atomic_write_bytes(folder / name, json.dumps(result, indent=2, default=float).encode() + b"\n")

    def record(m: Manifest) -> list[str]:
        old = (m.validation.get(TUNE_KEY) or {}).get("file")
        m.validation[TUNE_KEY] = {"file": name, "choice": result["choice"], "speedup": result.get("speedup"),
                                  "reason": result["reason"], "date": result["date"],
                                  "signature": result["signature"], "batch_sizes": result["batch_sizes"]}
        return [old] if old and old != name else []

    try:
        update_manifest(folder, record, added=[name])
    except BaseException:
        (folder / name).unlink(missing_ok=True)
        raise
    return name
