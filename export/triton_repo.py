"""An NVIDIA Triton Inference Server model repository from a bundle (``--triton-repo DIR``).

One Triton model per graph, named ``<arch>_<graph>``:

    DIR/
      README.md                     how to serve it, and the preprocessing clients must apply
      maaf_compose/
        config.pbtxt                platform, inputs/outputs with dims, max_batch_size, dynamic_batching
        1/model.onnx | model.plan   the graph (onnxruntime_onnx) or the bundle's TensorRT engine (tensorrt_plan)
        preprocess.json             the bundle manifest's image/text preprocessing
        tokenizer.json              for graphs that take text

Configs follow Triton's model configuration schema (``model_config.proto``): with ``max_batch_size > 0`` the batch
dimension is implicit and left out of ``dims``; other dynamic dimensions are ``-1``. ``dynamic_batching`` lets Triton
merge concurrent requests up to ``max_batch_size`` (requests are merged only when their non-batch shapes agree, so
text graphs batch best with the bundle's fixed padding length). A TensorRT plan's ``max_batch_size`` is capped at the
batch its optimisation profile was built for. Preprocessing (resize, normalisation, tokenisation) stays on the
client, exactly as the manifest describes; the README spells it out.

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
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

from fine_infer._atomic import DIR_MODE
from fine_infer.errors import ConfigError
from fine_infer.specs import GraphSpec, TensorSpec

TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
DEFAULT_MAX_BATCH = 16
DEFAULT_PREFERRED = (4, 8, 16)


def _batched(spec: GraphSpec) -> bool:
    """Triton's implicit batch dimension applies when every input and output has ``batch`` as its first axis."""
    return all(t.shape and t.shape[0] == "batch" for t in (*spec.inputs, *spec.outputs))


def _dims(t: TensorSpec, batched: bool) -> list[int]:
    shape = t.shape[1:] if batched else t.shape
    return [d if isinstance(d, int) else -1 for d in shape]


def _tensor_block(kind: str, tensors: Sequence[TensorSpec], batched: bool) -> str:
    items = []
    for t in tensors:
        if t.dtype not in TRITON_TYPES:
            raise ConfigError(f"{kind} {t.name!r} has dtype {t.dtype}, which Triton does not take")
        items.append(f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_TYPES[t.dtype]}\n'
                     f'    dims: [ {", ".join(str(d) for d in _dims(t, batched))} ]\n  }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def model_config(
    name: str,
    spec: GraphSpec,
    platform: str,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH,
    preferred_batch_sizes: Sequence[int] = DEFAULT_PREFERRED,
    max_queue_delay_us: int = 100,
    instance_kind: str | None = None,
) -> str:
    """The ``config.pbtxt`` text of one model (protobuf text format of Triton's ``ModelConfig``)."""
    if platform not in ("onnxruntime_onnx", "tensorrt_plan"):
        raise ConfigError(f"unsupported Triton platform {platform!r}")
    batched = _batched(spec) and max_batch_size > 0
    out = [f'name: "{name}"\n', f'platform: "{platform}"\n', f"max_batch_size: {max_batch_size if batched else 0}\n"]
    out.append(_tensor_block("input", spec.inputs, batched))
    out.append(_tensor_block("output", spec.outputs, batched))
    if batched:
        preferred = sorted({b for b in preferred_batch_sizes if 1 < b <= max_batch_size})
        pref = f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n" if preferred else ""
        out.append(f"dynamic_batching {{\n{pref}  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n}}\n")
    if instance_kind:
        out.append(f"instance_group [\n  {{\n    count: 1\n    kind: {instance_kind}\n  }}\n]\n")
    return "".join(out)


