"""User encoders: ``fine-infer export --module pkg.mod:factory`` and :func:`export_module` / :func:`export_user`.

A factory returns ``(module, {name: example tensor})`` (one graph, task ``custom``), or declares more: a dict or a
dataclass (:class:`UserEncoder`) with ``module`` and ``inputs`` (one graph) or ``graphs`` (``{name: {...}}``), each
graph's ``task`` (``embed_text``, ``embed_image``, ``compose``, ``classify``, ``custom``), and the bundle's
``tokenizer`` (a ``tokenizer.json``, a Hugging Face folder holding one, or a ``tokenizers.Tokenizer``),
``text_max_length``, ``text_padding`` and ``image_preprocess`` (an :class:`~fine_infer.specs.ImagePreprocess` or a
dict of its fields). A graph with a task is fed as the runtime feeds it (``input_ids``/``attention_mask`` int64 from
the bundle's tokenizer, ``pixels`` from its image preprocessing): its parity gate and recorded references use real
texts and images through those, and an embedding that is not L2-normalised gets the normalisation appended (recorded
in the manifest's ``config.export.normalized``: fine-infer scores by dot product).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from fine_infer.errors import ConfigError, first_line
from fine_infer.export._bundle_export import _export_jobs, _outputs, _probe_output_axes, _user_sampler
from fine_infer.export.gates import GraphJob, InputSampler
from fine_infer.export.report import ExportReport
from fine_infer.specs import GraphSpec, ImagePreprocess, TensorSpec, TextPreprocess

TASKS = ("embed_text", "embed_image", "compose", "classify", "custom")
TEXT_INPUTS = ("input_ids", "attention_mask")
TASK_INPUTS = {"embed_text": TEXT_INPUTS, "embed_image": ("pixels",), "classify": ("pixels",),
               "compose": ("pixels", *TEXT_INPUTS)}
EMBED_TASKS = ("embed_text", "embed_image", "compose")


@dataclasses.dataclass
class UserGraph:
    """One graph: the module, named example inputs (its forward's keyword arguments), and optionally the task, more
    dynamic axes (``{"ids": {1: "sequence"}}``; axis 0 always is), output names and the graph's input names (in the
    order of ``inputs``, when they differ from the forward's: ``["input_ids", "attention_mask"]`` for ``ids, mask``)."""

    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    task: str | None = None
    dynamic_axes: dict[str, dict[int, str]] | None = None
    output_names: Sequence[str] | None = None
    input_names: Sequence[str] | None = None


@dataclasses.dataclass
class UserEncoder:
    """What a factory declares: its graphs and the bundle's tokenizer and preprocessing (see the module docstring)."""

    graphs: dict[str, UserGraph]
    tokenizer: Any = None
    text_max_length: int | None = None
    text_padding: str = "longest"
    image_preprocess: ImagePreprocess | dict | None = None


_GRAPH_KEYS = {f.name for f in dataclasses.fields(UserGraph)}
_ENCODER_KEYS = {f.name for f in dataclasses.fields(UserEncoder)} - {"graphs"}


def _fields(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}  # no deep copy (asdict copies)
    if isinstance(obj, Mapping):
        return dict(obj)
    raise ConfigError(f"expected a dict or a dataclass, got a {type(obj).__name__}")


def _graph(obj: Any, where: str) -> UserGraph:
    if isinstance(obj, UserGraph):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2:
        obj = {"module": obj[0], "inputs": obj[1]}
    d = _fields(obj)
    unknown = set(d) - _GRAPH_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a graph takes "
                          f"{', '.join(sorted(_GRAPH_KEYS))}")
    if not isinstance(d.get("module"), torch.nn.Module) or not isinstance(d.get("inputs"), dict) or not d["inputs"] \
            or not all(isinstance(v, torch.Tensor) for v in d["inputs"].values()):
        raise ConfigError(f"{where} needs 'module' (an nn.Module) and 'inputs' (a non-empty dict of name -> tensor)")
    return UserGraph(**d)


