"""What an export reports: per graph the checker, parity and variant gates; the checks run on the sealed bundle;
and :class:`GateFailure`, raised (carrying the report) when a gate fails."""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from fine_infer.errors import ExportError


@dataclass
class ExportReport:
    """What an export did and measured; ``passed`` is False when a gate failed (then no bundle was written)."""

    out: str
    passed: bool = True
    reason: str = ""
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    # what each check on the sealed bundle measured (e.g. "recall"), by the check's name
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "passed": self.passed, "reason": self.reason, "seconds": round(self.seconds, 2),
                "graphs": self.graphs, **self.checks}

    def summary_lines(self) -> list[str]:
        """One human-readable line per graph."""
        lines = []
        for name, g in self.graphs.items():
            p = g.get("parity_summary", {})
            lines.append(
                f"{name:<11} {g.get('file', ''):<18} checker {g.get('checker', '-'):<6} parity "
                + (f"max_abs {p['max_abs']:.2e} max_rel {p['max_rel']:.2e} cos {p['min_cosine']:.7f} "
                   f"top-10 {p['topk_agreement']:.3f}" if p else "-")
            )
            for variant, row in g.get("variants", {}).items():
                v = row.get("summary") or {}
                lines.append(f"  {variant:<9} {row.get('file', ''):<18} gate "
                             + (f"min cos {v['min_cosine']:.6f} top-10 {v['topk_agreement']:.3f}" if v else "skipped"))
            for variant, text in g.get("lint", {}).items():
                lines.append(f"  lint {variant:<5} {text}")
        lines += [c["line"] for c in self.checks.values() if c.get("line")]
        return lines


class GateFailure(ExportError):
    """A gate failed; ``report`` holds everything measured up to that point."""

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


class SealedCheck(Protocol):
    """A gate run on the complete bundle before it is moved into place (the recall gate of
    :class:`fine_infer.tools.recall.RecallCheck` is one). Its result is recorded under :attr:`name` in the report
    and in ``manifest.validation``; a result whose ``passed`` is False fails the export with its ``reason``.

    A result may name the variants that failed it (``failed_variants``, a list): with ``drop_failed_variants`` the
    export then keeps the bundle without them, as it does for a failed variant gate, provided ``fp32`` is not among
    them (a failed fp32 graph always fails the export)."""

    name: str

    def __call__(self, model: Any, bundle: Path, variants: Sequence[str]) -> dict[str, Any] | None:
        """Check the sealed bundle at ``bundle`` (exported from ``model``, with ``variants`` written); return a JSON-able
        result holding ``passed``, ``reason`` and a one-line ``line`` for the report, or None when the check does not
        apply to this bundle."""
        ...


_PROGRESS: ContextVar[Callable[[str], None] | None] = ContextVar("fine_infer_export_progress", default=None)


@contextlib.contextmanager
def progress(report: Callable[[str], None]) -> Iterator[None]:
    """Within the block, every export step (a graph exported, a gate started) is announced to ``report`` as one
    short line: exports take tens of seconds to minutes, and a silent one looks hung. The CLI prints them."""
    token = _PROGRESS.set(report)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def say(message: str) -> None:
    """Announce an export step to the :func:`progress` listener of this context, if any."""
    listener = _PROGRESS.get()
    if listener is not None:
        listener(message)
