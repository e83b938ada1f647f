"""Calibrated static int8 (``export --int8-static``): real inputs in, two CPU int8 models out, gated on held-out ones.

- :class:`CalibrationData`: raw images and texts (the generated catalogue for zoo models, chosen by the CLI; a folder
  of images or a ``.txt``/``.jsonl`` file for any bundle, ``--calibration DATA``). They go through the bundle's own
  preprocessing and tokenisation (:mod:`fine_infer.preprocess`, :mod:`fine_infer.tokenization`), so the ranges are
  calibrated on what the runtime feeds. The first ``size`` items calibrate, the next ``held_out`` gate: the gate never
  sees a calibration input.
- :func:`quantize_static_ort`: ONNX Runtime static QDQ (``quantize_static``, per-channel int8 weights, uint8
  activations, MinMax ranges), ``int8-static``.
- :func:`quantize_openvino`: an OpenVINO int8 IR from NNCF post-training quantisation (``nncf.quantize``; transformer
  preset for graphs with attention, SmoothQuant tried on and off and the better kept; min/max activation ranges, no
  bias correction, the graph converted with ``ov.convert_model``), ``openvino-int8``.

Neither ONNX Runtime's quantiser nor ``openvino``/``nncf`` is imported before a quantisation is asked for; a missing
``nncf``/``openvino`` is one line naming the extra.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fine_infer.errors import ConfigError, ExportError, first_line
from fine_infer.specs import GraphSpec, ImagePreprocess, TextPreprocess

DEFAULT_SIZE = 64  # calibration samples (NNCF's subset_size; the measurement used 64)
DEFAULT_HELD_OUT = 16  # held-out samples the gate compares on (batches 1, 3, 8 and the rest)
# Ops ONNX Runtime quantises statically. Conv is in: with calibrated activation ranges CNNs gain (the dynamic int8
# graph leaves Conv in float, see _int8.DEFAULT_INT8_OPS).
STATIC_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
SMOOTH_QUANT = ("auto", "on", "off")
OPENVINO_EXTRA = "pip install 'fine-infer[openvino]' (openvino and nncf)"


@dataclass(frozen=True)
class CalibrationData:
    """Raw calibration inputs: ``images`` (anything :func:`fine_infer.preprocess.preprocess_images` takes) and
    ``texts`` (strings); compose graphs pair them in order. ``source`` says where they came from (recorded);
    ``size``/``held_out`` split them (the first ``size`` calibrate, the next ``held_out`` gate); ``subset_size``
    caps what NNCF uses (default ``size``); ``smooth_quant``: ``auto`` (try on and off, keep the one closer to fp32 on
    the calibration inputs), ``on`` or ``off``."""

    images: Sequence[Any] = ()
    texts: Sequence[str] = ()
    source: str = ""
    size: int = DEFAULT_SIZE
    held_out: int = DEFAULT_HELD_OUT
    subset_size: int | None = None
    smooth_quant: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.size < 1 or self.held_out < 1:
            raise ConfigError(f"calibration needs at least one calibration and one held-out sample "
                              f"(size {self.size}, held_out {self.held_out})")
        if self.smooth_quant not in SMOOTH_QUANT:
            raise ConfigError(f"smooth_quant is one of {', '.join(SMOOTH_QUANT)}, not {self.smooth_quant!r}")
        if not self.images and not self.texts:
            raise ConfigError(f"the calibration data {self.source or ''} holds no images and no texts")


@dataclass(frozen=True)
class GraphCalibration:
    """One graph's real inputs: ``calibrate`` (one sample per dict, batch 1) and ``held_out`` (batches of 1, 3, 8...),
    or why the graph has none (``random``: its inputs are not images/texts the data holds)."""

    calibrate: list[dict[str, np.ndarray]]
    held_out: list[dict[str, np.ndarray]]
    what: str
    random: str = ""


def _held_batches(n: int) -> list[int]:
    out, left = [], n
    for b in (1, 3, 8):
        if left >= b:
            out.append(b)
            left -= b
    if left:
        out.append(left)
    return out


def graph_calibration(spec: GraphSpec, data: CalibrationData, image: ImagePreprocess | None,
                      text: TextPreprocess | None, tokenizer: Any) -> GraphCalibration:
    """Preprocess ``data`` for graph ``spec`` as the runtime would (by input name: ``pixels`` from images,
    ``input_ids``/``attention_mask`` from texts, both for compose); a graph with other inputs, or data without what it
    takes, gets ``random`` set to why (its variants then calibrate and gate on the export's random sampler)."""
    from fine_infer.preprocess import preprocess_images
    from fine_infer.tokenization import encode

    names = {t.name for t in spec.inputs}
    wants_image = "pixels" in names
    wants_text = bool(names & {"input_ids", "attention_mask"})
    other = names - {"pixels", "input_ids", "attention_mask"}
    if other or not (wants_image or wants_text):
        return GraphCalibration([], [], "", f"inputs {sorted(names)} are not pixels/input_ids/attention_mask")
    if wants_image and (not data.images or image is None):
        return GraphCalibration([], [], "", "the calibration data holds no images" if not data.images
                                else "the bundle has no image preprocessing")
    if wants_text and (not data.texts or text is None or tokenizer is None):
        return GraphCalibration([], [], "", "the calibration data holds no texts" if not data.texts
                                else "the bundle has no tokenizer")
    have = min(len(data.images) if wants_image else 1 << 30, len(data.texts) if wants_text else 1 << 30)
    need = data.size + data.held_out
    if have < 2:
        return GraphCalibration([], [], "", f"the calibration data holds {have} usable item(s); need at least 2")
    n_cal = min(data.size, max(1, have - data.held_out)) if have < need else data.size
    n_held = min(data.held_out, have - n_cal)

    def feeds(lo: int, hi: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if wants_image:
            out["pixels"] = preprocess_images(list(data.images[lo:hi]), image)
        if wants_text:
            ids, mask = encode(tokenizer, list(data.texts[lo:hi]), text, truncate=True)
            out["input_ids"], out["attention_mask"] = ids, mask
        return {k: v for k, v in out.items() if k in names}

    try:
        cal = [feeds(i, i + 1) for i in range(n_cal)]
        held, at = [], n_cal
        for b in _held_batches(n_held):
            held.append(feeds(at, at + b))
            at += b
    except Exception as exc:  # noqa: BLE001 - a bad image or text: one line naming the data
        raise ExportError(f"calibration data {data.source or ''}: {str(exc).splitlines()[0] if str(exc) else exc}") \
            from exc
    what = " + ".join(w for w, on in (("images", wants_image), ("texts", wants_text)) if on)
    return GraphCalibration(cal, held, f"{n_cal} {what} calibrate, {n_held} held out ({data.source})")


def quantize_static_ort(src: str | Path, dst: str | Path, samples: Sequence[dict[str, np.ndarray]],
                        op_types: Sequence[str] = STATIC_OPS) -> dict[str, Any]:
    """ONNX Runtime static QDQ int8 of ``src`` at ``dst``, calibrated (MinMax) on ``samples``: per-channel int8
    weights in 7 bits (``reduce_range``: u8×s8 pairs saturate in 16 bits on x86 CPUs without VNNI, see
    :func:`fine_infer.export._int8.quantize_int8`), uint8 activations. Returns the QDQ node counts."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from fine_infer.export._int8 import CPU_ONLY_TARGET, mark_targets

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(samples)

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(samples)

    with tempfile.TemporaryDirectory(prefix="fine-infer-int8s-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantiser's per-weight notes on the root logger
        try:
            quant_pre_process(os.fspath(src), os.fspath(pre), skip_symbolic_shape=True)
            quantize_static(os.fspath(pre), os.fspath(dst), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=list(op_types),
                            calibrate_method=CalibrationMethod.MinMax)
        except Exception as exc:  # noqa: BLE001 - the quantiser raises many types; one line for the user
            raise ExportError(f"static int8 quantisation of {Path(src).name} failed: {first_line(exc)}") from exc
        finally:
            root.setLevel(level)
    mark_targets(dst, "int8-static", CPU_ONLY_TARGET)
    counts: dict[str, int] = {}
    for n in onnx.load(os.fspath(dst)).graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return {"qdq_nodes": counts, "ops": list(op_types), "ranges": "MinMax"}


def require_nncf():
    """``(openvino, nncf)``, or one line naming the extra."""
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise ExportError(f"--int8-static writes an OpenVINO int8 model with NNCF, which is not installed "
                          f"({exc.name}): {OPENVINO_EXTRA}") from None
    return ov, nncf


def openvino_runner(path: str | Path) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """OpenVINO on the CPU (float ops at f32) on one model file: named inputs → outputs by name."""
    ov, _ = require_nncf()
    import openvino.properties.hint as hints

    compiled = ov.Core().compile_model(os.fspath(path), "CPU", {hints.inference_precision: ov.Type.f32})
    names = {n for port in compiled.inputs for n in port.get_names()}
    outs = [(next(iter(p.get_names())), p) for p in compiled.outputs]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = compiled({k: v for k, v in feeds.items() if k in names})
        return {name: np.asarray(res[port]) for name, port in outs}

    return run


def _has_attention(src: str | Path) -> bool:
    import onnx

    model = onnx.load(os.fspath(src), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    for f in model.functions:
        ops |= {n.op_type for n in f.node}
    return bool(ops & {"Softmax", "Attention", "MultiHeadAttention"})


def quantize_openvino(src: str | Path, dst_xml: str | Path, samples: Sequence[dict[str, np.ndarray]], *,
                      subset_size: int | None = None, smooth_quant: str = "auto",
                      score: Callable[[Callable], float] | None = None) -> dict[str, Any]:
    """An int8 OpenVINO IR of ONNX graph ``src`` from NNCF post-training quantisation calibrated on ``samples``, saved
    as ``dst_xml`` and its ``.bin`` (weights not compressed to fp16). Graphs with attention get NNCF's transformer
    preset; with ``smooth_quant="auto"`` (transformer graphs) it is quantised with SmoothQuant on and off and the one
    ``score(run)`` rates higher (min cosine against fp32 on the calibration inputs) is kept. Returns what was done.

    Three choices, measured on the tiny zoo archs with their shipped weights (min cosine against fp32 on 48 held-out
    catalogue items, AVX2-only AMD EPYC, OpenVINO 2026.4.1, NNCF 3.4.0), each needed for the ResNet towers:

    - the graph is converted with ``ov.convert_model`` (OpenVINO's own conversion: its shape sub-graphs simplified,
      conv biases folded), not read with ``Core.read_model``: the int8 IR of a graph as read ran wrongly on the CPU
      plugin with a dynamic batch (maaf gallery -0.63, and ONNX Runtime's own QDQ graph of it -0.65 there against
      0.997 on ONNX Runtime; right with a static batch);
    - activation ranges are the global min/max over the calibration samples (``RangeEstimatorParametersSet.MINMAX``),
      not NNCF's default mean over samples of each sample's min/max, which clips the inputs whose ranges are wider
      than average (batch-1 samples): triplet image 0.75 with the mean, 0.996 with min/max;
    - no bias correction: with the biases visible after ``convert_model``, NNCF's fast bias correction lowered triplet
      image from 0.996 to 0.981 and attributes from 0.999 to 0.967 (the graph as read hid conv biases from it)."""
    ov, nncf = require_nncf()
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    transformer = _has_attention(src)
    try:
        model = ov.convert_model(os.fspath(src))
    except Exception as exc:  # noqa: BLE001 - the ONNX frontend raises many types; one line for the user
        raise ExportError(f"OpenVINO cannot convert {Path(src).name}: {first_line(exc)}") from exc
    subset = min(len(samples), subset_size or len(samples))
    tries = ([smooth_quant] if smooth_quant != "auto" else ["on", "off"]) if transformer else ["n/a"]
    if score is None:
        tries = tries[:1]
    dst_xml = Path(dst_xml)
    best: tuple[float, str, Path] | None = None
    figures: dict[str, float] = {}
    logging.getLogger("nncf").setLevel(logging.ERROR)
    for sq in tries:
        # OverflowFix.ENABLE: 7-bit weights in every layer. u8×s8 pairs saturate in 16 bits on x86 CPUs without VNNI
        # (AVX2 only): the tiny fashion-fine image tower measured min cosine 0.970 with NNCF's default (first layer
        # only) and 0.996 with it on such a CPU; a bundle runs on CPUs other than the one that exported it.
        advanced: dict[str, Any] = {"overflow_fix": nncf.OverflowFix.ENABLE,
                                    "activations_range_estimator_params": RangeEstimatorParametersSet.MINMAX,
                                    "disable_bias_correction": True}
        kw: dict[str, Any] = {}
        if transformer:
            kw["model_type"] = nncf.ModelType.TRANSFORMER
            if sq == "off":
                advanced["smooth_quant_alphas"] = nncf.AdvancedSmoothQuantParameters(matmul=-1)
        kw["advanced_parameters"] = nncf.AdvancedQuantizationParameters(**advanced)
        out = dst_xml if len(tries) == 1 else dst_xml.with_name(f"{dst_xml.stem}.sq-{sq}.xml")
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # NNCF's progress bars
                q = nncf.quantize(model.clone(), nncf.Dataset(list(samples)), subset_size=subset, **kw)
            ov.save_model(q, os.fspath(out), compress_to_fp16=False)
        except Exception as exc:  # noqa: BLE001 - NNCF/OpenVINO raise many types; one line for the user
            raise ExportError(f"NNCF int8 quantisation of {Path(src).name} failed: {first_line(exc)}") from exc
        if len(tries) == 1:
            best = (0.0, sq, out)
            break
        s = score(openvino_runner(out))
        figures[sq] = round(s, 6)
        if best is None or s > best[0]:
            if best is not None:
                best[2].unlink(missing_ok=True)
                best[2].with_suffix(".bin").unlink(missing_ok=True)
            best = (s, sq, out)
        else:
            out.unlink(missing_ok=True)
            out.with_suffix(".bin").unlink(missing_ok=True)
    assert best is not None
    if best[2] != dst_xml:
        os.replace(best[2], dst_xml)
        os.replace(best[2].with_suffix(".bin"), dst_xml.with_suffix(".bin"))
    return {"preset": "transformer" if transformer else "default", "smooth_quant": best[1], "overflow_fix": "enable",
            "activation_ranges": "minmax", "bias_correction": "off", "conversion": "convert_model",
            **({"smooth_quant_min_cosine_on_calibration": figures} if figures else {}),
            "subset_size": subset, "nncf": getattr(nncf, "__version__", "?"), "openvino": ov.get_version()}
