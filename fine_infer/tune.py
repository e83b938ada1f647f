"""The fastest gated CPU path of a bundle: measured by ``fine-infer tune``, stored with the bundle, read by ``auto``.

A **CPU path** is a (backend, variant) pair that runs a bundle on a CPU without PyTorch:

=========================  ===========================================================  =========================
label                      what                                                         gate (vs fp32 PyTorch)
=========================  ===========================================================  =========================
``onnxruntime``            ONNX Runtime, the portable fp32 graph (the baseline)         export parity, atol 1e-4
``onnxruntime/int8``       ONNX Runtime, the dynamic int8 graph (``export --int8``)     cosine ≥ 0.99, top-10
``onnxruntime/cpu-opt``    ONNX Runtime, contrib-op fusions (``export --optimize cpu``)  atol 1e-4, top-10
``openvino``               OpenVINO, the fp32 graph at f32 inference precision          atol 1e-4, top-10
``openvino/bf16``          OpenVINO, the fp32 graph at bf16 inference precision         cosine ≥ 0.999, top-10
=========================  ===========================================================  =========================

Gates are run by ``fine-infer validate --backend onnxruntime openvino`` (:mod:`fine_infer.validate`) and recorded in
``manifest.validation["cpu_gates"]``; the int8 / cpu-opt gates written at export count until validate re-runs them.
:func:`tune_bundle` times every path that can run here (``fine-infer bench`` machinery) at batch 1 and 8, and
:func:`write_tune` stores the result as ``tune.<stamp>.json`` in the bundle: hashed into ``manifest.files`` and
pointed to by ``manifest.validation["tune"]``, written under a new name and the manifest rewritten atomically, so a
crash leaves either the old or the new result listed, never a file whose checksum fails.

``load(bundle, backend="auto")`` on a CPU box calls :func:`auto_choice`: the fastest measured path that passed its
gate *now* (a gate that failed after tuning removes its path), can run here and is at least 5% faster than ONNX
Runtime fp32 (speedup: the geometric mean over graph × batch of the p50 latency ratio); with no tune result, one
measured on another CPU, or nothing gated that much faster, it is ONNX Runtime fp32, as before. ``fine-infer info`` prints the choice
and why.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from fine_infer._cpu import cpu_cores
from fine_infer.bundle import Bundle, Manifest, commit_manifest, read_bundle, read_manifest
from fine_infer.errors import BundleError, ConfigError

TUNE_KIND = "fine-infer-tune"
TUNE_VERSION = 1
TUNE_BATCHES = (1, 8)
BASELINE = "onnxruntime"
GATES_KEY = "cpu_gates"  # manifest.validation[GATES_KEY][label]: written by fine-infer validate --backend
TUNE_KEY = "tune"  # manifest.validation[TUNE_KEY]: {"file": "tune.<stamp>.json", "choice": label, ...}
# Another path replaces ONNX Runtime fp32 only when it is at least this much faster: a lower-precision path that
# wins by timing noise is not worth its (gated, but real) precision loss.
MIN_SPEEDUP = 1.05


@dataclass(frozen=True)
class CpuPath:
    """A backend and variant that run a bundle on the CPU; ``label`` is ``backend`` or ``backend/variant``."""

    backend: str
    variant: str = "fp32"

    @property
    def label(self) -> str:
        """``onnxruntime``, ``onnxruntime/int8``, ``openvino/bf16``, ... (fp32 is left out)."""
        return self.backend if self.variant == "fp32" else f"{self.backend}/{self.variant}"

    @classmethod
    def parse(cls, label: str) -> "CpuPath":
        """The path of a label; unknown labels raise :class:`ConfigError` listing the known ones."""
        for p in CPU_PATHS:
            if p.label == label:
                return p
        raise ConfigError(f"unknown CPU path {label!r}; choose one of {', '.join(p.label for p in CPU_PATHS)}")


CPU_PATHS: tuple[CpuPath, ...] = (
    CpuPath("onnxruntime"), CpuPath("onnxruntime", "int8"), CpuPath("onnxruntime", "cpu-opt"),
    CpuPath("openvino"), CpuPath("openvino", "bf16"),
)


@dataclass(frozen=True)
class Choice:
    """What ``backend="auto"`` runs and why (``speedup`` over ONNX Runtime fp32 as tuned, when known)."""

    backend: str
    variant: str
    reason: str
    speedup: float | None = None

    @property
    def label(self) -> str:
        """The CPU path label (``openvino/bf16``)."""
        return CpuPath(self.backend, self.variant).label

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "variant": self.variant, "label": self.label, "reason": self.reason,
                "speedup": self.speedup}


# --- where a path can run, and its gate -----------------------------------------------------------------------------
def path_unavailable(manifest: Manifest, path: CpuPath, capabilities: Iterable[str] | None = None) -> str:
    """Why ``path`` cannot run this bundle on this machine ("" when it can).

    ``capabilities`` stands in for the CPU's OpenVINO ``OPTIMIZATION_CAPABILITIES`` (default: what OpenVINO reports),
    so the bf16 decision can be checked for a CPU without bf16."""
    if path.backend == "onnxruntime":
        if path.variant != "fp32":
            missing = [n for n, g in manifest.graphs.items() if path.variant not in g.variants]
            if missing:
                flag = {"int8": "--int8", "cpu-opt": "--optimize cpu"}.get(path.variant, f"--{path.variant}")
                return f"the bundle has no {path.variant} graph for {', '.join(missing)} (export with {flag})"
        return ""
    if path.backend == "openvino":
        if importlib.util.find_spec("openvino") is None:
            return "OpenVINO is not installed: pip install 'fine-infer[openvino]'"
        from fine_infer.runtime.openvino_runner import precision_unsupported, variant_precision

        return precision_unsupported(variant_precision(path.variant), capabilities)
    raise ConfigError(f"{path.backend!r} is not a CPU path backend")


def gate_status(manifest: Manifest, path: CpuPath) -> tuple[str, str]:
    """(``passed`` / ``failed`` / ``skipped`` / ``missing``, detail) of ``path``'s precision gate in the manifest.

    The latest ``fine-infer validate --backend`` record wins; without one, the export's gates count (the fp32 parity
    gate for ``onnxruntime``, the variant gates for ``onnxruntime/int8`` and ``onnxruntime/cpu-opt``)."""
    v = manifest.validation or {}
    rec = (v.get(GATES_KEY) or {}).get(path.label)
    if rec:
        if rec.get("skipped"):
            return "skipped", rec["skipped"]
        return ("passed", _gate_figures(rec)) if rec.get("passed") else ("failed", rec.get("reason", ""))
    if path.backend == "onnxruntime":
        if path.variant == "fp32":
            return ("passed", "export parity gate") if v.get("passed") else ("missing", "no export parity record")
        rows = [(g.get("variants") or {}).get(path.variant) for g in (v.get("graphs") or {}).values()]
        if rows and all(rows) and not any(r.get("gate") == "skipped" for r in rows):  # export ran with gates off
            bad = [r.get("reason", "") for r in rows if not r.get("passed")]
            return ("failed", "; ".join(bad)) if bad else ("passed", "export gate")
    return "missing", f"not gated yet: run `fine-infer validate BUNDLE --backend {path.backend}`"


def _gate_figures(rec: dict[str, Any]) -> str:
    s = rec.get("summary") or {}
    if not s:
        return "passed"
    return f"min cosine {s['min_cosine']:.6f}, top-{rec.get('tolerance', {}).get('k', 10)} {s['topk_agreement']:.3f}"


# --- measuring ------------------------------------------------------------------------------------------------------
def cpu_signature() -> dict[str, Any]:
    """This machine's CPU model and usable cores: a tune result measured on another CPU is not trusted."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": cpu_cores()}


