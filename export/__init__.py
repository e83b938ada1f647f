"""Export stage (``fine_infer.export``): a trained model in, a validated bundle out.

- :func:`export_arch`: a zoo arch at a preset, optionally with a checkpoint.
- :func:`export_model`: a built :class:`fine_infer.models.ZooModel`.
- :func:`export_module`: any ``nn.Module`` with named example inputs.

Every graph passes the ``onnx.checker`` full check and ONNX Runtime vs PyTorch parity on fresh random inputs at
batch sizes 1, 3 and 8 before the bundle is written; a failed gate raises :class:`GateFailure`. Checks that need the
finished bundle (the catalogue recall gate, :class:`fine_infer.tools.recall.RecallCheck`) are passed in as
``checks``. Public modules: :mod:`~fine_infer.export.gates` (the gates' shared core), :mod:`~fine_infer.export.report`,
:mod:`~fine_infer.export.lint` (TensorRT operator lint), :mod:`~fine_infer.export.engines` (TensorRT engine builds),
:mod:`~fine_infer.export.triton_repo` (a Triton Inference Server model repository).
"""

from __future__ import annotations

if __name__ != "fine_infer.export":  # a bare `import export` found this folder: hand it on (fine_infer/_bare_import.py)
    from fine_infer._bare_import import step_aside

    step_aside(__name__, __file__)

from pathlib import Path
from typing import Any

from fine_infer.export._bundle_export import export_model, export_module
from fine_infer.export._onnx import DEFAULT_OPSET, EXPORTERS, check_onnx, export_graph
from fine_infer.export._user_module import load_factory, parse_dynamic_axes
from fine_infer.export.report import ExportReport, GateFailure, SealedCheck


def export_arch(
    arch: str,
    out: str | Path,
    preset: str = "tiny",
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> ExportReport:
    """Build ``arch`` at ``preset`` (with ``checkpoint`` or the shipped ``pretrained`` weights) and export it; kwargs
    go to :func:`export_model` (``checks=[RecallCheck()]`` adds the catalogue recall gate)."""
    from fine_infer.models import create

    model = create(arch, preset, checkpoint=checkpoint, pretrained=pretrained, **(overrides or {}))
    return export_model(model, out, preset=preset, **kwargs)


__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "ExportReport",
    "GateFailure",
    "SealedCheck",
    "check_onnx",
    "export_arch",
    "export_graph",
    "export_model",
    "export_module",
    "load_factory",
    "parse_dynamic_axes",
]
