"""The export recall gate: a trained zoo bundle's retrieval quality on the generated catalogue's held-out split must
match its PyTorch model's (:mod:`fine_infer.tools.evaluate` runs the protocols). It runs on the sealed bundle, before
the bundle is moved into place, as a :class:`fine_infer.export.SealedCheck`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from fine_infer.errors import ConfigError
from fine_infer.tools.evaluate import DEFAULT_N, DEFAULT_SEED, HEADLINE, evaluate_bundle, evaluate_model


# bundle variant -> (backend, session variant) it runs as; the rest run on ONNX Runtime under their own name
RUNS_AS = {"openvino-int8": ("openvino", "int8")}
# the variants the recall gate evaluates (the calibrated int8 ones too: export --int8-static)
GATED = ("fp32", "fp16", "int8-static", "openvino-int8")


@dataclass
class RecallGate:
    """Outcome of :func:`recall_gate`: the reference and each variant's headline metric, in points (× 100)."""

    metric: str
    reference: float
    variants: dict[str, float]
    tolerance_points: float
    passed: bool
    reason: str = ""
    failed: tuple[str, ...] = ()  # the variants outside the tolerance or that could not run


def recall_gate(
    model, bundle, variants: Sequence[str] = ("fp32", "fp16"), tolerance_points: float = 0.5,
    *, n: int = DEFAULT_N, seed: int = DEFAULT_SEED,
) -> RecallGate:
    """The export recall gate: each ``variant`` of ``bundle`` (ONNX Runtime) must be within ``tolerance_points``
    percentage points of ``model``'s headline metric. Variants the bundle lacks are a failure."""
    ref = evaluate_model(model, n=n, seed=seed)
    metric = HEADLINE[ref.arch]
    got: dict[str, float] = {}
    broken: dict[str, str] = {}
    for v in variants:
        backend, variant = RUNS_AS.get(v, ("onnxruntime", v))
        try:
            got[v] = 100.0 * evaluate_bundle(bundle, backend=backend, variant=variant, n=n, seed=seed).headline
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run fails the gate with its reason
            broken[v] = f"{v}: {type(exc).__name__}: {exc}"
    r = 100.0 * ref.headline
    bad = [v for v, x in got.items() if abs(x - r) > tolerance_points]
    reasons = list(broken.values())
    if bad:
        reasons.append("; ".join(f"{v} {metric} {got[v]:.2f} vs PyTorch {r:.2f}" for v in bad)
                       + f" (> {tolerance_points} points)")
    reason = "; ".join(reasons)
    failed = tuple(v for v in variants if v in broken or v in bad)
    return RecallGate(metric, r, got, tolerance_points, not reason, reason, failed)


class RecallCheck:
    """The export recall gate as a check on the sealed bundle (:class:`fine_infer.export.SealedCheck`): its fp32 (and
    fp16 and the calibrated int8 variants, when written) graphs' headline metric on the catalogue's held-out split must be within
    ``tolerance_points`` points of the PyTorch model's. ``export_arch(..., checks=[RecallCheck()])``."""

    name = "recall"

    def __init__(self, tolerance_points: float = 0.5, required: bool = True) -> None:
        self.tolerance_points = tolerance_points
        self.required = required  # False: an export the gate cannot evaluate (a graph subset) goes ungated

    def __call__(self, model, bundle, variants: Sequence[str]) -> dict[str, Any] | None:
        """Run :func:`recall_gate` on the sealed ``bundle``; the result as recorded in the report and manifest (None
        when not ``required`` and the bundle lacks a graph the protocol needs)."""
        from fine_infer.bundle import read_manifest

        missing = sorted(set(model.graphs()) - set(read_manifest(bundle).graphs))
        if missing and not self.required:
            return None
        if model.arch not in HEADLINE:
            raise ConfigError(f"the recall gate evaluates zoo archs on the generated catalogue ({', '.join(HEADLINE)}); "
                              f"{model.arch!r} has no protocol there: export without --recall-gate")
        if missing:
            raise ConfigError(f"the recall gate runs {model.arch}'s retrieval protocol, which needs the graph(s) "
                              f"{', '.join(missing)}: export every graph, or pass --no-recall-gate")
        gate = recall_gate(model, bundle, [v for v in variants if v in GATED], self.tolerance_points)
        line = (f"recall gate {gate.metric}: PyTorch {gate.reference:.2f}, "
                + ", ".join(f"{v} {x:.2f}" for v, x in gate.variants.items())
                + f" (within {self.tolerance_points} points: {'pass' if gate.passed else 'FAIL'})")
        return {"metric": gate.metric, "pytorch": round(gate.reference, 2),
                "variants": {v: round(x, 2) for v, x in gate.variants.items()},
                "tolerance_points": self.tolerance_points, "passed": gate.passed, "reason": gate.reason,
                "failed_variants": list(gate.failed), "line": line}


def default_checks(pretrained: bool, recall_gate: bool | None = None,
                   tolerance_points: float = 0.5) -> list[RecallCheck]:
    """The checks an export of a zoo arch gets: the recall gate when asked for (``recall_gate`` True), and by default
    (``None``) for the shipped ``pretrained`` weights when every graph is exported (the catalogue they were trained on
    is what it evaluates; with random weights every recall is near chance, and a subset of the graphs cannot run the
    retrieval protocol)."""
    if recall_gate is None:
        return [RecallCheck(tolerance_points, required=False)] if pretrained else []
    return [RecallCheck(tolerance_points)] if recall_gate else []


__all__ = ["RecallCheck", "RecallGate", "default_checks", "recall_gate"]