def _geomean(xs: Sequence[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def rank_paths(bench_result: dict[str, Any], manifest: Manifest) -> dict[str, dict[str, Any]]:
    """Per CPU path label: its speedup over ``onnxruntime`` (geometric mean over graph × batch of the p50 ratio),
    the per-cell ratios, and its gate; paths without rows keep their skip reason."""
    base = {(r["graph"], r["batch"]): r["p50_ms"] for r in bench_result["rows"] if r["backend"] == BASELINE}
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


def pick(ranked: dict[str, dict[str, Any]], eligible: Callable[[CpuPath], str]) -> Choice:
    """The fastest ranked path, at least :data:`MIN_SPEEDUP` × ONNX Runtime fp32, for which ``eligible(path)``
    returns "" (else why not); ONNX Runtime fp32 otherwise."""
    passed_over: list[str] = []
    order = sorted((e for e in ranked.items() if e[1].get("speedup") and (e[0] == BASELINE or
                                                                          e[1]["speedup"] >= MIN_SPEEDUP)),
                   key=lambda e: -e[1]["speedup"])
    for label, entry in order:
        path = CpuPath.parse(label)
        why = eligible(path) if path.label != BASELINE else ""
        if why:
            passed_over.append(f"{label} ({entry['speedup']:.2f}×) {why}")
            continue
        extra = f"; passed over: {'; '.join(passed_over)}" if passed_over else ""
        if label == BASELINE:
            return Choice("onnxruntime", "fp32", f"no gated CPU path was measured ≥ {MIN_SPEEDUP:g}× ONNX Runtime "
                                                 "fp32, so ONNX Runtime fp32" + extra, 1.0)
        return Choice(path.backend, path.variant,
                      f"fastest gated CPU path as tuned: {entry['speedup']:.2f}× ONNX Runtime fp32 "
                      f"({entry['gate_detail'] or 'gate passed'}){extra}", entry["speedup"])
    return Choice("onnxruntime", "fp32", "the tune result measured no ONNX Runtime fp32 baseline: ONNX Runtime fp32")


def _eligibility(manifest: Manifest, capabilities: Iterable[str] | None) -> Callable[[CpuPath], str]:
    def why_not(path: CpuPath) -> str:
        gate, detail = gate_status(manifest, path)
        if gate != "passed":
            return f"gate {gate}: {detail}"
        return path_unavailable(manifest, path, capabilities)

    return why_not


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
    from fine_infer import bench

    caps = frozenset(capabilities) if capabilities is not None else None
    result = bench.bench_bundle(bundle, backends=[p.label for p in CPU_PATHS], batch_sizes=batch_sizes,
                                graphs=graphs, budget=budget or bench.Budget(), threads=threads, progress=progress,
                                capabilities=caps)
    manifest = read_manifest(bundle)
    ranked = rank_paths(result, manifest)
    choice = pick(ranked, _eligibility(manifest, caps))
    return {"kind": TUNE_KIND, "version": TUNE_VERSION, "choice": choice.label, "reason": choice.reason,
            "speedup": choice.speedup, "batch_sizes": list(batch_sizes), "graphs": list(graphs or manifest.graphs),
            "threads": threads, "signature": cpu_signature(), "paths": ranked,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "bench": {"rows": result["rows"], "skipped": result["skipped"], "machine": result.get("machine")}}


# --- storing --------------------------------------------------------------------------------------------------------
def update_manifest(path: str | Path, mutate: Callable[[Manifest], Iterable[str]], added: Sequence[str] = ()) -> Manifest:
    """Re-read ``path``'s manifest, apply ``mutate`` (which returns the file names it stopped listing), hash the
    ``added`` files into it, rewrite it atomically, then delete the files it no longer lists.

    Only ``manifest.json`` changes besides the added and dropped files, so every other sha256 stays valid. Not safe
    against two processes updating the same bundle at once (the later write wins)."""
    manifest = read_manifest(path)
    dropped = [n for n in mutate(manifest) if n]
    for name in dropped:
        manifest.files.pop(name, None)
    commit_manifest(path, manifest, added, stale=dropped)
    return manifest


def write_tune(bundle: str | Path, result: dict[str, Any]) -> str:
    """Store a :func:`tune_bundle` result in ``bundle`` as ``tune.<stamp>.json``; returns the file name."""
    from fine_infer._atomic import atomic_write_bytes

    if result.get("kind") != TUNE_KIND:
        raise ConfigError("not a tune result: make one with fine_infer.tune.tune_bundle")
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


def read_tune(bundle: Bundle) -> dict[str, Any] | None:
    """The bundle's stored tune result (None when it has none); a listed but unreadable one is a BundleError."""
    rec = (bundle.manifest.validation or {}).get(TUNE_KEY)
    if not rec:
        return None
    try:
        data = json.loads(bundle.file(rec["file"]).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"bundle {bundle.path}: its tune result cannot be read ({exc}); "
                          "run `fine-infer tune BUNDLE` again") from None
    if data.get("kind") != TUNE_KIND:
        raise BundleError(f"bundle {bundle.path}: {rec['file']} is not a tune result; run `fine-infer tune BUNDLE`")
    return data


# --- choosing -------------------------------------------------------------------------------------------------------
def auto_choice(bundle: Bundle | str | Path, capabilities: Iterable[str] | None = None) -> Choice:
    """What ``backend="auto"`` runs on a CPU box, and why (see the module docstring)."""
    if not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle)
    tune = read_tune(bundle)
    if tune is None:
        return Choice("onnxruntime", "fp32", "no tune result in the bundle (run `fine-infer tune BUNDLE`): "
                                             "ONNX Runtime fp32")
    here, there = cpu_signature(), tune.get("signature") or {}
    if (here["cpu"], here["cores"]) != (there.get("cpu"), there.get("cores")):
        return Choice("onnxruntime", "fp32", f"the tune result was measured on another CPU ({there.get('cpu')}, "
                                             f"{there.get('cores')} cores; this is {here['cpu']}, {here['cores']}): "
                                             "ONNX Runtime fp32 (run `fine-infer tune BUNDLE` here)")
    return pick(tune.get("paths") or {}, _eligibility(bundle.manifest, capabilities))


def describe(bundle: Bundle, capabilities: Iterable[str] | None = None) -> list[str]:
    """Lines for ``fine-infer info``: every CPU path's gate and tuned speedup, and what ``auto`` picks and why."""
    tune = None
    try:
        tune = read_tune(bundle)
    except BundleError as exc:
        return [f"auto     ONNX Runtime fp32 ({exc})"]
    paths = (tune or {}).get("paths") or {}
    lines = []
    for p in CPU_PATHS:
        gate, detail = gate_status(bundle.manifest, p)
        speed = (paths.get(p.label) or {}).get("speedup")
        why = path_unavailable(bundle.manifest, p, capabilities)
        lines.append(f"cpu path {p.label:<20} gate {gate:<7} "
                     + (f"{speed:.2f}× " if speed else "- ") + f"({detail})" + (f"; cannot run here: {why}" if why
                                                                                 else ""))
    c = auto_choice(bundle, capabilities)
    lines.append(f"auto     {c.label} on a CPU box: {c.reason}")
    return lines
