"""CPU deployment graphs: int8 dynamic quantisation and ONNX Runtime transformer fusions.

Both are ONNX Runtime CPU artefacts, written beside the portable fp32 graph and never in its place:

- ``int8``: :func:`onnxruntime.quantization.quantize_dynamic` with int8 weights (activations are quantised per batch
  at run time). It writes ``DynamicQuantizeLinear``/``MatMulInteger``/``ConvInteger``-style nodes, which the
  TensorRT ONNX parser does not take (TensorRT wants explicit Q/DQ quantisation), so the graph is marked
  not-for-TensorRT. It is the larger CPU lever (FACTS: ~2× on a small BERT, ~1.4× on a small ViT).
- ``cpu-opt``: :func:`onnxscript.rewriter.ort_fusions.optimize_for_ort`, which fuses attention, LayerNorm, GELU,
  etc. into ``com.microsoft`` contrib ops in dynamo-exported graphs (``onnxruntime.transformers.optimizer`` does not
  match dynamo graphs). Contrib ops exist only in ONNX Runtime, so this graph is marked not-for-TensorRT too.

The mark is written into the ONNX file's ``metadata_props`` (``fine_infer.targets = onnxruntime-cpu``), so the
TensorRT lint and engine builder refuse these files whatever their name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Sequence

from fine_infer.errors import ExportError

CPU_ONLY_TARGET = "onnxruntime-cpu"
# Ops quantised by default. Conv is left in float: its dynamic form (ConvInteger) runs but is slower than the fp32
# Conv on ONNX Runtime's CPU provider (measured 0.8 → 3.7 ms on the tiny raf gallery graph, batch 8); CNNs gain
# from static (calibrated) quantisation instead, which needs data and is not done here.
DEFAULT_INT8_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Attention", "LSTM", "Gather", "EmbedLayerNormalization")


def mark_targets(path: str | Path, variant: str, targets: str) -> None:
    """Record in the ONNX file which variant it is and which runtimes may load it."""
    import onnx

    model = onnx.load(os.fspath(path))
    meta = {p.key: p for p in model.metadata_props}
    for key, value in (("fine_infer.variant", variant), ("fine_infer.targets", targets)):
        if key in meta:
            meta[key].value = value
        else:
            model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(model, os.fspath(path))


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    *,
    op_types: Sequence[str] | None = None,
    per_channel: bool = False,
    reduce_range: bool = True,
) -> dict[str, int]:
    """Write an int8 dynamically quantised copy of ``src`` to ``dst``; returns op counts of the result.

    ``reduce_range`` quantises weights to 7 bits. ONNX Runtime's u8s8 kernels on x86 CPUs without VNNI (AVX2-only,
    e.g. AMD Zen 3) add pairs of u8×s8 products in 16 bits, which saturates with full-range weights: on such a CPU the
    tiny fashion-fine image graph measured min cosine 0.957-0.995 against fp32 with 8-bit weights and 0.9994-0.9996
    with 7-bit ones (4 random models, batch 8). A bundle runs on CPUs other than the one that exported it, so the
    7-bit weights are the default everywhere.

    The graph first goes through ``quant_pre_process`` (ONNX Runtime's basic optimisations and shape inference;
    symbolic shape inference is skipped: it fails on dynamo graphs)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="fine-infer-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        try:
            quant_pre_process(os.fspath(src), os.fspath(pre), skip_symbolic_shape=True)
            quantize_dynamic(
                pre, os.fspath(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                reduce_range=reduce_range,
                op_types_to_quantize=list(op_types or DEFAULT_INT8_OPS),
            )
        except Exception as exc:  # noqa: BLE001 - the quantiser raises many types; one line for the user
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"int8 quantisation of {Path(src).name} failed: {first}") from exc
    mark_targets(dst, "int8", CPU_ONLY_TARGET)
    counts: dict[str, int] = {}
    for n in onnx.load(os.fspath(dst)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


@contextlib.contextmanager
def _without_extract_dim():
    """Run onnxscript's ORT fusions without its ``ExtractDim`` shape rewrite.

    onnxscript 0.7.2's ``ort_fusions.shape_optimization.ExtractDim`` replaces ``Slice(Shape(Transpose(Reshape(x,
    Concat(d0..d3)))))`` by the matching ``d_i``, which is wrong when ``d_i`` is ``-1`` (an inferred dimension):
    fashion-fine's text graph then gets a Reshape to ``[-1, s, -1]`` and fails at run time. The rule only helps causal
    mask patterns (decoders), so it is switched off for the duration of the call."""
    try:
        from onnxscript.rewriter.ort_fusions import shape_optimization
    except ImportError:  # a future onnxscript without the module: nothing to switch off
        yield
        return

    class _NoRules:
        def apply_to_model(self, model, *args, **kwargs):  # the one method _pre_optimize calls
            return 0

    saved = shape_optimization.rules
    shape_optimization.rules = _NoRules()
    try:
        yield
    finally:
        shape_optimization.rules = saved


def optimize_cpu(src: str | Path, dst: str | Path) -> dict[str, int]:
    """Write ``src`` with ONNX Runtime's transformer fusions applied to ``dst``; returns the fusions applied."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    try:
        model = ir.load(os.fspath(src))
        with _without_extract_dim():
            model, fusions = optimize_for_ort(model)
        ir.save(model, os.fspath(dst))
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"ONNX Runtime CPU optimisation of {Path(src).name} failed: {first}") from exc
    mark_targets(dst, "cpu-opt", CPU_ONLY_TARGET)
    return {k: int(v) for k, v in fusions.items() if v}
