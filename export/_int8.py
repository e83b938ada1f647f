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
from typing import Any, Sequence

from fine_infer.compare import cosine_rows
from fine_infer.errors import ExportError, first_line

CPU_ONLY_TARGET = "onnxruntime-cpu"
# Ops quantised by default. Conv is left in float: its dynamic form (ConvInteger) runs but is slower than the fp32
# Conv on ONNX Runtime's CPU provider (measured 0.8 → 3.7 ms on the tiny raf gallery graph, batch 8); CNNs gain
# from static (calibrated) quantisation instead, which needs data and is not done here. Gather (embedding tables) is
# left in float too: quantising a table only shrinks the file (the lookup is not faster), and one per-tensor 7-bit
# scale over a whole vocabulary cost the real all-MiniLM-L6-v2 0.0012 of min cosine on its own. MatMuls quantised
# are those whose B input is a constant (weights), never activation×activation ones (Q·Kᵀ, attention·V).
DEFAULT_INT8_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Attention", "LSTM", "EmbedLayerNormalization")
# The automatic fallback (see quantize_int8): the min cosine against the fp32 graph that the int8 graph must reach on
# the probe inputs, above the gate's 0.99 because random-token probes are milder than real text (all-MiniLM-L6-v2
# with every weight MatMul quantised: 0.985 on the probe, 0.977 on the gate's real sentences).
PROBE_MIN_COSINE = 0.998


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


def _weight_matmuls(model) -> list[tuple[str, Any]]:
    """(name, weight as [in, out]) of every MatMul/Gemm whose B input is a 2-D constant initializer."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
            continue
        trans_b = any(a.name == "transB" and a.i for a in n.attribute) if n.op_type == "Gemm" else False
        out.append((n.name, (w.T if trans_b else w).astype(np.float32)))
    return out


def _probe_feeds(model, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """Data-free inputs for the graph: token ids drawn over the table they index (ids feeding a constant Gather),
    ones for other integer inputs (masks, all tokens real), standard normal for float inputs (normalised pixels);
    free dims are ``batch`` (the first) and ``seq``."""
    import numpy as np
    import onnx

    rng = np.random.default_rng(seed)
    inits = {i.name: i for i in model.graph.initializer}
    rows = {n.input[1]: inits[n.input[0]].dims[0] for n in model.graph.node
            if n.op_type == "Gather" and len(n.input) > 1 and n.input[0] in inits}
    feeds = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if k == 0 else seq)
                 for k, d in enumerate(t.shape.dim)]
        if t.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            dtype = np.int64 if t.elem_type == onnx.TensorProto.INT64 else np.int32
            feeds[i.name] = (rng.integers(0, rows[i.name], shape) if i.name in rows else np.ones(shape)).astype(dtype)
        else:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


class _Probe:
    """The fp32 graph run on data-free probe inputs (:func:`_probe_feeds`; the longest sequence of 128, 64 ... 8 the
    graph accepts, at batches 2 and 1): its outputs, the inputs of its weight MatMuls, and the min cosine per row of
    any other graph's outputs against them."""

    def __init__(self, path: Path) -> None:
        import onnx
        import onnxruntime as ort

        model = onnx.load(os.fspath(path))
        self.weights = _weight_matmuls(model)
        acts = {n.name: n.input[0] for n in model.graph.node}
        self.act_of = {name: acts[name] for name, _ in self.weights}
        names = [o.name for o in model.graph.output]
        inputs = {i.name for i in model.graph.input}
        taps = list(dict.fromkeys(v for v in self.act_of.values() if v not in names and v not in inputs))
        tapped = onnx.ModelProto()
        tapped.CopyFrom(model)
        typed = {vi.name: vi for vi in model.graph.value_info}
        tapped.graph.output.extend(typed.get(v) or onnx.ValueInfoProto(name=v) for v in taps)
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # lengths the graph cannot take are tried on purpose: no error lines on stderr
        sess = ort.InferenceSession(tapped.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        self.feeds: list[dict] = []
        self.refs: list[list] = []
        self.acts: dict[str, list] = {v: [] for v in taps + names + sorted(set(self.act_of.values()) & inputs)}
        for seq in (128, 64, 32, 16, 8):
            try:
                for batch, seed in ((2, 0), (1, 1)):
                    f = _probe_feeds(model, batch, seq, seed)
                    got = dict(zip(names + taps, sess.run(names + taps, f)))
                    self.feeds.append(f)
                    self.refs.append([got[n] for n in names])
                    for v in self.acts:
                        self.acts[v].append(got[v] if v in got else f[v])
                break
            except Exception:  # noqa: BLE001 - too long for the graph (position table): try shorter
                self.feeds, self.refs = [], []
                self.acts = {v: [] for v in self.acts}
        if not self.feeds:
            raise ValueError("the graph runs on none of the probe inputs")

    def local_errors(self, reduce_range: bool) -> dict[str, float]:
        """Per weight MatMul: the relative error of its output when its input is quantised as ONNX Runtime's dynamic
        quantisation does (uint8, one asymmetric range per tensor) and its weight per output channel (int8, 7 bits
        with ``reduce_range``), everything else in fp32. Ranks which nodes to keep in float first."""
        import numpy as np

        qmax = 63 if reduce_range else 127
        out = {}
        for name, w in self.weights:
            sw = np.maximum(np.abs(w).max(axis=0), 1e-12) / qmax
            wq = np.clip(np.round(w / sw), -qmax, qmax) * sw
            num = den = 0.0
            for x in self.acts[self.act_of[name]]:
                x = x.reshape(-1, x.shape[-1]).astype(np.float32)
                lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
                sx = max(hi - lo, 1e-12) / 255
                zp = np.round(-lo / sx)
                xq = (np.clip(np.round(x / sx) + zp, 0, 255) - zp) * sx
                y = x @ w
                num += float(np.square(xq @ wq - y).sum())
                den += float(np.square(y).sum())
            out[name] = (num / den) ** 0.5 if den > 0 else 0.0
        return out

    def min_cosine(self, path: Path) -> float:
        import numpy as np
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
        worst = 1.0
        for f, refs in zip(self.feeds, self.refs):
            for r, g in zip(refs, sess.run(None, f)):
                r = np.asarray(r, np.float64).reshape(len(r), -1)
                g = np.asarray(g, np.float64).reshape(len(g), -1)
                if not np.isfinite(g).all():
                    return 0.0
                both_zero = (np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)) == 0
                cos = np.where(both_zero, 1.0, cosine_rows(r, g))
                worst = min(worst, float(cos.min()))
        return worst


