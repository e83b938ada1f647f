"""fp16 graphs from the fp32 ONNX, with the overflow traps kept in fp32.

TensorRT and the ONNX Runtime CUDA provider run an fp16 graph fastest, but a few computations overflow or lose
their meaning in fp16 (max 65504, ~3 significant digits): squares and sums of activations, variances, norms, the
exponentials inside softmax. So the conversion keeps in fp32:

- LayerNormalization (and the other normalisation ops), Softmax/LogSoftmax, every reduction (ReduceMean, ReduceSum,
  ReduceL2, ...), Pow, Sqrt, Reciprocal, Exp/Log, CumSum;
- the *statistics*: every value computed only from reductions and constants (mean, variance, ``sqrt(var + eps)``,
  the clamped L2 norm of ``F.normalize``) and the Div/Mul that applies them, so decomposed LayerNorms and the
  final L2 normalisation stay fp32 end to end;
- the squares that feed a reduction (``Mul(x, x)``, ``Pow(x, 2)``), which overflow first;
- anything the ONNX schema does not define for float16, anything in a custom domain or with a subgraph.

Everything else (MatMul, Gemm, Conv, LSTM, elementwise arithmetic, activations) runs in fp16. Cast nodes are
inserted where precisions meet, and the graph keeps fp32 inputs and outputs (``keep_io_types``) so the runtime
feeds and reads the same arrays as for the fp32 graph. Float constants are clamped to ±65504 on conversion so a
``finfo(float32).min`` attention-mask fill stays a large finite negative instead of becoming ``-inf``.

TensorRT 11 builds strongly typed networks only: this graph *is* how fp16 reaches TensorRT 11 (precision comes from
the ONNX types, not a builder flag). On TensorRT 10 it builds the same way with the STRONGLY_TYPED network flag.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fine_infer.errors import ExportError

FP16_MAX = 65504.0

# Ops computed in fp32 whatever their inputs are (the overflow / precision traps).
FP32_OPS = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "LpNormalization", "RMSNormalization",
    "MeanVarianceNormalization", "Softmax", "LogSoftmax", "Hardmax",
    "ReduceMean", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    "ReduceProd", "ReduceMax", "ReduceMin",
    "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "CumSum", "Range",
})
REDUCTIONS = frozenset(op for op in FP32_OPS if op.startswith("Reduce"))
# Ops through which a statistic (a value derived only from reductions and constants) stays a statistic.
STAT_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "Clip", "Max", "Min", "Abs", "Neg", "Expand",
    "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Cast",
})
# Ops that read only the shape of their input: no cast is ever needed in front of them.
SHAPE_ONLY = frozenset({"Shape", "Size"})
# Inputs that the ONNX spec types independently of the data (e.g. Resize's roi/scales are always float32).
FIXED_FP32_INPUTS = {"Resize": {1, 2}, "Upsample": {1}, "Dropout": {1}}

_F32 = 1   # onnx.TensorProto.FLOAT
_F16 = 10  # onnx.TensorProto.FLOAT16


@dataclass
class Fp16Report:
    """What the conversion did: how many nodes run in each precision, which ops stayed fp32, casts inserted."""

    fp16_nodes: int = 0
    fp32_nodes: int = 0
    fp32_ops: dict[str, int] = field(default_factory=dict)
    casts: int = 0
    clamped_constants: int = 0

    def to_dict(self) -> dict:
        return {"fp16_nodes": self.fp16_nodes, "fp32_nodes": self.fp32_nodes,
                "fp32_ops": dict(sorted(self.fp32_ops.items())), "casts": self.casts,
                "clamped_constants": self.clamped_constants}


def _to_fp16(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """fp32 → fp16 with finite values clamped to the fp16 range; returns the array and how many were clamped."""
    finite = np.isfinite(arr)
    over = finite & (np.abs(arr) > FP16_MAX)
    out = np.where(over, np.sign(arr) * FP16_MAX, arr).astype(np.float16)
    return out, int(over.sum())


def _schema_allows_fp16(node, opset: int) -> bool:
    """Whether the ONNX schema of ``node`` defines its data type parameter for float16."""
    import onnx

    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except Exception:  # noqa: BLE001 - unknown op: leave it alone
        return False
    for c in schema.type_constraints:
        if "tensor(float)" in c.allowed_type_strs:
            return "tensor(float16)" in c.allowed_type_strs
    return True


class _Graph:
    """Indexes of one ONNX graph: producers, consumers, constants, float-typed values."""

    def __init__(self, model) -> None:
        import onnx

        g = model.graph
        self.model = model
        self.graph = g
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 20)
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        types: dict[str, int] = {}
        for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
            if vi.type.HasField("tensor_type"):
                types[vi.name] = vi.type.tensor_type.elem_type
        for i in g.initializer:
            types[i.name] = i.data_type
        self.types = types

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == _F32

    def is_const(self, name: str) -> bool:
        return name in self.inits


def _constants_to_initializers(model) -> None:
    """Move Constant nodes holding a tensor into initializers, so all constants are converted the same way."""
    from onnx import numpy_helper

    g = model.graph
    keep = []
    for n in g.node:
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "Constant" and not n.domain and "value" in attrs and len(attrs) == 1:
            t = attrs["value"].t
            arr = numpy_helper.to_array(t)
            g.initializer.append(numpy_helper.from_array(arr, n.output[0]))
        else:
            keep.append(n)
    if len(keep) != len(g.node):
        del g.node[:]
        g.node.extend(keep)


def _decide(gr: _Graph) -> dict[int, str]:
    """Per node index: ``fp16`` or ``fp32`` (nodes with a float output), ``follow`` (float inputs only: computed in
    the precision of its first float input), ``any`` (reads only shapes) or ``none`` (no float tensor at all)."""
    stats: set[str] = set()     # values derived only from reductions and constants
    normish: set[str] = set()   # stats that went through Sqrt/Reciprocal/Pow or an L1/L2 reduction (divisors)
    prec: dict[int, str] = {}
    for k, n in enumerate(gr.graph.node):
        float_out = any(gr.is_float(o) for o in n.output if o)
        float_in = [i for i in n.input if i and gr.is_float(i)]
        if n.op_type in SHAPE_ONLY:
            prec[k] = "any"
            continue
        if n.op_type == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            float_out = to == _F32
        if not float_out:
            prec[k] = "follow" if float_in else "none"
            continue
        # Statistics: propagate forward from reductions through cheap elementwise/shape ops.
        if n.op_type in REDUCTIONS and float_out:
            stats.update(n.output)
            if n.op_type in ("ReduceL1", "ReduceL2", "ReduceSumSquare"):
                normish.update(n.output)
        elif n.op_type in STAT_OPS:
            dyn = [i for i in float_in if not gr.is_const(i)]
            if dyn and all(i in stats for i in dyn):
                stats.update(n.output)
                if n.op_type in ("Sqrt", "Reciprocal", "Pow") or any(i in normish for i in dyn):
                    normish.update(n.output)
        keep = (
            n.op_type in FP32_OPS
            or any(o in stats for o in n.output)
            or (n.domain not in ("", "ai.onnx"))
            or any(a.type in (5, 10) for a in n.attribute)  # GRAPH / GRAPHS attributes (If, Loop, Scan)
            or not _schema_allows_fp16(n, gr.opset)
            or (n.op_type == "Div" and len(n.input) > 1 and n.input[1] in stats)
            or (n.op_type == "Mul" and any(i in normish for i in n.input))
        )
        prec[k] = "fp32" if keep else "fp16"
    # Squares feeding a reduction overflow first: Mul(x, x) / Pow(x, 2) read by a reduction stay fp32.
    for k, n in enumerate(gr.graph.node):
        is_square = (n.op_type == "Mul" and len(n.input) == 2 and n.input[0] == n.input[1]) or n.op_type == "Pow"
        if is_square and any(c.op_type in REDUCTIONS for c in gr.consumers.get(n.output[0], [])):
            prec[k] = "fp32"
    return prec


def convert_to_fp16(src: str | Path, dst: str | Path) -> Fp16Report:
    """Write an fp16 version of the ONNX graph ``src`` to ``dst`` (overflow traps in fp32, fp32 I/O).

    Raises :class:`ExportError` when the result does not pass ``onnx.checker``."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(os.fspath(src))
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    _constants_to_initializers(model)
    gr = _Graph(model)
    g = model.graph
    prec = _decide(gr)
    report = Fp16Report()

    value_prec: dict[str, str] = {i.name: "fp32" for i in g.input}
    casts: dict[tuple[str, str], str] = {}
    fp16_inits: dict[str, str] = {}
    new_nodes = []

    def cast_of(name: str, want: str) -> str:
        """Name of ``name`` in precision ``want`` (an fp16 initializer copy or a Cast node, created once)."""
        if name in gr.inits:
            if want == "fp32":
                return name
            if name not in fp16_inits:
                arr, clamped = _to_fp16(numpy_helper.to_array(gr.inits[name]))
                report.clamped_constants += clamped
                fp16_inits[name] = f"{name}__fp16"
                g.initializer.append(numpy_helper.from_array(arr, fp16_inits[name]))
            return fp16_inits[name]
        if value_prec.get(name, "fp32") == want:
            return name
        key = (name, want)
        if key not in casts:
            out = f"{name}__to_{want}"
            to = _F16 if want == "fp16" else _F32
            new_nodes.append(helper.make_node("Cast", [name], [out], name=f"{out}__cast", to=to))
            casts[key] = out
            report.casts += 1
        return casts[key]

    for idx, n in enumerate(list(g.node)):
        p = prec[idx]
        if p in ("fp16", "fp32"):
            fixed = FIXED_FP32_INPUTS.get(n.op_type, set())
            for k, i in enumerate(n.input):
                # Cast reads any type; every other op gets its float inputs in its own precision.
                if i and gr.is_float(i) and n.op_type != "Cast":
                    n.input[k] = cast_of(i, "fp32" if k in fixed else p)
            if n.op_type == "Cast" and p == "fp16":
                for a in n.attribute:
                    if a.name == "to" and a.i == _F32:
                        a.i = _F16
            if n.op_type == "ConstantOfShape" and p == "fp16":
                for a in n.attribute:
                    if a.name == "value" and a.t.data_type == _F32:
                        arr, _ = _to_fp16(numpy_helper.to_array(a.t))
                        a.t.CopyFrom(numpy_helper.from_array(arr, a.t.name))
            for o in n.output:
                if o and (gr.is_float(o) or (n.op_type == "Cast" and p == "fp16")):
                    value_prec[o] = p
            if p == "fp16":
                report.fp16_nodes += 1
            else:
                report.fp32_nodes += 1
                report.fp32_ops[n.op_type] = report.fp32_ops.get(n.op_type, 0) + 1
        elif p == "follow":
            floats = [k for k, i in enumerate(n.input) if i and gr.is_float(i)]
            target = value_prec.get(n.input[floats[0]], "fp32") if floats else "fp32"
            for k in floats[1:]:
                n.input[k] = cast_of(n.input[k], target)
            if floats and n.input[floats[0]] in gr.inits:
                n.input[floats[0]] = cast_of(n.input[floats[0]], target)
        new_nodes.append(n)

    # keep_io_types: an output produced in fp16 gets a final Cast back to fp32 under the output's own name.
    for out in g.output:
        if value_prec.get(out.name) == "fp16":
            internal = f"{out.name}__fp16"
            for n in new_nodes:
                n.output[:] = [internal if o == out.name else o for o in n.output]
                n.input[:] = [internal if i == out.name else i for i in n.input]
            new_nodes.append(helper.make_node("Cast", [internal], [out.name], name=f"{out.name}__cast_fp32", to=_F32))
            report.casts += 1

    del g.node[:]
    g.node.extend(new_nodes)
    # fp32 initializers that nothing reads any more (all their readers now use the fp16 copy) are dropped.
    used = {i for n in g.node for i in n.input}
    live = [i for i in g.initializer if i.name in used or i.name in {o.name for o in g.output}]
    del g.initializer[:]
    g.initializer.extend(live)
    del g.value_info[:]  # stale fp32 types; re-inferred below and by every consumer
    _toposort(g)
    meta = {p.key: p for p in model.metadata_props}
    for key, value in (("fine_infer.variant", "fp16"), ("fine_infer.targets", "tensorrt,onnxruntime")):
        if key in meta:
            meta[key].value = value
        else:
            model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExportError(f"fp16 conversion of {Path(src).name} produced an invalid graph: {first}") from exc
    onnx.save(model, os.fspath(dst))
    return report


def _toposort(g) -> None:
    """Order nodes so every input is produced before it is read (inserted Casts sit just before their readers)."""
    available = {i.name for i in g.input} | {i.name for i in g.initializer} | {""}
    pending = list(g.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in available for i in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in available})[:3]
            raise ExportError(f"fp16 conversion left a graph with unresolved inputs {missing}")
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