def as_encoder(result: Any, graph_name: str = "model", where: str = "the factory") -> UserEncoder:
    """A factory's return value as a :class:`UserEncoder` (see the module docstring for the accepted forms)."""
    if isinstance(result, UserEncoder):
        return result
    if isinstance(result, tuple):
        if not (len(result) == 2 and isinstance(result[0], torch.nn.Module) and isinstance(result[1], dict)):
            raise ConfigError(f"{where} must return (nn.Module, dict of named example tensors) or a dict/dataclass "
                              "with module and inputs (or graphs), and optionally tokenizer, image_preprocess, task, "
                              "text_max_length")
        return UserEncoder({graph_name: _graph(result, where)})
    d = _fields(result)
    allowed = _ENCODER_KEYS | ({"graphs"} if "graphs" in d else _GRAPH_KEYS)
    unknown = set(d) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected "
                          f"{', '.join(sorted(allowed))}")
    if "graphs" in d:
        if not isinstance(d["graphs"], Mapping) or not d["graphs"]:
            raise ConfigError(f"{where}: 'graphs' must map graph names to graphs")
        graphs = {str(n): _graph(g, f"{where}: graph {n!r}") for n, g in d["graphs"].items()}
    else:
        graphs = {graph_name: _graph({k: d[k] for k in _GRAPH_KEYS if k in d}, where)}
    return UserEncoder(graphs, **{k: d[k] for k in _ENCODER_KEYS if k in d})


