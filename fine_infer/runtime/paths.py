"""Every way fine-infer can run a bundle, named once: the backends :func:`fine_infer.load` takes, the CPU paths that
``fine-infer tune`` times and ``backend="auto"`` picks from, and the rows of ``fine-infer bench``.

An :class:`ExecPath` is a backend, the variant it runs and (for PyTorch) whether the fused Triton kernels run; its
``label`` (``onnxruntime``, ``onnxruntime/int8``, ``openvino/bf16``, ``torch+kernels``) is the name used on the command
line, in bench and tune results and in the manifest's gate records.

============================  =================================================================================
CPU path                      what
============================  =================================================================================
``onnxruntime``               ONNX Runtime, the portable fp32 graph (the baseline)
``onnxruntime/int8``          ONNX Runtime, the dynamic int8 graph (``export --int8``)
``onnxruntime/int8-static``   ONNX Runtime, the calibrated static int8 QDQ graph (``export --int8-static``)
``onnxruntime/cpu-opt``       ONNX Runtime, contrib-op fusions (``export --optimize cpu``)
``openvino``                  OpenVINO, the fp32 graph at f32 inference precision
``openvino/bf16``             OpenVINO, the fp32 graph at bf16 inference precision
``openvino/int8``             OpenVINO, the NNCF-calibrated int8 IR (``export --int8-static``), other ops in f32
============================  =================================================================================

The two calibrated paths (:data:`CALIBRATED`) are gated on held-out real inputs (images, texts), not random ones:
random token ids and noise images are out of distribution for int8 ranges calibrated on real data.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Iterable

from fine_infer.bundle import Manifest
from fine_infer.errors import ConfigError

#: what ``fine_infer.load(..., backend=...)`` takes
BACKENDS = ("auto", "onnxruntime", "openvino", "torch", "tensorrt")


@dataclass(frozen=True)
class ExecPath:
    """A backend, the variant it runs (``fp32``, ``int8``, ``cpu-opt``, ``fp16``; OpenVINO: its inference precision)
    and, for PyTorch, whether the fused Triton kernels run."""

    backend: str
    variant: str = "fp32"
    kernels: bool = False

    @property
    def label(self) -> str:
        """``onnxruntime``, ``onnxruntime/int8``, ``openvino/bf16``, ``torch+kernels`` (fp32 is left out)."""
        if self.kernels:
            return f"{self.backend}+kernels"
        return self.backend if self.variant == "fp32" else f"{self.backend}/{self.variant}"

    @classmethod
    def parse(cls, label: str, among: Iterable["ExecPath"] | None = None) -> "ExecPath":
        """The path of ``label`` among ``among`` (default :data:`PATHS`); unknown labels raise :class:`ConfigError`
        listing the known ones."""
        known = tuple(among if among is not None else PATHS)
        for p in known:
            if p.label == label:
                return p
        raise ConfigError(f"unknown path {label!r}; choose one of {', '.join(p.label for p in known)}")


#: the paths that run a bundle on a CPU without PyTorch: what tune times and ``backend="auto"`` picks from
CPU_PATHS: tuple[ExecPath, ...] = (
    ExecPath("onnxruntime"), ExecPath("onnxruntime", "int8"), ExecPath("onnxruntime", "int8-static"),
    ExecPath("onnxruntime", "cpu-opt"), ExecPath("openvino"), ExecPath("openvino", "bf16"),
    ExecPath("openvino", "int8"),
)
#: the CPU paths whose graphs were calibrated on real data at export: gated on held-out real inputs
CALIBRATED: frozenset[ExecPath] = frozenset({ExecPath("onnxruntime", "int8-static"), ExecPath("openvino", "int8")})
#: OpenVINO variants that run a file of their own (the others are inference precisions of the portable graph)
OPENVINO_FILES = {"int8": "openvino-int8"}
#: the export flag that writes each bundle variant
EXPORT_FLAGS = {"int8": "--int8", "int8-static": "--int8-static", "openvino-int8": "--int8-static",
                "cpu-opt": "--optimize cpu", "fp16": "--fp16"}
#: every path, in the order bench lists its rows
PATHS: tuple[ExecPath, ...] = (ExecPath("torch"), *CPU_PATHS, ExecPath("torch", kernels=True), ExecPath("tensorrt"))
#: the path every other CPU path is measured against
BASELINE = CPU_PATHS[0]


def bundle_variant(path: ExecPath) -> str | None:
    """The key in a graph entry's ``variants`` of the file ``path`` runs (None: the portable fp32 graph)."""
    if path.backend == "openvino":
        return OPENVINO_FILES.get(path.variant)
    return None if path.variant == "fp32" or path.kernels else path.variant


def _missing_file(manifest: Manifest, key: str | None) -> str:
    if key is None:
        return ""
    missing = [n for n, g in manifest.graphs.items() if key not in g.variants]
    if missing:
        return (f"the bundle has no {key} graph for {', '.join(missing)} "
                f"(export with {EXPORT_FLAGS.get(key, '--' + key)})")
    return ""


def path_unavailable(manifest: Manifest, path: ExecPath, capabilities: Iterable[str] | None = None) -> str:
    """Why CPU path ``path`` cannot run this bundle on this machine ("" when it can).

    ``capabilities`` stands in for the CPU's OpenVINO ``OPTIMIZATION_CAPABILITIES`` (default: what OpenVINO reports),
    so the bf16 decision can be checked for a CPU without bf16."""
    if path.backend == "onnxruntime":
        return _missing_file(manifest, bundle_variant(path))
    if path.backend == "openvino":
        missing = _missing_file(manifest, bundle_variant(path))
        if missing:
            return missing
        if importlib.util.find_spec("openvino") is None:
            return "OpenVINO is not installed: pip install 'fine-infer[openvino]'"
        from fine_infer.runtime.openvino_runner import precision_unsupported, variant_precision

        return precision_unsupported(variant_precision(path.variant), capabilities)
    raise ConfigError(f"{path.label!r} is not a CPU path")
