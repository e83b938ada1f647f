"""torch → ONNX for one graph, and the ``onnx.checker`` gate."""

from __future__ import annotations

import inspect
import io
import logging
import os
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Sequence

import torch

from fine_infer.errors import ExportError
from fine_infer.specs import GraphSpec

EXPORTERS = ("dynamo", "legacy")
DEFAULT_OPSET = 20


def _dynamic_shapes(spec: GraphSpec, example: Sequence[torch.Tensor]) -> tuple:
    """torch.export dims for each input, one shared ``Dim`` per axis name (so inputs agree on batch/sequence)."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = []
    for t, x in zip(spec.inputs, example):
        per_input = {}
        for i, d in enumerate(t.shape):
            if isinstance(d, str):
                if d not in dims:
                    dims[d] = torch.export.Dim(d, min=1, max=1 << 16)
                per_input[i] = dims[d]
        shapes.append(per_input or None)
    return tuple(shapes)


def _error_line(exc: BaseException) -> str:
    """The informative line of a torch.export failure (its 'Exception summary'), else the first line."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        rest = lines[lines.index("## Exception summary") + 1 :]
        if rest:
            return rest[0]
    return lines[0] if lines else type(exc).__name__


def export_graph(
    module: torch.nn.Module,
    spec: GraphSpec,
    example: Sequence[torch.Tensor],
    path: str | Path,
    opset: int | None = None,
    exporter: str = "dynamo",
) -> int:
    """Export ``module`` (forward takes ``example`` positionally) to ``path``; returns the opset written.

    Dynamic axes come from the spec's axis names. The dynamo exporter is the default; ``legacy`` (TorchScript)
    is the named fallback for models dynamo cannot trace."""
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    opset = opset or DEFAULT_OPSET
    input_names = [t.name for t in spec.inputs]
    output_names = [t.name for t in spec.outputs]
    module = module.eval()
    shapes = _dynamic_shapes(spec, example)
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        shapes = (shapes,)  # forward(*args): torch.export sees one argument holding the tuple
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    try:
        onnx_log.setLevel(logging.ERROR)  # hide 'torchvision is not installed' registration chatter
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                program = torch.onnx.export(
                    module, tuple(example), None, input_names=input_names, output_names=output_names,
                    opset_version=opset, dynamo=True, dynamic_shapes=shapes,
                    external_data=False, optimize=True,
                )
                program.save(os.fspath(path), external_data=False)
            else:
                torch.onnx.export(
                    module, tuple(example), os.fspath(path), input_names=input_names, output_names=output_names,
                    opset_version=opset, dynamo=False, dynamic_axes=spec.dynamic_axes, do_constant_folding=True,
                )
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the user needs one line
        first = _error_line(exc)
        hint = " (try --exporter legacy)" if exporter == "dynamo" else ""
        raise ExportError(f"torch.onnx.export of graph {spec.name!r} failed: {first}{hint}") from exc
    finally:
        onnx_log.setLevel(level)
    normalise_signature(path, spec)
    return opset


def normalise_signature(path: str | Path, spec: GraphSpec) -> None:
    """Name the graph's dims after the spec's axes and drop stale intermediate shapes.

    The dynamo exporter can leave a sample's static size in intermediate ``value_info`` (nn.LSTM outputs keep
    the example's sequence length), which makes ONNX Runtime warn on every other length; the shapes are
    optional, so they are dropped and the declared inputs/outputs carry the spec's symbolic dims."""
    import onnx

    model = onnx.load(os.fspath(path))
    del model.graph.value_info[:]
    _rename_internal_clashes(model.graph, {o.name for o in model.graph.output})
    by_name = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for vi in (*model.graph.input, *model.graph.output):
        t = by_name.get(vi.name)
        if t is None:
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(t.shape):
            raise ExportError(f"graph {spec.name!r}: {vi.name} has rank {len(dims)} in ONNX but {len(t.shape)} in the spec")
        for d, want in zip(dims, t.shape):
            if isinstance(want, str):
                d.ClearField("dim_value")
                d.dim_param = want
            else:
                d.ClearField("dim_param")
                d.dim_value = want
    onnx.save(model, os.fspath(path))


def _rename_internal_clashes(graph, outputs: set[str]) -> None:
    """Give a fresh name to an intermediate value or initializer that shares a graph output's name.

    The dynamo exporter names values after the aten op that made them (``aten.embedding`` → "embedding"), so a
    graph output called "embedding" can collide with one and break single assignment. The last writer (in
    topological order) produces the output; earlier writers and the readers before it get ``<name>__internal``."""
    for name in outputs:
        writers = [n for n in graph.node if name in n.output]
        inits = [i for i in graph.initializer if i.name == name]
        if len(writers) + len(inits) <= 1:
            continue
        internal = f"{name}__internal"
        for init in inits:
            init.name = internal
        final = writers[-1]
        for n in graph.node:
            n.input[:] = [internal if x == name else x for x in n.input]
            if n is final:
                break
            n.output[:] = [internal if x == name else x for x in n.output]


def check_onnx(path: str | Path) -> None:
    """The ``onnx.checker`` full check (with shape inference); raises :class:`ExportError` with its first line."""
    import onnx

    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        first = _error_line(exc)
        raise ExportError(f"onnx.checker rejected {Path(path).name}: {first}") from exc
