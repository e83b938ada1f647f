"""An NVIDIA Triton Inference Server model repository from a bundle (``fine-infer triton-repo``,
``export --triton-repo``): raw text and images in, the bundle's own preprocessing on the server.

Model names start with the bundle's arch (``--prefix`` to choose). For a bundle with an image and a text graph:

    DIR/
      README.md                       the models, how to start a server and call it, the preprocessing
      fashion_fine_preprocess/        Python backend: raw ``text`` / ``image`` bytes → the graphs' tensors, with the
        config.pbtxt                  bundle's own code (:mod:`fine_infer.serve.triton_model`, role ``preprocess``)
        1/model.py                    a shim importing fine_infer.serve.triton_model: the installed fine-infer runs
        bundle/                       the bundle, copied in (hard links where the file system allows); every
                                      Python model verifies its checksums when it loads
      fashion_fine_text/              the graph, tensors in: onnxruntime_onnx (1/model.onnx), tensorrt_plan
        config.pbtxt                  (1/model.plan, the bundle's engine) or, with ``backend="python"``, the Python
        1/model.onnx | .plan | .py    backend on fine_infer.load (ONNX Runtime / OpenVINO on CPU)
        preprocess.json               for clients sending tensors: the manifest's preprocessing
        tokenizer.json                (graphs that take text)
      fashion_fine_text_raw/          ensemble: ``text`` (TYPE_STRING) → preprocess → graph → ``embedding``
      fashion_fine_image_raw/         ensemble: ``image`` (the encoded file's bytes, TYPE_STRING) → ... → ``embedding``
      fashion_fine_index/             with ``index=``: Python backend over a fine_infer Index (index/<file>)
      fashion_fine_text_search/       with ``index=``: ensemble: ``text`` (+ optional ``k``) → ``ids``, ``scores``,
                                      ``metadata`` (JSON per hit)

The bundle is copied rather than referenced so the repository is whole wherever it is mounted (a server container
sees neither the writer's paths nor its files); Triton takes every folder of a repository for a model, so it sits in
the preprocess model's folder (the first Python graph model's with ``tensors_only``) and the other Python models
name it relative to the repository root. ``tensors_only`` writes the graph models alone (tensor inputs, as before;
a server without fine-infer can serve them).

Batching: every step batches dynamically up to its ``max_batch_size``. Triton merges requests of an
``onnxruntime_onnx``/``tensorrt_plan`` graph only when their non-batch dimensions agree (text graphs batch best with
the bundle's fixed padding length); a Python graph model takes ragged batches and pads them along the sequence axis,
as the runtime's batcher does. A graph's ``max_batch_size`` comes from the bundle: 0 for a graph without a batch
axis (it gets no ensemble), capped at the profile of its TensorRT plan, else ``max_batch_size``.

A plan runs only on the TensorRT version that built it unless it was built ``--version-compatible``
(:func:`fine_infer.export.engines.plan_runs_on`). Given the Triton server's TensorRT version
(``tensorrt_version=`` / ``--tensorrt-version``) a plan that will not run there is refused, naming the fixes; without
it a warning names the version each plan needs. The README lists them, and says to start the server with
``--backend-config=tensorrt,version-compatible=true`` when a plan is version-compatible (Triton's TensorRT backend
loads such plans only then).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from fine_infer._atomic import DIR_MODE
from fine_infer.errors import ConfigError
from fine_infer.export._triton_config import (
    DEFAULT_MAX_BATCH,
    DEFAULT_PREFERRED,
    TRITON_TYPES,
    Step,
    Tensor,
    batched,
    dims,
    ensemble_config,
    graph_tensors,
    model_config,
    python_config,
)
from fine_infer.export._triton_readme import readme
from fine_infer.specs import GraphSpec

__all__ = ["BACKENDS", "DEFAULT_MAX_BATCH", "DEFAULT_PREFERRED", "TRITON_TYPES", "model_config", "write_triton_repo"]

BACKENDS = ("onnxruntime", "tensorrt", "python")
MARKER = ".fine-infer-triton-repo"  # in every repository written here: what --force may replace
RAW = {"pixels": "image", "input_ids": "text", "attention_mask": "text"}  # graph input → the raw input it comes from
SEARCH_TASKS = ("embed_text", "embed_image", "compose")
SHIM = '''"""A Triton Python backend model written by `fine-infer triton-repo`: its code is fine_infer.serve.triton_model
(the installed fine-infer's), its role and options are the `parameters` of config.pbtxt."""

from fine_infer.serve.triton_model import TritonPythonModel  # noqa: F401
'''


def _check_plan(name: str, record: dict[str, Any], tensorrt_version: str | None) -> None:
    """Refuse a plan that will not run on the server's TensorRT; warn when that version is not known."""
    from fine_infer.export.engines import plan_runs_on

    if tensorrt_version is None:
        if not record.get("version_compatible"):
            warnings.warn(f"{name}: model.plan runs only on TensorRT {record.get('tensorrt_version')}; pass the "
                          "server's version (--tensorrt-version) to have it checked", stacklevel=3)
        return
    why = plan_runs_on(record, tensorrt_version)
    if why:
        raise ConfigError(f"{name}: the engine will not load on the server's TensorRT {tensorrt_version}: {why}. "
                          "Build it with the server's TensorRT (e.g. inside its container), rebuild with "
                          "`fine-infer build-engine --version-compatible` (then serve with "
                          "--backend-config=tensorrt,version-compatible=true), or pass --no-engines to serve ONNX")


def _engine_records(bundle, variant: str | None) -> dict[str, dict[str, Any]]:
    """graph → the build record (``<engine>.json``) of the engine that would serve it (graphs without one left out).
    An engine without a record counts as built by an unknown TensorRT (``?``)."""
    from fine_infer.bundle.variants import ORT_CPU_ONLY, engine_variant

    if variant in ORT_CPU_ONLY:
        return {}
    key = engine_variant(variant)
    out = {}
    for gname, entry in bundle.manifest.graphs.items():
        if key in entry.variants:
            meta = Path(f"{bundle.file(entry.variants[key])}.json")
            out[gname] = json.loads(meta.read_text()) if meta.is_file() else {"tensorrt_version": "?"}
    return out


def default_prefix(manifest) -> str:
    """Model names start with the arch (``fashion_fine``), or a Hugging Face architecture (``CLIPModel`` → ``clip``)."""
    name = manifest.arch
    if not name:
        arch = str(((manifest.config or {}).get("hf") or {}).get("architecture") or "")
        name = arch[:-5] if arch.endswith("Model") and len(arch) > 5 else arch
    name = re.sub(r"[^A-Za-z0-9_]", "_", (name or "model").lower()).strip("_")
    return name or "model"


def _raw_inputs(spec: GraphSpec, manifest) -> list[str] | None:
    """The raw inputs (``image``, ``text``) a graph's tensors come from, or None when the bundle's preprocessing cannot
    produce them all (an input it does not make, or another dtype than the runtime feeds)."""
    want = {"pixels": "float32", "input_ids": "int64", "attention_mask": "int64"}
    if not spec.inputs or any(want.get(t.name) != t.dtype for t in spec.inputs):
        return None
    raw = sorted({RAW[t.name] for t in spec.inputs}, key=("image", "text").index)
    if "image" in raw and manifest.image is None or "text" in raw and (manifest.text is None or not manifest.tokenizer):
        return None
    return raw


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _plan(b, variant, engines, backend, max_batch_size, records) -> dict[str, dict[str, Any]]:
    """Per graph: the platform, the file that serves it and its max_batch_size."""
    from fine_infer.bundle.variants import ORT_CPU_ONLY, engine_variant, variant_file

    key = None if variant in ORT_CPU_ONLY else engine_variant(variant)
    plan = {}
    for gname, entry in b.manifest.graphs.items():
        mbs = max_batch_size if batched(entry.spec) else 0
        record = None
        if backend == "python":
            if variant not in (None, "fp32", "bf16"):  # bf16 is OpenVINO's precision, not a file
                variant_file(entry, variant)  # a variant the bundle lacks fails here, not when the server loads
            platform, src, fname = "python", None, "model.py"
        elif engines and key in entry.variants:
            platform, src, fname = "tensorrt_plan", b.file(entry.variants[key]), "model.plan"
            record = records.get(gname)
            maxes = [p[2][0] for p in (record or {}).get("profiles", {}).values() if p]
            if maxes and mbs:
                mbs = min(mbs, min(maxes))  # Triton must not batch past the engine's profile
        elif backend == "tensorrt":
            raise ConfigError(f"graph {gname!r} has no TensorRT engine for variant {variant or 'fp32'}: build one "
                              "(fine-infer build-engine) or choose --backend onnxruntime / python")
        else:
            platform, src, fname = "onnxruntime_onnx", b.file(variant_file(entry, variant)), "model.onnx"
        plan[gname] = {"platform": platform, "src": src, "fname": fname, "mbs": mbs, "record": record}
    return plan


def write_triton_repo(
    bundle: str | Path,
    out: str | Path,
    *,
    variant: str | None = None,
    engines: bool = True,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    max_queue_delay_us: int = 100,
    force: bool = False,
    tensorrt_version: str | None = None,
    backend: str | None = None,
    tensors_only: bool = False,
    index: str | Path | None = None,
    k: int = 10,
    instances: int = 1,
    preprocess_instances: int = 1,
    threads: int | None = None,
    prefix: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Write a Triton model repository for ``bundle`` into ``out``; returns per model what it is (``kind``: graph,
    preprocess, ensemble, index) and holds.

    ``backend``: what runs the graphs: ``"tensorrt"`` (the bundle's engines for ``variant``, as
    ``tensorrt_plan``), ``"onnxruntime"`` (the ONNX graph of ``variant``, default the portable fp32 graph, as
    ``onnxruntime_onnx``; ONNX Runtime CPU variants, int8 and cpu-opt, get CPU instances) or ``"python"`` (the
    Python backend running the bundle through :func:`fine_infer.load`: a CPU-only Triton serves the whole
    repository). Default: the engine where the bundle has one and ``engines`` is true, else ONNX Runtime.

    Unless ``tensors_only``, each graph whose inputs the bundle's preprocessing makes gets an ensemble
    ``<prefix>_<graph>_raw`` taking ``text`` / ``image`` (``TYPE_STRING``: UTF-8 text, the encoded image file),
    and ``index`` (a :class:`fine_infer.Index` file) adds a search model and an ensemble
    ``<prefix>_<graph>_search`` per embedding graph (``k`` hits unless a request sends ``k``).
    ``instances``: instances of each graph model; ``preprocess_instances``: of the preprocessing model (each a
    process: the CPU work of decoding images and tokenizing runs in parallel across them); ``threads``: intra-op
    threads of each Python graph instance (default: the runtime's).

    The repository is assembled in a temp folder and moved into place, so a failure leaves ``out`` as it was.
    ``tensorrt_version``: the TensorRT version of the server; an engine that will not run on it raises
    :class:`ConfigError` before anything is written (see :func:`fine_infer.export.engines.plan_runs_on`)."""
    from fine_infer.bundle import read_bundle

    b = read_bundle(bundle)
    m = b.manifest
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    if out.exists() and (not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise ConfigError(f"{out} exists and is not a Triton repository written by fine-infer (no {MARKER} in it); "
                          "refusing to replace it: choose another --out, or remove it yourself")
    if max_batch_size < 0:
        raise ConfigError("max_batch_size must be >= 0")
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "tensorrt" and not engines:
        raise ConfigError("backend 'tensorrt' serves the bundle's engines: drop --no-engines")
    if index is not None and tensors_only:
        raise ConfigError("the search ensembles take raw inputs: --index does not go with --tensors-only")
    if index is not None and not Path(index).is_file():
        raise ConfigError(f"index {index} is not a file")
    if not 1 <= k <= 1000:
        raise ConfigError(f"k must be between 1 and 1000, not {k}")
    if instances < 1 or preprocess_instances < 1:
        raise ConfigError("instances and preprocess_instances must be >= 1")
    if prefix is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", prefix):
        raise ConfigError(f"prefix {prefix!r}: use letters, digits, '_' and '-'")
    prefix = prefix or default_prefix(m)
    use_engines = engines and backend in (None, "tensorrt")
    records = _engine_records(b, variant) if use_engines else {}
    for gname, record in records.items():  # before anything is written
        _check_plan(f"{prefix}_{gname}", record, tensorrt_version)
    plan = _plan(b, variant, use_engines, backend, max_batch_size, records)
    raw = {} if tensors_only else {g: r for g, e in m.graphs.items()
                                   if plan[g]["mbs"] > 0 and (r := _raw_inputs(e.spec, m))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, DIR_MODE)  # mkdtemp creates 0700; the server may run as another user
    try:
        models = _write(tmp, b, prefix, plan, raw, index=Path(index) if index else None, k=k, variant=variant,
                        instances=instances, preprocess_instances=preprocess_instances, threads=threads,
                        max_batch_size=max_batch_size, delay=max_queue_delay_us)
        (tmp / "README.md").write_text(readme(b, prefix, models))
        (tmp / MARKER).write_text("a Triton model repository written by fine-infer triton-repo; --force replaces "
                                  "only folders holding this file\n")
        if out.exists():
            # a fresh name of our own: never a folder someone else may have called ".NAME.old"
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {k_: {kk: vv for kk, vv in v.items() if kk != "spec"} for k_, v in models.items()}


def _write(tmp: Path, b, prefix: str, plan: dict, raw: dict[str, list[str]], *, index: Path | None, k: int,
           variant: str | None, instances: int, preprocess_instances: int, threads: int | None, max_batch_size: int,
           delay: int) -> dict[str, dict[str, Any]]:
    from fine_infer.bundle.variants import ORT_CPU_ONLY

    m = b.manifest
    models: dict[str, dict[str, Any]] = {}
    pre_name = f"{prefix}_preprocess"
    pythons = [g for g, p in plan.items() if p["platform"] == "python"]
    holder = pre_name if raw else (f"{prefix}_{pythons[0]}" if pythons else None)
    bundle_param = f"{holder}/bundle"
    pre = {"image": m.image.to_dict() if m.image else None, "text": m.text.to_dict() if m.text else None,
           "embed_dim": m.embed_dim, "class_labels": m.class_labels}

    # the graphs, tensors in
    for gname, entry in m.graphs.items():
        p, spec, name = plan[gname], entry.spec, f"{prefix}_{gname}"
        d = tmp / name
        (d / "1").mkdir(parents=True)
        if p["platform"] == "python":
            (d / "1" / "model.py").write_text(SHIM)
            params = {"role": "graph", "bundle": bundle_param, "graph": gname}
            if variant:
                params["variant"] = variant
            if threads:
                params["threads"] = str(threads)
            is_batched = p["mbs"] > 0
            config = python_config(name, graph_tensors("input", spec.inputs, is_batched, ragged=True),
                                   graph_tensors("output", spec.outputs, is_batched), params,
                                   max_batch_size=p["mbs"], instances=instances, max_queue_delay_us=delay)
        else:
            shutil.copyfile(p["src"], d / "1" / p["fname"])
            kind = ("KIND_CPU" if variant in ORT_CPU_ONLY else
                    "KIND_GPU" if p["platform"] == "tensorrt_plan" else None)
            config = model_config(name, spec, p["platform"], max_batch_size=p["mbs"], max_queue_delay_us=delay,
                                  instance_kind=kind, instance_count=instances)
        (d / "config.pbtxt").write_text(config)
        (d / "preprocess.json").write_text(json.dumps(pre, indent=2) + "\n")
        if m.tokenizer and any(t.name == "input_ids" for t in spec.inputs):
            shutil.copyfile(b.file(m.tokenizer), d / "tokenizer.json")
        models[name] = {"kind": "graph", "graph": gname, "platform": p["platform"], "file": f"{name}/1/{p['fname']}",
                        "spec": spec, "max_batch_size": p["mbs"]}
        if p["record"] is not None:
            models[name]["tensorrt"] = {k_: p["record"].get(k_) for k_ in (
                "tensorrt_version", "version_compatible", "hardware_compatibility", "gpu", "compute_capability",
                "precision")}

    if holder is not None:
        shutil.copytree(b.path, tmp / holder / "bundle", copy_function=_link_or_copy)
    if not raw:
        return models

    # the preprocessing, shared by the ensembles
    kinds = {r for rs in raw.values() for r in rs}
    pre_mbs = max(plan[g]["mbs"] for g in raw)
    pre_in, pre_out = [], []
    if "image" in kinds:
        pre_in.append(Tensor("image", "TYPE_STRING", (1,), optional=True))
        pre_out.append(Tensor("pixels", "TYPE_FP32", (3, m.image.crop, m.image.crop)))
    if "text" in kinds:
        pre_in.append(Tensor("text", "TYPE_STRING", (1,), optional=True))
        pre_out += [Tensor("input_ids", "TYPE_INT64", (-1,)), Tensor("attention_mask", "TYPE_INT64", (-1,))]
    d = tmp / pre_name
    (d / "1").mkdir(parents=True)
    (d / "1" / "model.py").write_text(SHIM)
    (d / "config.pbtxt").write_text(python_config(
        pre_name, pre_in, pre_out, {"role": "preprocess", "bundle": bundle_param, "backend": "onnxruntime"},
        max_batch_size=pre_mbs, instances=preprocess_instances, max_queue_delay_us=delay))
    models[pre_name] = {"kind": "preprocess", "platform": "python", "inputs": [t.name for t in pre_in],
                        "max_batch_size": pre_mbs, "bundle": f"{holder}/bundle"}

    # the search model, shared by the search ensembles
    index_name, dim = f"{prefix}_index", None
    if index is not None:
        dims_ = {g: dims(m.graphs[g].spec.outputs[0], True) for g in raw if m.graphs[g].spec.task in SEARCH_TASKS}
        dim = m.embed_dim or next((d_[0] for d_ in dims_.values() if len(d_) == 1 and d_[0] > 0), None)
        if dim is None:
            raise ConfigError("--index: the bundle has no embedding graph with a fixed dimension to search with")
        d = tmp / index_name
        (d / "1").mkdir(parents=True)
        (d / "index").mkdir()
        (d / "1" / "model.py").write_text(SHIM)
        _link_or_copy(str(index), str(d / "index" / index.name))
        (d / "config.pbtxt").write_text(python_config(
            index_name, [Tensor("embedding", "TYPE_FP32", (dim,)), Tensor("k", "TYPE_INT32", (1,), optional=True)],
            [Tensor("ids", "TYPE_INT64", (-1,)), Tensor("scores", "TYPE_FP32", (-1,)),
             Tensor("metadata", "TYPE_STRING", (-1,))],
            {"role": "search", "index": f"{index_name}/index/{index.name}", "k": str(k)},
            max_batch_size=max_batch_size, instances=1, max_queue_delay_us=delay))
        models[index_name] = {"kind": "index", "platform": "python", "dim": dim, "k": k,
                              "max_batch_size": max_batch_size, "index": f"{index_name}/index/{index.name}"}

    # the ensembles
    for gname, inputs in raw.items():
        spec, graph_model, mbs = m.graphs[gname].spec, f"{prefix}_{gname}", plan[gname]["mbs"]
        raw_in = [Tensor(r, "TYPE_STRING", (1,)) for r in inputs]
        pre_step = Step(pre_name, {r: r for r in inputs}, {t.name: t.name for t in spec.inputs})
        graph_step = Step(graph_model, {t.name: t.name for t in spec.inputs}, {o.name: o.name for o in spec.outputs})
        name = f"{graph_model}_raw"
        (tmp / name / "1").mkdir(parents=True)
        (tmp / name / "config.pbtxt").write_text(ensemble_config(
            name, raw_in, graph_tensors("output", spec.outputs, True), [pre_step, graph_step], max_batch_size=mbs))
        models[name] = {"kind": "ensemble", "platform": "ensemble", "graph": gname, "task": spec.task,
                        "inputs": inputs, "outputs": [o.name for o in spec.outputs], "max_batch_size": mbs}
        out0 = spec.outputs[0]
        if dim is None or spec.task not in SEARCH_TASKS or len(spec.outputs) != 1 or dims(out0, True) != (dim,):
            continue
        name = f"{graph_model}_search"
        (tmp / name / "1").mkdir(parents=True)
        embed_step = Step(graph_model, graph_step.inputs, {out0.name: "embedding"})
        index_step = Step(index_name, {"embedding": "embedding", "k": "k"},
                          {o: o for o in ("ids", "scores", "metadata")})
        (tmp / name / "config.pbtxt").write_text(ensemble_config(
            name, [*raw_in, Tensor("k", "TYPE_INT32", (1,), optional=True)],
            [Tensor("ids", "TYPE_INT64", (-1,)), Tensor("scores", "TYPE_FP32", (-1,)),
             Tensor("metadata", "TYPE_STRING", (-1,))],
            [pre_step, embed_step, index_step], max_batch_size=min(mbs, max_batch_size)))
        models[name] = {"kind": "ensemble", "platform": "ensemble", "graph": gname, "task": "search",
                        "inputs": [*inputs, "k"], "outputs": ["ids", "scores", "metadata"],
                        "max_batch_size": min(mbs, max_batch_size)}
    return models