def _ort_why(exc: BaseException) -> str:
    """An ONNX Runtime error's first line, its end kept (the cause follows a long "[ONNXRuntimeError] ..." prefix)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][-200:]


def _load_error(path: Path) -> str:
    """Why ONNX Runtime's CPU provider cannot load ``path``, or ""."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types for a bad model
        return _ort_why(exc)
    return ""


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    *,
    op_types: Sequence[str] | None = None,
    per_channel: bool = True,
    reduce_range: bool = True,
    fallback: bool = True,
    min_cosine: float = PROBE_MIN_COSINE,
    report: dict | None = None,
) -> dict[str, int]:
    """Write an int8 dynamically quantised copy of ``src`` to ``dst``; returns op counts of the result.

    What is quantised: MatMul/Gemm whose B input is a constant (weights), int8 per output channel (``per_channel``);
    activations are quantised per batch at run time (uint8, one range per tensor: ONNX Runtime's dynamic
    quantisation). Activation×activation MatMuls and embedding tables stay in float (:data:`DEFAULT_INT8_OPS`).

    ``reduce_range`` quantises weights to 7 bits. ONNX Runtime's u8s8 kernels on x86 CPUs without VNNI (AVX2-only,
    e.g. AMD Zen 3) add pairs of u8×s8 products in 16 bits, which saturates with full-range weights: on such a CPU the
    tiny fashion-fine image graph measured min cosine 0.957-0.995 against fp32 with 8-bit weights and 0.9994-0.9996
    with 7-bit ones (4 random models, batch 8). A bundle runs on CPUs other than the one that exported it, so the
    7-bit weights are the default everywhere.

    ``fallback``: the int8 graph is compared with the fp32 graph on data-free probe inputs (random token ids over the
    embedding table, all-ones masks, normal pixels); while its min cosine is under ``min_cosine``, the weight MatMuls
    whose output a per-tensor activation range hurts most (largest relative output error when quantised alone,
    measured on the probe's own activations) are kept in float, doubling their number, then bisecting to the fewest
    that reach ``min_cosine``. Why: one activation range per tensor cannot cover transformer outlier activations
    (BERT's FFN output projections, some FFN inputs and Q/K/V): the real all-MiniLM-L6-v2 reached min cosine 0.977 on
    the gate's sentences with every weight MatMul quantised per channel (0.71 per tensor), 0.994 with the 10 most
    sensitive of its 36 kept in float. A graph the probe cannot run is quantised without the fallback; the gate
    decides either way. A per-channel graph ONNX Runtime cannot load (1.32 writes some) is redone with one weight
    scale per tensor (also one that fails to run on the probe). ``report`` (a dict) receives what was kept in float
    and the probe figures.

    The graph first goes through ``quant_pre_process`` (ONNX Runtime's basic optimisations and shape inference;
    symbolic shape inference is skipped: it fails on dynamo graphs)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    info = report if report is not None else {}
    ops = list(op_types or DEFAULT_INT8_OPS)
    with tempfile.TemporaryDirectory(prefix="fine-infer-int8-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        trial = Path(tmp) / "trial.onnx"

        channels = [per_channel]

        def quantize(keep: Sequence[str], out: Path) -> None:
            quantize_dynamic(pre, os.fspath(out), weight_type=QuantType.QInt8, per_channel=channels[0],
                             reduce_range=reduce_range, op_types_to_quantize=ops, nodes_to_exclude=list(keep),
                             extra_options={"MatMulConstBOnly": True})

        try:
            quant_pre_process(os.fspath(src), os.fspath(pre), skip_symbolic_shape=True)
        except Exception as exc:  # noqa: BLE001 - the quantiser raises many types; one line for the user
            raise ExportError(f"int8 quantisation of {Path(src).name} failed: {first_line(exc)}") from exc
        probe: _Probe | None = None
        try:
            probe = _Probe(pre)
        except Exception as exc:  # noqa: BLE001 - a graph the probe cannot feed: no fallback, the gate decides
            info["probe"] = f"not run: {first_line(exc, 200)}"

        def check(path: Path) -> tuple[str, float | None]:
            """Why ``path`` does not load (or, with the probe, run) on ONNX Runtime's CPU provider ("" when it does),
            and its probe min cosine (None without the probe)."""
            if probe is None:
                return _load_error(path), None
            try:
                return "", probe.min_cosine(path)
            except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types for a bad model
                return _ort_why(exc), None

        try:
            quantize([], trial)
            why, cos = check(trial)
            if per_channel and why:
                # ONNX Runtime 1.32 writes some per-channel dynamic graphs it cannot load or run itself (fashion-fine's
                # tiny graphs: "node_matmul_quant_output_scale_mul ... Incompatible dimensions", DynamicQuantizeMatMul
                # failing at batch 1): one scale per tensor then
                channels[0] = False
                info["per_channel"] = f"off: the per-channel graph does not load or run ({why})"
                quantize([], trial)
                why, cos = check(trial)
        except Exception as exc:  # noqa: BLE001 - the quantiser raises many types; one line for the user
            raise ExportError(f"int8 quantisation of {Path(src).name} failed: {first_line(exc)}") from exc

        def _fallback(probe: _Probe, trial: Path, tmp: str, cos: float) -> list[str]:
            keep: list[str] = []
            info["probe_min_cosine_all"] = round(cos, 6)
            if cos < min_cosine:
                errors = probe.local_errors(reduce_range)
                order = sorted(errors, key=lambda n: -errors[n])
                tried: dict[int, float] = {0: cos}

                def attempt(k: int) -> float:
                    quantize(order[:k], trial)
                    tried[k] = probe.min_cosine(trial)
                    if tried[k] >= min_cosine:  # keep the graph of every pass: the last one is the fewest
                        os.replace(trial, Path(tmp) / f"keep-{k}.onnx")
                    return tried[k]

                lo, hi = 0, 1  # lo fails, hi: next to try
                while hi < len(order) and attempt(hi) < min_cosine:
                    lo, hi = hi, min(2 * hi, len(order))
                if hi not in tried:
                    attempt(hi)
                while hi - lo > 1 and tried[hi] >= min_cosine:  # the fewest kept in float that pass
                    mid = (lo + hi) // 2
                    if attempt(mid) >= min_cosine:
                        hi = mid
                    else:
                        lo = mid
                keep = order[:hi]
                info["probe_min_cosine"] = round(tried[hi], 6)
                info["kept_float"] = keep
                info["weight_matmuls"] = len(order)
                if tried[hi] < min_cosine:
                    info["probe"] = "no choice of nodes in float reached the probe's cosine"
            return keep

        keep: list[str] = []
        if fallback and not why:
            try:
                keep = _fallback(probe, trial, tmp, cos) if probe is not None and cos is not None else []
            except Exception as exc:  # noqa: BLE001 - a fallback that cannot run leaves the graph to the gate
                info["probe"] = f"fallback not run: {first_line(exc, 200)}"
                keep = []
                quantize([], trial)
            if keep and (Path(tmp) / f"keep-{len(keep)}.onnx").exists():
                os.replace(Path(tmp) / f"keep-{len(keep)}.onnx", trial)
            elif keep:
                quantize(keep, trial)
        os.replace(trial, dst)
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
        raise ExportError(f"ONNX Runtime CPU optimisation of {Path(src).name} failed: {first_line(exc)}") from exc
    mark_targets(dst, "cpu-opt", CPU_ONLY_TARGET)
    return {k: int(v) for k, v in fusions.items() if v}
