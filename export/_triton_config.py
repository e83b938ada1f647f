"""The ``config.pbtxt`` texts of a Triton repository (protobuf text format of Triton's ``ModelConfig``): graph models
on ``onnxruntime_onnx`` / ``tensorrt_plan``, Python-backend models and ensembles. :mod:`.triton_repo` decides what
the repository holds; this module only spells it.

With ``max_batch_size > 0`` the batch dimension is implicit and left out of ``dims``; other dynamic dimensions are
``-1``. ``dynamic_batching`` lets Triton merge concurrent requests up to ``max_batch_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from fine_infer.errors import ConfigError
from fine_infer.specs import GraphSpec, TensorSpec

TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL", "string": "TYPE_STRING",
}
DEFAULT_MAX_BATCH = 16
DEFAULT_PREFERRED = (4, 8, 16)
PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan")


@dataclass(frozen=True)
class Tensor:
    """One input or output of a config: name, Triton type, dims (batch dimension left out when batched)."""

    name: str
    type: str
    dims: tuple[int, ...]
    optional: bool = False
    ragged: bool = False  # allow_ragged_batch: requests whose dims differ may share a batch (the model pads them)


def batched(spec: GraphSpec) -> bool:
    """Triton's implicit batch dimension applies when every input and output has ``batch`` as its first axis."""
    return all(t.shape and t.shape[0] == "batch" for t in (*spec.inputs, *spec.outputs))


def dims(t: TensorSpec, is_batched: bool) -> tuple[int, ...]:
    shape = t.shape[1:] if is_batched else t.shape
    return tuple(d if isinstance(d, int) else -1 for d in shape)


def graph_tensors(kind: str, tensors: Sequence[TensorSpec], is_batched: bool, ragged: bool = False) -> list[Tensor]:
    """A graph's inputs or outputs as config tensors (``ragged``: inputs with a dynamic non-batch axis)."""
    out = []
    for t in tensors:
        if t.dtype not in TRITON_TYPES or t.dtype == "string":
            raise ConfigError(f"{kind} {t.name!r} has dtype {t.dtype}, which Triton does not take")
        d = dims(t, is_batched)
        out.append(Tensor(t.name, TRITON_TYPES[t.dtype], d, ragged=ragged and is_batched and -1 in d))
    return out


def _block(kind: str, tensors: Sequence[Tensor]) -> str:
    items = []
    for t in tensors:
        extra = ("    optional: true\n" if t.optional else "") + ("    allow_ragged_batch: true\n" if t.ragged else "")
        items.append(f'  {{\n    name: "{t.name}"\n    data_type: {t.type}\n'
                     f'    dims: [ {", ".join(str(d) for d in t.dims)} ]\n{extra}  }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _batching(max_batch_size: int, preferred: Sequence[int], delay_us: int) -> str:
    if max_batch_size <= 0:
        return ""
    sizes = sorted({b for b in preferred if 1 < b <= max_batch_size})
    pref = f"  preferred_batch_size: [ {', '.join(map(str, sizes))} ]\n" if sizes else ""
    return f"dynamic_batching {{\n{pref}  max_queue_delay_microseconds: {int(delay_us)}\n}}\n"


def _instances(count: int | None, kind: str | None) -> str:
    if not count and not kind:
        return ""
    body = (f"    count: {int(count)}\n" if count else "") + (f"    kind: {kind}\n" if kind else "")
    return f"instance_group [\n  {{\n{body}  }}\n]\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(f'parameters {{\n  key: "{k}"\n  value {{ string_value: "{_escape(v)}" }}\n}}\n'
                   for k, v in params.items())


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def model_config(
    name: str,
    spec: GraphSpec,
    platform: str,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    preferred_batch_sizes: Sequence[int] = DEFAULT_PREFERRED,
    max_queue_delay_us: int = 100,
    instance_kind: str | None = None,
    instance_count: int | None = None,
) -> str:
    """The ``config.pbtxt`` text of one graph model on ``onnxruntime_onnx`` or ``tensorrt_plan``."""
    if platform not in PLATFORMS:
        raise ConfigError(f"unsupported Triton platform {platform!r}")
    is_batched = batched(spec) and max_batch_size > 0
    out = [f'name: "{name}"\n', f'platform: "{platform}"\n', f"max_batch_size: {max_batch_size if is_batched else 0}\n",
           _block("input", graph_tensors("input", spec.inputs, is_batched)),
           _block("output", graph_tensors("output", spec.outputs, is_batched)),
           _batching(max_batch_size if is_batched else 0, preferred_batch_sizes, max_queue_delay_us),
           _instances(instance_count, instance_kind)]
    return "".join(out)


def python_config(
    name: str,
    inputs: Sequence[Tensor],
    outputs: Sequence[Tensor],
    params: dict[str, str],
    *,
    max_batch_size: int,
    instances: int = 1,
    preferred_batch_sizes: Sequence[int] = DEFAULT_PREFERRED,
    max_queue_delay_us: int = 100,
) -> str:
    """A Python-backend model (``fine_infer.serve.triton_model``) with CPU instances and its parameters."""
    return "".join([f'name: "{name}"\n', 'backend: "python"\n', f"max_batch_size: {max(0, max_batch_size)}\n",
                    _block("input", inputs), _block("output", outputs),
                    _batching(max_batch_size, preferred_batch_sizes, max_queue_delay_us),
                    _instances(instances, "KIND_CPU"), _parameters(params)])


@dataclass(frozen=True)
class Step:
    """One ensemble step: the model and its inputs/outputs mapped to the ensemble's tensors (model name → tensor)."""

    model: str
    inputs: dict[str, str]
    outputs: dict[str, str]


def ensemble_config(name: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor], steps: Sequence[Step], *,
                    max_batch_size: int) -> str:
    """An ensemble chaining ``steps`` (Triton schedules each step's requests on that model, batching included)."""
    lines = []
    for s in steps:
        maps = "".join(f'      input_map {{ key: "{k}" value: "{v}" }}\n' for k, v in s.inputs.items())
        maps += "".join(f'      output_map {{ key: "{k}" value: "{v}" }}\n' for k, v in s.outputs.items())
        lines.append(f'    {{\n      model_name: "{s.model}"\n      model_version: -1\n{maps}    }}')
    sched = "ensemble_scheduling {\n  step [\n" + ",\n".join(lines) + "\n  ]\n}\n"
    return "".join([f'name: "{name}"\n', 'platform: "ensemble"\n', f"max_batch_size: {max(0, max_batch_size)}\n",
                    _block("input", inputs), _block("output", outputs), sched])