def load_factory(ref: str, search_path: str | Path | None = None, graph_name: str = "model") -> UserEncoder:
    """Call ``factory()`` named by ``pkg.mod:factory`` and read what it returns (:func:`as_encoder`).

    ``search_path`` (default: the current directory) is put first on ``sys.path`` so local modules import."""
    if ":" not in ref:
        raise ConfigError(f"--module takes 'package.module:factory', got {ref!r}")
    mod_name, _, attr = ref.partition(":")
    path = str(Path(search_path or ".").resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {mod_name!r} for --module: {exc}") from None
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise ConfigError(f"{mod_name} has no callable {attr!r}")
    return as_encoder(factory(), graph_name, f"{ref}()")


def parse_dynamic_axes(specs: Sequence[str] | None) -> dict[str, dict[int, str]]:
    """``["ids:1", "mask:1", "feats:2=frames"]`` → ``{"ids": {1: "sequence"}, ...}``.

    The axis name defaults to ``sequence`` for dim 1 and ``axis<DIM>`` otherwise; inputs sharing a name share a size."""
    out: dict[str, dict[int, str]] = {}
    for s in specs or []:
        name, sep, rest = s.partition(":")
        dim_s, _, axis = rest.partition("=")
        if not sep or not name or not dim_s.isdigit():
            raise ConfigError(f"--dynamic-axis takes NAME:DIM or NAME:DIM=AXIS, got {s!r}")
        dim = int(dim_s)
        out.setdefault(name, {})[dim] = axis or ("sequence" if dim == 1 else f"axis{dim}")
    return out


def image_preprocess_from(value: ImagePreprocess | Mapping[str, Any]) -> ImagePreprocess:
    """An :class:`ImagePreprocess` from itself or a dict of its fields (``size`` required; ``crop`` defaults to it),
    with every field checked."""
    if isinstance(value, ImagePreprocess):
        d = value.to_dict()
    elif isinstance(value, Mapping):
        d = dict(value)
    else:
        raise ConfigError(f"image_preprocess must be an ImagePreprocess or a dict, not {type(value).__name__}")
    names = {f.name for f in dataclasses.fields(ImagePreprocess)}
    if set(d) - names or "size" not in d:
        raise ConfigError(f"image preprocessing takes {', '.join(sorted(names))} (size required); got "
                          f"{', '.join(sorted(d))}")
    d.setdefault("crop", d["size"])
    for key in ("mean", "std"):
        if key in d:
            d[key] = tuple(float(x) for x in d[key])
            if len(d[key]) != 3:
                raise ConfigError(f"image {key} takes 3 numbers (R, G, B), got {len(d[key])}")
    from fine_infer.preprocess import _RESAMPLE

    spec = ImagePreprocess(**d)
    checks = [(spec.resize in ("exact", "shorter"), "resize is 'exact' or 'shorter'"),
              (spec.interpolation in _RESAMPLE, f"interpolation is one of {', '.join(_RESAMPLE)}"),
              (0 < spec.crop <= spec.size, "0 < crop <= size"), (min(spec.std) > 0, "every std > 0"),
              (spec.crop_rounding in ("round", "floor"), "crop_rounding is 'round' or 'floor'"),
              (spec.alpha in ("drop", "white"), "alpha is 'drop' or 'white'")]
    bad = [why for ok, why in checks if not ok]
    if bad:
        raise ConfigError(f"image preprocessing {spec.to_dict()}: needs {'; '.join(bad)}")
    return spec


def _text(encoder: UserEncoder):
    """The bundle tokenizer and its :class:`TextPreprocess` (None, None without a tokenizer)."""
    from fine_infer.tokenization import hf_text_preprocess, load_hf_tokenizer

    if encoder.tokenizer is None:
        if encoder.text_max_length is not None:
            raise ConfigError("text_max_length is given without a tokenizer (--tokenizer)")
        return None, None
    tok, info = load_hf_tokenizer(encoder.tokenizer)
    length = encoder.text_max_length or info.get("truncation") or info.get("model_max_length")
    if not length:
        raise ConfigError("the tokenizer names no maximum length: give text_max_length (--text-max-length)")
    return tok, hf_text_preprocess(tok, info, int(length), encoder.text_padding)


class _Positional(torch.nn.Module):
    """torch.onnx wants positional inputs in spec order; the user's forward takes them by keyword."""

    def __init__(self, inner: torch.nn.Module, keywords: Sequence[str]) -> None:
        super().__init__()
        self.inner = inner
        self.keywords = list(keywords)

    def forward(self, *args):
        return self.inner(**dict(zip(self.keywords, args)))


class _Normalized(torch.nn.Module):
    """The wrapped module with its (single) output L2-normalised per row."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return torch.nn.functional.normalize(self.inner(*args), p=2, dim=-1)


def _task_sampler(task: str, tokenizer, text: TextPreprocess | None, image: ImagePreprocess | None) -> InputSampler:
    """Feeds as the runtime makes them: token ids of real texts, pixels of random images."""
    from fine_infer.export.hf._inputs import image_sampler, text_sampler

    parts = [s for s, needed in ((text_sampler(tokenizer, text) if text else None, "input_ids" in TASK_INPUTS[task]),
                                 (image_sampler(image) if image else None, "pixels" in TASK_INPUTS[task])) if needed]
    return lambda b, L, g: {k: v for part in parts for k, v in part(b, L, g).items()}


def _check_task(name: str, task: str, example: dict[str, torch.Tensor], text, image) -> None:
    if task not in TASKS:
        raise ConfigError(f"graph {name!r}: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    want = TASK_INPUTS.get(task)
    if want is None:
        return
    if set(example) != set(want):
        raise ConfigError(f"graph {name!r} (task {task}) must take inputs {', '.join(want)} (what the runtime feeds); "
                          f"it takes {', '.join(example)}: rename them (input_names / --input-names)")
    for n in TEXT_INPUTS:
        if n in want and example[n].dtype != torch.int64:
            raise ConfigError(f"graph {name!r}: {n} must be int64 (the runtime feeds int64), not {example[n].dtype}")
    if "input_ids" in want and text is None:
        raise ConfigError(f"graph {name!r} (task {task}) needs a tokenizer: a tokenizer.json or a Hugging Face folder "
                          "(tokenizer / --tokenizer)")
    if "pixels" in want:
        if image is None:
            raise ConfigError(f"graph {name!r} (task {task}) needs image preprocessing (image_preprocess / "
                              "--image-size ... or --preprocess)")
        px = example["pixels"]
        if not px.dtype.is_floating_point or tuple(px.shape[1:]) != (3, image.crop, image.crop):
            raise ConfigError(f"graph {name!r}: pixels must be float (batch, 3, {image.crop}, {image.crop}) as the "
                              f"preprocessing crops; the example is {px.dtype} {tuple(px.shape)}")


def _check_shared_axes(name: str, example: dict[str, torch.Tensor], axes: dict[str, dict[int, str]]) -> None:
    """Dims that share an axis name (``batch`` included) share a size at run time: the example must agree."""
    seen: dict[str, tuple[str, int, int]] = {}
    for n, per in axes.items():
        for dim, axis in sorted(per.items()):
            size = int(example[n].shape[dim])
            first = seen.setdefault(axis, (n, dim, size))
            if first[2] != size:
                raise ConfigError(f"graph {name!r}: dynamic axis {axis!r} is dim {first[1]} of {first[0]!r} (size "
                                  f"{first[2]}) and dim {dim} of {n!r} (size {size}); dims sharing an axis name have "
                                  f"one size at run time: name them apart (--dynamic-axis {n}:{dim}=OTHER)")


def _graph_job(name: str, g: UserGraph, tokenizer, text, image, notes: dict[str, Any]) -> GraphJob:
    names = list(g.input_names or g.inputs)
    if len(names) != len(g.inputs) or len(set(names)) != len(names):
        raise ConfigError(f"graph {name!r}: {len(names)} input names for {len(g.inputs)} inputs")
    example = dict(zip(names, g.inputs.values()))
    task = g.task or "custom"
    _check_task(name, task, example, text, image)
    to_graph = dict(zip(g.inputs, names))
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names}
    for key, per in (g.dynamic_axes or {}).items():
        n = to_graph.get(key, key)
        if n not in example:
            raise ConfigError(f"dynamic axis for unknown input {key!r}; inputs are {', '.join(g.inputs)}")
        for dim, axis in per.items():
            if not 0 < int(dim) < example[n].ndim:
                raise ConfigError(f"input {key!r} has {example[n].ndim} dims; cannot make dim {dim} dynamic")
            axes[n][int(dim)] = axis
    if "input_ids" in TASK_INPUTS.get(task, ()):
        for n in TEXT_INPUTS:
            axes[n][1] = "sequence"  # the tokenizer decides the length
    _check_shared_axes(name, example, axes)
    module: torch.nn.Module = _Positional(g.module, list(g.inputs)).eval()
    has_seq = any(a != "batch" for per in axes.values() for a in per.values())
    sampler = _task_sampler(task, tokenizer, text, image) if task in TASK_INPUTS else _user_sampler(example, axes)
    max_seq = text.max_length if task in TASK_INPUTS and text else (1 if has_seq else None)
    try:
        outputs, out_axes = _probe_output_axes(module, names, example, axes)
    except Exception as exc:  # noqa: BLE001 - the user's module: one line
        raise ConfigError(f"graph {name!r} fails on its example inputs or with a dynamic dim grown by one "
                          f"({type(exc).__name__}: {first_line(exc)}): make dynamic only the dims the module can "
                          "vary") from None
    if task in TASK_INPUTS:  # the bundle's own inputs must run, and embeddings must be unit rows
        feeds = sampler(3, max_seq, torch.Generator().manual_seed(0))
        try:
            got = _outputs(module, [feeds[n] for n in names])
        except Exception as exc:  # noqa: BLE001 - the user's module: one line
            line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"graph {name!r} fails on inputs made by the bundle's tokenizer/preprocessing: "
                              f"{type(exc).__name__}: {line}") from None
        norms = got[0].float().reshape(got[0].shape[0], -1).norm(dim=1)
        if task in EMBED_TASKS and len(got) == 1 and not torch.allclose(norms, torch.ones_like(norms), atol=1e-4):
            module = _Normalized(module).eval()
            notes.setdefault("normalized", []).append(name)
    default_out = "embedding" if task in EMBED_TASKS else "output"
    out_names = list(g.output_names or ([default_out] if len(outputs) == 1 else
                                        [f"output_{i}" for i in range(len(outputs))]))
    if len(out_names) != len(outputs):
        raise ConfigError(f"{len(out_names)} output names for {len(outputs)} outputs")
    spec = GraphSpec(
        name, task,
        tuple(TensorSpec(n, str(x.dtype).replace("torch.", ""), tuple(axes[n].get(d, s) for d, s in enumerate(x.shape)))
              for n, x in example.items()),
        tuple(TensorSpec(n, str(o.dtype).replace("torch.", ""), tuple(ax.get(d, s) for d, s in enumerate(o.shape)))
              for n, o, ax in zip(out_names, outputs, out_axes)),
    )
    if names != list(g.inputs):
        notes.setdefault("input_names", {})[name] = to_graph
    kinds = {t.name: "logits" for t in spec.outputs} if task == "classify" else {}
    return GraphJob(spec, module, sampler, max_seq, kinds)


def export_user(encoder: UserEncoder, out: str | Path, *, source: str = "python", **kwargs: Any) -> ExportReport:
    """Export a :class:`UserEncoder` (every graph, its tokenizer and preprocessing) to a bundle; ``kwargs`` are
    :func:`fine_infer.export._bundle_export._export_jobs`'s (opset, exporter, atol, batch_sizes, force, gates,
    variants, lint, drop_failed_variants, references)."""
    t0 = time.perf_counter()
    tokenizer, text = _text(encoder)
    image = image_preprocess_from(encoder.image_preprocess) if encoder.image_preprocess is not None else None
    notes: dict[str, Any] = {}
    jobs = [_graph_job(n, g, tokenizer, text, image, notes) for n, g in encoder.graphs.items()]
    return _export_jobs(jobs, out, source=source, text=text, image=image, tokenizer=tokenizer,
                        config={"export": notes} if notes else None, started=t0, **kwargs)


def export_module(
    module: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor],
    out: str | Path,
    *,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    output_names: Sequence[str] | None = None,
    graph_name: str = "model",
    task: str | None = None,
    input_names: Sequence[str] | None = None,
    tokenizer: Any = None,
    text_max_length: int | None = None,
    text_padding: str = "longest",
    image_preprocess: ImagePreprocess | dict | None = None,
    source: str = "python",
    **options: Any,
) -> ExportReport:
    """Export any ``nn.Module`` with named example inputs to a one-graph bundle.

    Axis 0 of every input is the dynamic ``batch``; ``dynamic_axes`` adds more (``{"ids": {1: "sequence"}}``:
    inputs sharing an axis name share its size). Output axes that follow an input axis are found by probing.
    ``task``, ``input_names``, ``tokenizer``, ``text_max_length``, ``text_padding`` and ``image_preprocess`` declare
    how the runtime feeds it (see the module docstring). ``options`` are the export's: ``opset``, ``exporter``,
    ``atol``, ``batch_sizes``, ``force``, ``gates``, ``variants``, ``lint``, ``drop_failed_variants``, ``references``
    (as for :func:`~fine_infer.export.export_model`)."""
    if not example_inputs or not all(isinstance(v, torch.Tensor) for v in example_inputs.values()):
        raise ConfigError("example_inputs must be a non-empty dict of name -> torch.Tensor")
    graph = UserGraph(module, example_inputs, task, dynamic_axes, output_names, input_names)
    encoder = UserEncoder({graph_name: graph}, tokenizer, text_max_length, text_padding, image_preprocess)
    return export_user(encoder, out, source=source, **options)


def read_preprocess(value: str) -> dict[str, Any]:
    """``--preprocess``: JSON text or a JSON file with ``image`` (ImagePreprocess fields) and/or ``text``
    (``max_length``, ``padding``)."""
    p = Path(value)
    text = p.read_text(encoding="utf-8") if not value.lstrip().startswith("{") and p.is_file() else value
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--preprocess takes JSON (or a JSON file): {exc}") from None
    if not isinstance(d, dict) or set(d) - {"image", "text"}:
        raise ConfigError("--preprocess takes {\"image\": {...}, \"text\": {\"max_length\": N, \"padding\": ...}}")
    return d


def declare(
    encoder: UserEncoder,
    *,
    tasks: Sequence[str] = (),
    tokenizer: str | None = None,
    text_max_length: int | None = None,
    text_padding: str | None = None,
    image: Mapping[str, Any] | None = None,
    preprocess: str | None = None,
    dynamic_axes: Sequence[str] = (),
    input_names: Sequence[str] | None = None,
) -> UserEncoder:
    """Apply ``fine-infer export --module`` flags over what the factory declared (a flag wins): ``tasks`` is
    ``TASK`` (every graph) or ``GRAPH=TASK`` items; ``image`` holds ImagePreprocess fields (``--image-size`` ...),
    over ``preprocess`` (``--preprocess`` JSON) and the factory's; ``dynamic_axes`` are ``NAME:DIM[=AXIS]`` items for
    whichever graph has input NAME; ``input_names`` renames the inputs of a one-graph encoder."""
    pre = read_preprocess(preprocess) if preprocess else {}
    base = encoder.image_preprocess
    merged = {**(base.to_dict() if isinstance(base, ImagePreprocess) else dict(base or {})), **(pre.get("image") or {}),
              **{k: v for k, v in (image or {}).items() if v is not None}}
    text = pre.get("text") or {}
    for graph_task in tasks:
        graph, sep, task = graph_task.rpartition("=")
        if sep and graph not in encoder.graphs:
            raise ConfigError(f"--task {graph_task}: no graph {graph!r}; graphs are {', '.join(encoder.graphs)}")
        for name, g in encoder.graphs.items():
            if not sep or name == graph:
                g.task = task
    for name, per in parse_dynamic_axes(dynamic_axes).items():
        owners = [g for g in encoder.graphs.values() if name in g.inputs or name in (g.input_names or ())]
        if not owners:
            raise ConfigError(f"--dynamic-axis {name}: no graph has an input {name!r}")
        for g in owners:
            g.dynamic_axes = {**(g.dynamic_axes or {}), name: {**(g.dynamic_axes or {}).get(name, {}), **per}}
    if input_names:
        if len(encoder.graphs) != 1:
            raise ConfigError("--input-names applies to a one-graph module; declare input_names per graph instead")
        next(iter(encoder.graphs.values())).input_names = list(input_names)
    return dataclasses.replace(
        encoder, tokenizer=tokenizer or encoder.tokenizer,
        text_max_length=text_max_length or text.get("max_length") or encoder.text_max_length,
        text_padding=text_padding or text.get("padding") or encoder.text_padding,
        image_preprocess=merged or None)
