"""The TensorRT compatibility lint: will the TensorRT ONNX parser take this graph, and will a profile cover it?

A static check, runnable anywhere (no TensorRT, no GPU). The parser's supported-operator list is data
(``trt_onnx_ops.json``, copied from onnx-tensorrt's ``docs/operators.md`` with the TensorRT version it describes), so
updating it for a new TensorRT release is a data change. Per node it checks:

- the op and its domain: custom domains (``com.microsoft`` contrib ops from ONNX Runtime's fusions, int8 dynamic
  quantisation ops) have no parser importer; ops the table marks unsupported or does not list are errors;
- the dtypes of the op's data tensors against the op's supported types. INT64 is a native TensorRT type since 9.0
  (the parser no longer casts it down to INT32), but only the ops whose type list names INT64 accept it: an INT64
  data tensor into e.g. MatMul or Softmax is flagged with "cast to INT32". DOUBLE is cast down to FLOAT (warning);
  UINT8 is allowed only at the graph boundary;
- the restrictions the table spells out that can be checked statically (constant ``axes`` inputs, LSTM ``layout``,
  LayerNormalization's single output, pooling dilations, Resize modes);

and per graph: the opset is within the parser's range, every dynamic input dimension is a named axis that an
optimisation profile will cover (``batch``, ``sequence`` by default), and the file is not an ONNX Runtime-only
variant (int8, cpu-opt) marked ``fine_infer.targets`` in its metadata.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fine_infer.errors import ExportError

TABLE_PATH = Path(__file__).with_name("trt_onnx_ops.json")
DEFAULT_PROFILE_AXES = frozenset({"batch", "sequence"})

# ONNX TensorProto element types → the names the TensorRT operator table uses.
ONNX_TO_TRT = {
    1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL", 11: "DOUBLE",
    17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4", 23: "FP4",
}
ONNX_NAMES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string", 9: "bool",
    10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}


@dataclass(frozen=True)
class Finding:
    """One problem: ``severity`` is ``error`` (the parser or builder will fail) or ``warning`` (it may)."""

    severity: str
    node: str
    op: str
    problem: str

    def line(self) -> str:
        """One human-readable line."""
        where = f"node {self.node} ({self.op})" if self.node else "graph"
        return f"{self.severity}: {where}: {self.problem}"


@dataclass
class LintReport:
    """The lint of one ONNX file; ``passed`` when it has no errors."""

    path: str
    tensorrt_version: str
    opset: int | None
    nodes: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def passed(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """One line: the verdict, counts and the first error."""
        name = Path(self.path).name
        head = (f"{name}: {'passes' if self.passed else 'FAILS'} the TensorRT {self.tensorrt_version} lint "
                f"({self.nodes} nodes, opset {self.opset}, {len(self.errors)} errors, {len(self.warnings)} warnings)")
        return head + (f"; first: {self.errors[0].line()}" if self.errors else "")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "tensorrt_version": self.tensorrt_version, "opset": self.opset, "nodes": self.nodes,
                "passed": self.passed, "findings": [asdict(f) for f in self.findings]}


@functools.lru_cache(maxsize=4)
def load_table(path: str | None = None) -> dict[str, Any]:
    """The TensorRT ONNX operator table (``trt_onnx_ops.json`` beside this module unless ``path`` is given)."""
    with open(path or TABLE_PATH, encoding="utf-8") as f:
        return json.load(f)


def _data_type_params(schema) -> set[str]:
    """The type parameters whose tensors the table's type list applies to (see the table's ``types_column`` note)."""
    multi = {c.type_param_str for c in schema.type_constraints if len(c.allowed_type_strs) > 1}
    formals = [*schema.inputs, *schema.outputs]
    if schema.name in ("Cast", "CastLike"):  # both sides of a cast must be TensorRT types
        return {f.type_str for f in formals if f.type_str in multi}
    return next(({f.type_str} for f in formals if f.type_str in multi), set())


def _bound(formals, actual: list[str]) -> list[tuple[str, str]]:
    """Pair actual tensor names with their formal parameter's type string (variadic last formal repeats)."""
    out = []
    for k, name in enumerate(actual):
        if not name or not formals:
            continue
        f = formals[min(k, len(formals) - 1)]
        if k >= len(formals) and f.option.name != "Variadic":
            continue
        out.append((name, f.type_str))
    return out


def _attr(node, name: str):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return None


