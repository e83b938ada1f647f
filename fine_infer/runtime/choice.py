"""What ``backend="auto"`` runs on a CPU box: the fastest gated CPU path of the bundle's stored tune result.

``fine-infer validate --backend`` records each CPU path's precision gate in ``manifest.validation["cpu_gates"]``;
``fine-infer tune`` (:mod:`fine_infer.tools.tune`) times the paths and stores its result in the bundle
(``manifest.validation["tune"]`` names the file). This module only *reads* them: it never times anything.

:func:`auto_choice` picks the fastest measured path that passed its gate *now* (a gate that failed after tuning
removes its path), can run here and is at least :data:`MIN_SPEEDUP` × ONNX Runtime fp32 (speedup: the geometric mean
over graph × batch of the p50 latency ratio); with no tune result, one measured on another CPU, or nothing gated that
much faster, it is ONNX Runtime fp32. ``fine-infer info`` prints the choice and why (:func:`describe`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from fine_infer._cpu import cpu_signature
from fine_infer.bundle import Bundle, Manifest, read_bundle
from fine_infer.errors import BundleError
from fine_infer.runtime.paths import BASELINE, CPU_PATHS, ExecPath, path_unavailable

TUNE_KIND = "fine-infer-tune"
GATES_KEY = "cpu_gates"  # manifest.validation[GATES_KEY][label]: written by fine-infer validate --backend
TUNE_KEY = "tune"  # manifest.validation[TUNE_KEY]: {"file": "tune.<stamp>.json", "choice": label, ...}
# Another path replaces ONNX Runtime fp32 only when it is at least this much faster: a lower-precision path that
# wins by timing noise is not worth its (gated, but real) precision loss.
MIN_SPEEDUP = 1.05


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
        return ExecPath(self.backend, self.variant).label

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "variant": self.variant, "label": self.label, "reason": self.reason,
                "speedup": self.speedup}


def gate_status(manifest: Manifest, path: ExecPath) -> tuple[str, str]:
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


def pick(ranked: dict[str, dict[str, Any]], eligible: Callable[[ExecPath], str]) -> Choice:
    """The fastest ranked path, at least :data:`MIN_SPEEDUP` × ONNX Runtime fp32, for which ``eligible(path)``
    returns "" (else why not); ONNX Runtime fp32 otherwise."""
    passed_over: list[str] = []
    order = sorted((e for e in ranked.items() if e[1].get("speedup") and (e[0] == BASELINE.label or
                                                                          e[1]["speedup"] >= MIN_SPEEDUP)),
                   key=lambda e: -e[1]["speedup"])
    for label, entry in order:
        path = ExecPath.parse(label, CPU_PATHS)
        why = eligible(path) if path.label != BASELINE.label else ""
        if why:
            passed_over.append(f"{label} ({entry['speedup']:.2f}×) {why}")
            continue
        extra = f"; passed over: {'; '.join(passed_over)}" if passed_over else ""
        if label == BASELINE.label:
            return Choice("onnxruntime", "fp32", f"no gated CPU path was measured ≥ {MIN_SPEEDUP:g}× ONNX Runtime "
                                                 "fp32, so ONNX Runtime fp32" + extra, 1.0)
        return Choice(path.backend, path.variant,
                      f"fastest gated CPU path as tuned: {entry['speedup']:.2f}× ONNX Runtime fp32 "
                      f"({entry['gate_detail'] or 'gate passed'}){extra}", entry["speedup"])
    return Choice("onnxruntime", "fp32", "the tune result measured no ONNX Runtime fp32 baseline: ONNX Runtime fp32")


def eligibility(manifest: Manifest, capabilities: Iterable[str] | None) -> Callable[[ExecPath], str]:
    def why_not(path: ExecPath) -> str:
        gate, detail = gate_status(manifest, path)
        if gate != "passed":
            return f"gate {gate}: {detail}"
        return path_unavailable(manifest, path, capabilities)

    return why_not


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
    return pick(tune.get("paths") or {}, eligibility(bundle.manifest, capabilities))


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
