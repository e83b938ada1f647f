"""What ``backend="auto"`` runs on a CPU box: the fastest gated CPU path of the bundle's stored tune result.

``fine-infer validate --backend`` records each CPU path's precision gate in ``manifest.validation["cpu_gates"]``;
``fine-infer tune`` (:mod:`fine_infer.tools.tune`) times the paths and stores its result in the bundle
(``manifest.validation["tune"]`` names the file). This module only *reads* them and decides on stored numbers: it
never times anything.

**The decision rule** (:func:`decide`, on a tune result that timed the paths in interleaved rounds: every path once
per round, so a burst of load falls on all of them alike). Per round, a path's speedup is the geometric mean over
graph × batch of ONNX Runtime fp32's time over its own; the speedup reported is the median over rounds. Path A is
*clearly faster* than B when the per-round ratios A/B have a median ≥ :data:`MIN_SPEEDUP` **and** a lower quartile
above 1 (A won at least about three rounds in four), so one fast round under a burst of load decides nothing.

- The fastest gated path W (median speedup) that is not clearly faster than ONNX Runtime fp32: ONNX Runtime fp32
  (verdict ``noise``: a lower precision is not worth a win inside the noise).
- Otherwise the *tie set*: W and every gated path W is not clearly faster than (and that is itself clearly faster
  than ONNX Runtime fp32). One path: W (verdict ``clear``). Several (verdict ``tie``, said in the reason): the previous
  choice when it is one of them, else the most precise of them (highest gate min cosine, then the order of
  :data:`~fine_infer.runtime.paths.CPU_PATHS`), so runs that see the same tie pick the same path.

:func:`auto_choice` applies it to the stored result with the gates as they are *now* (a gate that failed after
tuning removes its path); with no tune result or one measured on another CPU it is ONNX Runtime fp32. Results of the
first tune format (one measurement, no rounds) go through :func:`pick`. ``fine-infer info`` prints the choice and why
(:func:`describe`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from fine_infer import _strict_json
from fine_infer._cpu import cpu_signature
from fine_infer.bundle import Bundle, Manifest, read_bundle
from fine_infer.errors import BundleError
from fine_infer.runtime.paths import BASELINE, CALIBRATED, CPU_PATHS, ExecPath, bundle_variant, path_unavailable

TUNE_KIND = "fine-infer-tune"
GATES_KEY = "cpu_gates"  # manifest.validation[GATES_KEY][label]: written by fine-infer validate --backend
TUNE_KEY = "tune"  # manifest.validation[TUNE_KEY]: {"file": "tune.<stamp>.json", "choice": label, ...}
# Another path replaces ONNX Runtime fp32 only when it is at least this much faster: a lower-precision path that
# wins by timing noise is not worth its (gated, but real) precision loss.
MIN_SPEEDUP = 1.05
# A path is clearly faster than another when this quantile of the per-round ratios is above 1 (see the docstring).
LOW_QUANTILE = 0.25
VERDICTS = ("clear", "tie", "noise", "baseline")


@dataclass(frozen=True)
class Choice:
    """What ``backend="auto"`` runs and why (``speedup`` over ONNX Runtime fp32 as tuned, when known; ``verdict``:
    how :func:`decide` got there — ``clear``, ``tie``, ``noise`` or ``baseline`` — empty when it did not decide)."""

    backend: str
    variant: str
    reason: str
    speedup: float | None = None
    verdict: str = ""

    @property
    def label(self) -> str:
        """The CPU path label (``openvino/bf16``)."""
        return ExecPath(self.backend, self.variant).label

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "variant": self.variant, "label": self.label, "reason": self.reason,
                "speedup": self.speedup, "verdict": self.verdict}


def gate_status(manifest: Manifest, path: ExecPath) -> tuple[str, str]:
    """(``passed`` / ``failed`` / ``skipped`` / ``missing``, detail) of ``path``'s precision gate in the manifest.

    The latest ``fine-infer validate --backend`` record wins; without one, the export's gates count (the fp32 parity
    gate for ``onnxruntime``, the variant gates for the paths that run a file of their own: ``onnxruntime/int8``,
    ``onnxruntime/cpu-opt`` and the calibrated ``onnxruntime/int8-static`` and ``openvino/int8``, which validate does
    not re-gate: their gate is on held-out real inputs)."""
    v = manifest.validation or {}
    rec = (v.get(GATES_KEY) or {}).get(path.label)
    if rec:
        if rec.get("skipped"):
            return "skipped", rec["skipped"]
        return ("passed", _gate_figures(rec)) if rec.get("passed") else ("failed", rec.get("reason", ""))
    key = bundle_variant(path)
    if path.backend == "onnxruntime" and path.variant == "fp32":
        return ("passed", "export parity gate") if v.get("passed") else ("missing", "no export parity record")
    if key is not None:  # a graph file of its own, gated at export (the calibrated ones on held-out real inputs)
        rows = [(g.get("variants") or {}).get(key) for g in (v.get("graphs") or {}).values()]
        if rows and all(rows) and not any(r.get("gate") == "skipped" for r in rows):  # export ran with gates off
            bad = [r.get("reason", "") for r in rows if not r.get("passed")]
            if bad:
                return "failed", "; ".join(bad)
            worst = min((r.get("summary") or {}).get("min_cosine", 1.0) for r in rows)
            return "passed", (f"export gate, min cosine {worst:.6f}" + (" on held-out real inputs" if all(
                r.get("inputs") == "held-out real" for r in rows) else "") if path in CALIBRATED else "export gate")
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


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (linear between order statistics, as numpy's default)."""
    v = sorted(xs)
    pos = (len(v) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def margin(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(median, lower quartile) of the per-round ratios ``a[r] / b[r]`` of two paths' per-round speedups."""
    d = [x / y for x, y in zip(a, b)]
    return statistics.median(d), quantile(d, LOW_QUANTILE)


def clearly_faster(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether per-round speedups ``a`` beat ``b`` outside the noise: median ratio ≥ :data:`MIN_SPEEDUP` and lower
    quartile of the ratios > 1."""
    med, low = margin(a, b)
    return med >= MIN_SPEEDUP and low > 1.0


def _fmt_margin(a: Sequence[float], b: Sequence[float]) -> str:
    med, low = margin(a, b)
    return f"{med:.2f}× (lower quartile {low:.2f}× over {len(a)} rounds)"


def decide(ranked: dict[str, dict[str, Any]], eligible: Callable[[ExecPath], str],
           previous: str | None = None) -> Choice:
    """The module docstring's rule on per-round speedups: ``ranked[label]["rounds"]`` (each path's speedup over ONNX
    Runtime fp32 in each round, the baseline's all 1), ``gate_min_cosine`` (tie-break); ``eligible(path)`` returns
    "" or why a path may not be picked; ``previous``: the choice stored before, kept in a tie."""
    base = BASELINE.label
    rounds = {k: list(e["rounds"]) for k, e in ranked.items() if e.get("rounds")}
    if base not in rounds:
        return Choice("onnxruntime", "fp32", "the tune result measured no ONNX Runtime fp32 baseline: ONNX Runtime fp32",
                      verdict="baseline")
    passed_over = []
    ok = [base]
    for label in rounds:
        if label == base:
            continue
        why = eligible(ExecPath.parse(label, CPU_PATHS))
        if why:
            passed_over.append(f"{label} ({statistics.median(rounds[label]):.2f}×) {why}")
        else:
            ok.append(label)
    med = {k: statistics.median(rounds[k]) for k in ok}
    order = sorted(ok, key=lambda k: -med[k])
    extra = f"; passed over: {'; '.join(passed_over)}" if passed_over else ""
    w = order[0]
    if w == base:
        return Choice("onnxruntime", "fp32", "no gated CPU path was faster than ONNX Runtime fp32 in the median round: "
                                             "ONNX Runtime fp32" + extra, 1.0, "baseline")
    if not clearly_faster(rounds[w], rounds[base]):
        return Choice("onnxruntime", "fp32",
                      f"the fastest gated path, {w}, is {_fmt_margin(rounds[w], rounds[base])} ONNX Runtime fp32: inside "
                      f"the noise (needs a median ≥ {MIN_SPEEDUP:g}× and a lower quartile > 1), so ONNX Runtime fp32"
                      + extra, 1.0, "noise")
    runner_up = order[1]
    tied = [w] + [k for k in order[1:] if k != base and not clearly_faster(rounds[w], rounds[k])
                  and clearly_faster(rounds[k], rounds[base])]
    if len(tied) == 1:
        path = ExecPath.parse(w, CPU_PATHS)
        return Choice(path.backend, path.variant,
                      f"fastest gated CPU path: {med[w]:.2f}× ONNX Runtime fp32 (median of {len(rounds[w])} rounds; "
                      f"{ranked[w].get('gate_detail') or 'gate passed'}), {_fmt_margin(rounds[w], rounds[runner_up])} "
                      f"the runner-up {runner_up}" + extra, med[w], "clear")
    index = {p.label: i for i, p in enumerate(CPU_PATHS)}
    if previous in tied:
        keep, how = previous, "kept the previous choice"
    else:
        keep = max(tied, key=lambda k: (ranked[k].get("gate_min_cosine") or 0.0, -index.get(k, 99)))
        how = "took the most precise of them (gate min cosine)"
    path = ExecPath.parse(keep, CPU_PATHS)
    others = ", ".join(f"{k} {med[k]:.2f}×" for k in tied)
    return Choice(path.backend, path.variant,
                  f"{len(tied)} gated paths tie inside the noise ({others} ONNX Runtime fp32; the fastest is "
                  f"{_fmt_margin(rounds[w], rounds[tied[1]])} the next); {how}: {keep}" + extra, med[keep], "tie")


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
        if not isinstance(rec, dict):
            raise ValueError("its manifest record is not an object")
        data = _strict_json.loads(bundle.file(rec["file"]).read_text(encoding="utf-8"))
        problem = _tune_problem(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"bundle {bundle.path}: its tune result cannot be read ({str(exc)[:200]}); "
                          "run `fine-infer tune BUNDLE` again") from None
    if problem:
        raise BundleError(f"bundle {bundle.path}: {rec['file']} is not a tune result ({problem}); "
                          "run `fine-infer tune BUNDLE`")
    return data


def _number(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _tune_problem(data: Any) -> str:
    """Why ``data`` (a file from the bundle, so from elsewhere) is not a tune result this module can read, or ""."""
    if not isinstance(data, dict) or data.get("kind") != TUNE_KIND:
        return f"no kind {TUNE_KIND!r}"
    paths, sig = data.get("paths") or {}, data.get("signature") or {}
    if not isinstance(paths, dict) or not all(isinstance(e, dict) for e in paths.values()):
        return "paths is not an object of objects"
    if not isinstance(sig, dict):
        return "signature is not an object"
    for label, e in paths.items():
        for key in ("speedup", "gate_min_cosine"):
            if e.get(key) is not None and not _number(e[key]):
                return f"paths.{label}.{key} is not a number"
        rounds = e.get("rounds")
        if rounds is not None and not (isinstance(rounds, list) and all(_number(x) for x in rounds)):
            return f"paths.{label}.rounds is not a list of numbers"
        if e.get("gate_detail") is not None and not isinstance(e["gate_detail"], str):
            return f"paths.{label}.gate_detail is not a string"
    for key in ("choice", "reason"):
        if data.get(key) is not None and not isinstance(data[key], str):
            return f"{key} is not a string"
    return ""


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
    paths = tune.get("paths") or {}
    why_not = eligibility(bundle.manifest, capabilities)
    if not any(e.get("rounds") for e in paths.values()):  # the first tune format: one measurement per path
        return pick(paths, why_not)
    stored = tune.get("choice")
    c = decide(paths, why_not, previous=stored)
    if c.label == stored and tune.get("reason"):
        return Choice(c.backend, c.variant, tune["reason"], c.speedup, c.verdict)
    return c


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
        lines.append(f"cpu path {p.label:<25} gate {gate:<7} "
                     + (f"{speed:.2f}× " if speed else "- ") + f"({detail})" + (f"; cannot run here: {why}" if why
                                                                                 else ""))
    c = auto_choice(bundle, capabilities)
    lines.append(f"auto     {c.label} on a CPU box: {c.reason}")
    return lines