def _walk(graph, prefix: str = "") -> Iterable[tuple[Any, str]]:
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies), with a display name."""
    for k, n in enumerate(graph.node):
        label = prefix + (n.name or f"#{k}")
        yield n, label
        for a in n.attribute:
            if a.type == 5:  # GRAPH
                yield from _walk(a.g, f"{label}/{a.name}/")
            elif a.type == 10:  # GRAPHS
                for j, sub in enumerate(a.graphs):
                    yield from _walk(sub, f"{label}/{a.name}[{j}]/")


def lint_onnx(
    model: str | Path | Any,
    *,
    profile_axes: Iterable[str] | None = None,
    table: dict[str, Any] | None = None,
) -> LintReport:
    """Lint an ONNX file (or a loaded ``onnx.ModelProto``) for the TensorRT ONNX parser.

    ``profile_axes``: the named dynamic axes an optimisation profile will cover (default ``batch`` and
    ``sequence``, the axes :func:`fine_infer.export.engines.default_profiles` gives ranges for)."""
    import onnx

    table = table or load_table()
    path = os.fspath(model) if isinstance(model, (str, Path)) else "<model>"
    if isinstance(model, (str, Path)):
        try:
            model = onnx.load(os.fspath(model))
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"cannot read {path} as ONNX: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    if model.functions:
        # The parser imports local functions node by node; inlining checks the same ops.
        model = onnx.inliner.inline_local_functions(model)
    version = table["tensorrt_version"]
    ops = table["ops"]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    report = LintReport(path, version, opset, 0)
    add = report.findings.append

    def graph_problem(severity: str, problem: str) -> None:
        add(Finding(severity, "", "", problem))
    axes = set(DEFAULT_PROFILE_AXES if profile_axes is None else profile_axes)

    meta = {p.key: p.value for p in model.metadata_props}
    targets = meta.get("fine_infer.targets")
    if targets is not None and "tensorrt" not in targets.split(","):
        variant = meta.get("fine_infer.variant", "?")
        graph_problem("error", f"this is an ONNX Runtime-only graph (variant {variant}, targets {targets}); "
                               "lint and build the portable or fp16 graph for TensorRT")
    lo, hi = table["opset"]["min"], table["opset"]["max"]
    if opset is None or not lo <= opset <= hi:
        graph_problem("error", f"opset {opset} is outside the TensorRT {version} parser's range {lo}-{hi}")
    else:
        old_lo, old_hi = table.get("opset_by_tensorrt_version", {}).get("10.0", (lo, hi))
        if opset > old_hi:
            graph_problem("warning", f"opset {opset} needs a TensorRT newer than 10.0 (which takes {old_lo}-{old_hi}); "
                                     "export with --opset 20 for older JetPack releases")

    # Graph inputs: every dynamic dim must be a named axis a profile covers.
    for vi in model.graph.input:
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            graph_problem("error", f"input {vi.name!r} has no declared shape; TensorRT needs its rank")
            continue
        for d, dim in enumerate(t.shape.dim):
            if dim.HasField("dim_value"):
                continue
            if not dim.dim_param:
                graph_problem("error", f"input {vi.name!r} dim {d} is dynamic without a name; no profile can cover it")
            elif dim.dim_param not in axes:
                graph_problem("error", f"input {vi.name!r} dim {d} is dynamic ({dim.dim_param!r}) but no optimisation "
                                       f"profile covers that axis (profiles cover: {', '.join(sorted(axes))})")
        if t.elem_type not in ONNX_TO_TRT:
            graph_problem("error", f"input {vi.name!r} is {_onnx_type_name(t.elem_type)}, not a TensorRT type")

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types: dict[str, int] = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    consts = {i.name for i in model.graph.initializer}
    for i in model.graph.initializer:
        types[i.name] = i.data_type
    io_names = {v.name for v in (*model.graph.input, *model.graph.output)}
    for n, _ in _walk(model.graph):
        if n.op_type == "Constant":
            consts.update(n.output)

    for n, label in _walk(model.graph):
        report.nodes += 1
        domain = n.domain or ""
        op = n.op_type if domain in ("", "ai.onnx") else f"{domain}.{n.op_type}"
        if domain not in ("", "ai.onnx"):
            add(Finding("error", label, op, f"custom-domain op: the TensorRT ONNX parser has no importer for {op} "
                                            "(it would need a TensorRT plugin)"))
            continue
        entry = ops.get(n.op_type)
        if entry is None:
            add(Finding("error", label, op, f"{op} is not in the TensorRT {version} ONNX parser's operator list"))
            continue
        if not entry.get("supported"):
            extra = f" ({entry['restrictions']})" if entry.get("restrictions") else ""
            add(Finding("error", label, op, f"{op} is not supported by the TensorRT {version} ONNX parser{extra}"))
            continue
        _check_types(n, label, op, entry, types, io_names, opset, add)
        _check_restrictions(n, label, op, entry.get("checks", {}), consts, add)
    return report


def _check_types(n, label, op, entry, types, io_names, opset, add) -> None:
    import onnx

    allowed = set(entry.get("types", []))
    warn = entry.get("types_warn", {})
    try:
        schema = onnx.defs.get_schema(n.op_type, opset or 20, "")
    except Exception:  # noqa: BLE001 - an op unknown to this onnx: nothing to bind types to
        return
    params = _data_type_params(schema)
    bound = _bound(list(schema.inputs), list(n.input)) + _bound(list(schema.outputs), list(n.output))
    bad: dict[str, list[str]] = {}  # TensorRT type name -> offending tensors (one finding per type per node)
    for name, tstr in bound:
        if tstr in params and name in types and name not in {t for ts in bad.values() for t in ts}:
            trt = ONNX_TO_TRT.get(types[name], f"onnx type {_onnx_type_name(types[name])}")
            if trt == "UINT8" and name in io_names:
                continue  # UINT8 is allowed at the graph boundary
            if trt not in allowed or trt in warn:
                bad.setdefault(trt, []).append(name)
    for trt, names in bad.items():
        tensors = ", ".join(repr(t) for t in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        takes = ", ".join(entry.get("types", []))
        if trt in warn:
            add(Finding("warning", label, op, f"{trt} tensor {tensors}: {warn[trt]}"))
        elif trt == "DOUBLE":
            add(Finding("warning", label, op, f"float64 tensor {tensors}: TensorRT casts float64 down to float32"))
        elif trt == "UINT8":
            add(Finding("error", label, op, f"uint8 tensor {tensors}: TensorRT takes uint8 only as graph input/output"))
        elif trt == "INT64":
            fix = "INT32" if "INT32" in allowed else "a float type"
            add(Finding("error", label, op, f"INT64 tensor {tensors}: TensorRT's {op} takes {takes}, not INT64 "
                                            f"(INT64 is native only in the ops that list it); cast to {fix} first"))
        elif trt.startswith("onnx type"):
            add(Finding("error", label, op, f"tensor {tensors} is {trt[10:]}, which TensorRT does not support"))
        else:
            add(Finding("error", label, op, f"{trt} tensor {tensors}: TensorRT's {op} takes {takes}"))


def _onnx_type_name(elem_type: int) -> str:
    return ONNX_NAMES.get(elem_type, str(elem_type))


def _check_restrictions(n, label, op, checks: dict[str, Any], consts: set[str], add) -> None:
    for k in checks.get("const_inputs", []):
        if k < len(n.input) and n.input[k] and n.input[k] not in consts:
            add(Finding("error", label, op, f"input {k} ({n.input[k]!r}) must be an initializer or a constant"))
    max_out = checks.get("max_outputs")
    if max_out is not None and len([o for o in n.output if o]) > max_out:
        add(Finding("error", label, op, f"TensorRT supports only the first {max_out} output(s) of {op}"))
    for name, want in checks.get("attr_equals", {}).items():
        got = _attr(n, name)
        if got is not None and got != want:
            add(Finding("error", label, op, f"attribute {name}={got!r} is not supported (TensorRT needs {want!r})"))
    for name, allowed in checks.get("attr_in", {}).items():
        got = _attr(n, name)
        if got is not None and got not in allowed:
            add(Finding("error", label, op, f"attribute {name}={got!r} is not supported (TensorRT takes {allowed})"))
    for name in checks.get("attr_all_ones", []):
        got = _attr(n, name)
        if got is not None and any(v != 1 for v in got):
            add(Finding("error", label, op, f"attribute {name}={list(got)} is not supported (must be all ones)"))


def lint_gate(path: str | Path, **kwargs: Any) -> LintReport:
    """:func:`lint_onnx` as an export gate: raises :class:`ExportError` with the first error in one line."""
    report = lint_onnx(path, **kwargs)
    if not report.passed:
        first = report.errors[0]
        n = len(report.errors)
        raise ExportError(f"TensorRT lint of {Path(path).name} failed ({n} errors); first: {first.line()}")
    return report


def lint_bundle(bundle: str | Path, **kwargs: Any) -> dict[str, LintReport]:
    """Lint every TensorRT-bound file of a bundle: each graph's portable ONNX and its ``fp16`` variant.

    ONNX Runtime-only variants (``int8``, ``cpu-opt``) are not TensorRT inputs and are left out."""
    from fine_infer.bundle import read_bundle

    b = read_bundle(bundle)
    out: dict[str, LintReport] = {}
    for name, entry in b.manifest.graphs.items():
        out[name] = lint_onnx(b.file(entry.file), **kwargs)
        if "fp16" in entry.variants:
            out[f"{name}:fp16"] = lint_onnx(b.file(entry.variants["fp16"]), **kwargs)
    return out
