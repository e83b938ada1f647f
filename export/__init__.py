"""Export stage (``fine_infer.export``): a trained model in, a validated bundle out.

- :func:`export_arch`: a zoo arch at a preset, optionally with a checkpoint.
- :func:`export_model`: a built :class:`fine_infer.models.ZooModel`.
- :func:`export_module` / :func:`export_user`: any ``nn.Module`` with named example inputs, or a user encoder that
  declares its tasks, tokenizer and image preprocessing (``fine-infer export --module``).
- :func:`export_hf`: a local Hugging Face folder (sentence-transformers BERT-family, CLIPModel, SiglipModel), gated
  against the source library itself (``fine-infer export --hf``).

Every graph passes the ``onnx.checker`` full check and ONNX Runtime vs PyTorch parity on fresh random inputs at
batch sizes 1, 3 and 8 before the bundle is written; a failed gate raises :class:`GateFailure`. Every export records
fixed inputs and the fp32 PyTorch outputs for them in the bundle (``references.npz``), so ``fine-infer validate``
can gate every CPU path of any bundle later, its PyTorch source absent. Checks that need the
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
from typing import TYPE_CHECKING, Any

# Loaded on first use (PEP 562), so that the gates' core (fine_infer.export.gates: recorded references, compare_runs)
# imports without torch: `fine-infer validate` gates a bundle's recorded references on an edge box.
_LAZY = {
    "export_model": "_bundle_export",
    "DEFAULT_OPSET": "_onnx", "EXPORTERS": "_onnx", "check_onnx": "_onnx", "export_graph": "_onnx",
    "UserEncoder": "_user_module", "UserGraph": "_user_module", "export_module": "_user_module",
    "export_user": "_user_module", "load_factory": "_user_module", "parse_dynamic_axes": "_user_module",
    "declare": "_user_module",
    "export_hf": "hf",
    "ExportReport": "report", "GateFailure": "report", "SealedCheck": "report",
    "drop_warning": "_variants",
}

if TYPE_CHECKING:
    from fine_infer.export._bundle_export import export_model
    from fine_infer.export._onnx import DEFAULT_OPSET, EXPORTERS, check_onnx, export_graph
    from fine_infer.export._user_module import (
        UserEncoder,
        UserGraph,
        declare,
        export_module,
        export_user,
        load_factory,
        parse_dynamic_axes,
    )
    from fine_infer.export._variants import drop_warning
    from fine_infer.export.hf import export_hf
    from fine_infer.export.report import ExportReport, GateFailure, SealedCheck


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def export_arch(
    arch: str,
    out: str | Path,
    preset: str = "tiny",
    *,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> "ExportReport":
    """Build ``arch`` at ``preset`` (with ``checkpoint`` or the shipped ``pretrained`` weights) and export it; kwargs
    go to :func:`export_model` (``checks=[RecallCheck()]`` adds the catalogue recall gate)."""
    from fine_infer.export._bundle_export import export_model
    from fine_infer.models import create

    model = create(arch, preset, checkpoint=checkpoint, pretrained=pretrained, **(overrides or {}))
    return export_model(model, out, preset=preset, **kwargs)


__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "ExportReport",
    "GateFailure",
    "SealedCheck",
    "UserEncoder",
    "UserGraph",
    "check_onnx",
    "declare",
    "drop_warning",
    "export_arch",
    "export_graph",
    "export_hf",
    "export_model",
    "export_module",
    "export_user",
    "load_factory",
    "parse_dynamic_axes",
]
