"""Which file of a bundle runs a graph: the portable fp32 ONNX, one of its variants, or a TensorRT engine.

A graph entry's ``file`` is the portable fp32 graph; ``variants`` maps a variant name to another file of the bundle:

- ``fp16``: fp16 ONNX (norms, softmax and reductions in fp32, fp32 inputs/outputs); for GPUs and TensorRT;
- ``int8``, ``int8-static``, ``cpu-opt``: ONNX Runtime CPU graphs (dynamic int8 quantisation, calibrated static int8
  QDQ, contrib-op fusions), never TensorRT;
- ``openvino-int8``: the NNCF-calibrated int8 OpenVINO IR (``<graph>.openvino-int8.xml``; its weights are the
  ``.bin`` of the same name beside it, hashed like every file), run by the OpenVINO backend as variant ``int8``;
- ``trt``, ``trt-fp16``: TensorRT engines built on the device from the fp32 / fp16 graph (``fine-infer
  build-engine``), each with a ``<engine>.json`` sidecar recording TensorRT version, GPU and compute capability.

No torch and no export code here: the runtime extra can resolve variants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fine_infer.bundle import Bundle, GraphEntry
from fine_infer.errors import BundleError

DEFAULT_VARIANT = "fp32"
ORT_CPU_ONLY = frozenset({"int8", "int8-static", "cpu-opt"})
OPENVINO_ONLY = frozenset({"openvino-int8"})
ENGINE_PREFIX = "trt"
# how to ask for each variant at export (the missing-variant errors say it)
_EXPORT_HINTS = {"fp16": " (export with --fp16)", "int8": " (export with --int8)",
                 "int8-static": " (export with --int8-static)", "openvino-int8": " (export with --int8-static)",
                 "cpu-opt": " (export with --optimize cpu)"}


def engine_variant(variant: str | None) -> str:
    """The variant key of the TensorRT engine built from ``variant``'s graph (``None``/``fp32`` → ``trt``)."""
    v = variant or DEFAULT_VARIANT
    if v in ORT_CPU_ONLY or v in OPENVINO_ONLY:
        raise BundleError(f"variant {v!r} is a{'n ONNX Runtime' if v in ORT_CPU_ONLY else 'n OpenVINO'} CPU model; "
                          "TensorRT engines come from fp32 or fp16")
    return ENGINE_PREFIX if v == DEFAULT_VARIANT else f"{ENGINE_PREFIX}-{v}"


def _is_engine(key: str) -> bool:
    return key == ENGINE_PREFIX or key.startswith(ENGINE_PREFIX + "-")


def available_variants(entry: GraphEntry) -> list[str]:
    """Every ONNX variant name ``entry`` can run as, the default first (engines and OpenVINO IRs are chosen by backend
    instead)."""
    return [DEFAULT_VARIANT, *(k for k in entry.variants if not _is_engine(k) and k not in OPENVINO_ONLY)]


def variant_file(entry: GraphEntry, variant: str | None = None, backend: str = "onnxruntime") -> str:
    """The bundle-relative file that runs ``entry`` as ``variant`` on ``backend``.

    ``variant`` ``None``/``"fp32"`` is the portable graph. For ``backend="tensorrt"`` the engine built from that
    variant is returned; for ``backend="openvino"`` the portable graph or an OpenVINO-only file (``openvino-int8``).
    Unknown or missing variants raise :class:`BundleError` listing the available ones."""
    if backend == "openvino" and variant not in (None, "", DEFAULT_VARIANT):
        if variant not in OPENVINO_ONLY:
            raise BundleError(f"variant {variant!r} is not an OpenVINO model; OpenVINO runs the portable graph or "
                              f"{', '.join(sorted(OPENVINO_ONLY))}")
        if variant not in entry.variants:
            raise BundleError(f"graph {entry.spec.name!r} has no OpenVINO int8 model{_EXPORT_HINTS[variant]}"
                              + ("; the 'int8' graphs the bundle has are ONNX Runtime graphs: use "
                                 "backend='onnxruntime'" if "int8" in entry.variants else ""))
        return entry.variants[variant]
    if backend == "tensorrt":
        key = engine_variant(variant)
        if key not in entry.variants:
            engines = [k for k in entry.variants if _is_engine(k)]
            raise BundleError(
                f"graph {entry.spec.name!r} has no TensorRT engine for variant {variant or DEFAULT_VARIANT!r} "
                f"(engines: {', '.join(engines) or 'none'}); build one on this device with "
                f"`fine-infer build-engine BUNDLE{' --fp16' if key.endswith('fp16') else ''}`"
            )
        return entry.variants[key]
    if variant in (None, "", DEFAULT_VARIANT):
        return entry.file
    if _is_engine(variant):
        raise BundleError(f"{variant!r} is a TensorRT engine: load the bundle with backend='tensorrt' "
                          f"(and variant {'fp16' if variant.endswith('fp16') else 'fp32'!r})")
    if variant in OPENVINO_ONLY:
        raise BundleError(f"{variant!r} is an OpenVINO IR: load the bundle with backend='openvino', variant='int8'")
    if variant not in entry.variants:
        hint = _EXPORT_HINTS.get(variant, "")
        raise BundleError(
            f"graph {entry.spec.name!r} has no variant {variant!r}{hint}; "
            f"available: {', '.join(available_variants(entry))}"
        )
    return entry.variants[variant]


def resolve_variant(bundle: Bundle, entry: GraphEntry | str, variant: str | None = None,
                    backend: str = "onnxruntime") -> Path:
    """Absolute path of the file that runs graph ``entry`` (an entry or a graph name) as ``variant``."""
    if isinstance(entry, str):
        entry = bundle.graph(entry)
    name = variant_file(entry, variant, backend)
    if backend == "openvino" and variant in OPENVINO_ONLY:
        bundle.file(ir_weights(name))  # the IR's weights: listed (so hashed and verified) and inside the bundle
    return bundle.file(name)


def ir_weights(xml: str) -> str:
    """The weights file of an OpenVINO IR (``image.openvino-int8.xml`` → ``image.openvino-int8.bin``)."""
    if not xml.endswith(".xml"):
        raise BundleError(f"{xml!r} is not an OpenVINO IR (.xml)")
    return xml[:-4] + ".bin"


def ort_session_kwargs(variant: str | None) -> dict[str, Any]:
    """Extra ``onnxruntime.InferenceSession`` keyword arguments a variant needs.

    fp16 graphs: ONNX Runtime 1.32's NCHWc layout transformer (ORT_ENABLE_ALL on CPU) crashes the process
    (SIGSEGV at session creation) on some fp16 graphs, e.g. maaf's compose graph; disabling that one
    optimizer avoids it and costs nothing for fp16 (NCHWc kernels are fp32-only)."""
    if variant == "fp16":
        return {"disabled_optimizers": ["NchwcTransformer"]}
    return {}