def _readme(bundle, models: dict[str, dict[str, Any]]) -> str:
    m = bundle.manifest
    lines = [
        f"# Triton model repository for `{m.arch or m.source}`" + (f" ({m.preset})" if m.preset else ""),
        "",
        f"Written by `fine-infer triton-repo` from the bundle `{bundle.path.name}`. Serve it with NVIDIA Triton "
        "Inference Server:",
        "",
        "    tritonserver --model-repository=$PWD",
        "",
        "| model | graph | task | platform | file | inputs → outputs |",
        "|---|---|---|---|---|---|",
    ]
    for name, info in models.items():
        spec: GraphSpec = info["spec"]
        sig = ", ".join(f"`{t.name}` {t.dtype}{list(t.shape)}" for t in spec.inputs)
        outs = ", ".join(f"`{t.name}` {t.dtype}{list(t.shape)}" for t in spec.outputs)
        row = [f"`{name}`", spec.name, spec.task, info["platform"], info["file"], f"{sig} → {outs}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Preprocessing (done by the client)", ""]
    if m.image:
        i = m.image
        how = (f"resize to {i.size}×{i.size} (aspect ratio not kept)" if i.resize == "exact"
               else f"resize the shorter side to {i.size}, centre-crop {i.crop}×{i.crop}")
        lines += [
            f"- **Images** → `pixels` float32 (batch, 3, {i.crop}, {i.crop}): decode to RGB, {how} with "
            f"{i.interpolation} interpolation, scale to [0, 1], subtract mean {list(i.mean)} and divide by std "
            f"{list(i.std)} per channel, channels first.",
        ]
    if m.text:
        t = m.text
        pad = f"pad every batch to {t.max_length} tokens" if t.padding == "max_length" else "pad to the longest text"
        lines += [
            f"- **Text** → `input_ids`, `attention_mask` int64 (batch, sequence): tokenize with `tokenizer.json` "
            f"(the `tokenizers` library; {t.tokenizer}, {'lowercased' if t.lowercase else 'case kept'}), at most "
            f"{t.max_length} tokens, {pad} with id {t.pad_id}; the mask is 1 on real tokens, 0 on padding.",
        ]
    if m.embed_dim:
        lines += [f"- **Outputs**: embeddings are L2-normalised float32 rows of dimension {m.embed_dim}; "
                  "score by dot product."]
    if m.class_labels:
        lines += ["- **Outputs**: one logit tensor per attribute; labels are in `preprocess.json` (`class_labels`)."]
    lines += [
        "",
        "Each model folder holds `preprocess.json` (the bundle manifest's preprocessing) and, for text models, the "
        "`tokenizer.json` to use.",
        "",
        "## Batching",
        "",
        "`dynamic_batching` merges concurrent requests up to `max_batch_size`. Triton merges only requests whose "
        "non-batch dimensions agree, so pad text to a fixed length to batch text requests together.",
        "A `model.plan` is a TensorRT engine: it runs only on the TensorRT version and GPU architecture it was built "
        "with (`fine-infer build-engine` on the serving device) unless it was built `--version-compatible` / "
        "`--hardware-compatible`, and its `max_batch_size` is the profile's maximum.",
        "",
    ]
    plans = {n: i["tensorrt"] for n, i in models.items() if i.get("tensorrt")}
    if plans:
        lines += ["## TensorRT plans", "", "| model | built with | version-compatible | hardware-compatible | GPU |",
                  "|---|---|---|---|---|"]
        for n, r in plans.items():
            lines.append(f"| `{n}` | TensorRT {r.get('tensorrt_version')} | "
                         f"{'yes' if r.get('version_compatible') else 'no'} | "
                         f"{r.get('hardware_compatibility', 'none')} | "
                         f"{r.get('gpu')} (sm {r.get('compute_capability')}) |")
        lines.append("")
        if any(r.get("version_compatible") for r in plans.values()):
            lines += ["Version-compatible plans embed TensorRT's lean runtime: start the server with",
                      "", "    tritonserver --model-repository=$PWD --backend-config=tensorrt,version-compatible=true",
                      ""]
    return "\n".join(lines)


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
) -> dict[str, dict[str, Any]]:
    """Write a Triton model repository for every graph of ``bundle`` into ``out``; returns per model what it holds.

    Each graph is served by its TensorRT engine (``tensorrt_plan``) when the bundle has one for ``variant`` and
    ``engines`` is true, else by the ONNX graph of ``variant`` (default: the portable fp32 graph) on
    ``onnxruntime_onnx``; ONNX Runtime CPU variants (int8, cpu-opt) get a CPU instance group. The repository is
    assembled in a temp folder and moved into place, so a failure leaves ``out`` as it was.

    ``tensorrt_version``: the TensorRT version of the server; an engine that will not run on it raises
    :class:`ConfigError` before anything is written (see :func:`fine_infer.export.engines.plan_runs_on`)."""
    from fine_infer.bundle import read_bundle
    from fine_infer.bundle.variants import ORT_CPU_ONLY, engine_variant, variant_file

    b = read_bundle(bundle)
    m = b.manifest
    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    if out.exists() and any(out.iterdir()) and not (out / "README.md").is_file():
        raise ConfigError(f"{out} exists and is not a Triton repository written by fine-infer; refusing to replace it")
    if max_batch_size < 0:
        raise ConfigError("max_batch_size must be >= 0")
    records = _engine_records(b, variant) if engines else {}
    prefix = (m.arch or "model").replace("-", "_")
    for gname, record in records.items():  # before anything is written
        _check_plan(f"{prefix}_{gname}", record, tensorrt_version)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    os.chmod(tmp, DIR_MODE)  # mkdtemp creates 0700; the server may run as another user
    models: dict[str, dict[str, Any]] = {}
    try:
        pre = {"image": m.image.to_dict() if m.image else None, "text": m.text.to_dict() if m.text else None,
               "embed_dim": m.embed_dim, "class_labels": m.class_labels}
        for gname, entry in m.graphs.items():
            name = f"{prefix}_{gname}"
            key = None if variant in ORT_CPU_ONLY else engine_variant(variant)
            use_engine = engines and key in entry.variants
            mbs = max_batch_size
            record = records.get(gname) if use_engine else None
            if use_engine:
                src, fname, platform = b.file(entry.variants[key]), "model.plan", "tensorrt_plan"
                maxes = [p[2][0] for p in (record or {}).get("profiles", {}).values() if p]
                if maxes and _batched(entry.spec):
                    mbs = min(mbs, min(maxes))  # Triton must not batch past the engine's profile
            else:
                src = b.file(variant_file(entry, variant))
                fname, platform = "model.onnx", "onnxruntime_onnx"
            d = tmp / name
            (d / "1").mkdir(parents=True)
            shutil.copyfile(src, d / "1" / fname)
            kind = "KIND_CPU" if variant in ORT_CPU_ONLY else None
            (d / "config.pbtxt").write_text(model_config(name, entry.spec, platform, max_batch_size=mbs,
                                                         max_queue_delay_us=max_queue_delay_us, instance_kind=kind))
            (d / "preprocess.json").write_text(json.dumps(pre, indent=2) + "\n")
            if m.tokenizer and any(t.name == "input_ids" for t in entry.spec.inputs):
                shutil.copyfile(b.file(m.tokenizer), d / "tokenizer.json")
            models[name] = {"graph": gname, "platform": platform, "file": f"{name}/1/{fname}", "spec": entry.spec,
                            "max_batch_size": mbs if _batched(entry.spec) else 0}
            if record is not None:
                models[name]["tensorrt"] = {k: record.get(k) for k in (
                    "tensorrt_version", "version_compatible", "hardware_compatibility", "gpu", "compute_capability",
                    "precision")}
        (tmp / "README.md").write_text(_readme(b, models))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {k: {kk: vv for kk, vv in v.items() if kk != "spec"} for k, v in models.items()}
