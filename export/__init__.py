"""Export stage (``fine_infer.export``): a trained model in, a validated bundle out.

- :func:`export_arch`: a zoo arch at a preset, optionally with a checkpoint.
- :func:`export_model`: a built :class:`fine_infer.models.ZooModel`.
- :func:`export_module`: any ``nn.Module`` with named example inputs.

Every graph passes the ``onnx.checker`` full check and ONNX Runtime vs PyTorch parity on fresh random inputs at
batch sizes 1, 3 and 8 before the bundle is written; a failed gate raises :class:`GateFailure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fine_infer.export._bundle_export import ExportReport, GateFailure, export_model, export_module
from fine_infer.export._onnx import DEFAULT_OPSET, EXPORTERS, check_onnx, export_graph
from fine_infer.export._user_module import load_factory, parse_dynamic_axes


def export_arch(
    arch: str,
    out: str | Path,
    preset: str = "tiny",
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    overrides: dict[str, Any] | None = None,
    recall_gate: bool | None = None,
    **kwargs: Any,
) -> ExportReport:
    """Build ``arch`` at ``preset`` (with ``checkpoint`` weights) and export it; kwargs go to :func:`export_model`.

    ``recall_gate`` defaults to on for ``pretrained`` weights (trained on the catalogue the gate evaluates on) when
    every graph is exported, and off otherwise: with random weights every recall is near chance, and a subset of the
    graphs (``graphs=["image"]``) cannot run the retrieval protocol."""
    from fine_infer.models import create

    model = create(arch, preset, checkpoint=checkpoint, pretrained=pretrained, **(overrides or {}))
    partial = set(kwargs.get("graphs") or model.graphs()) != set(model.graphs())
    gate = (pretrained and not partial) if recall_gate is None else recall_gate
    return export_model(model, out, preset=preset, recall_gate=gate, **kwargs)


__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "ExportReport",
    "GateFailure",
    "check_onnx",
    "export_arch",
    "export_graph",
    "export_model",
    "export_module",
    "load_factory",
    "parse_dynamic_axes",
]
