"""The README of a Triton repository (:mod:`.triton_repo`): the models, how to start a server and call it, the
preprocessing a client sending tensors must apply, batching and TensorRT plans."""

from __future__ import annotations

from typing import Any

from fine_infer.specs import GraphSpec


def _sig(tensors) -> str:
    return ", ".join(f"`{t.name}` {t.dtype}{list(t.shape)}" for t in tensors)


def readme(bundle, prefix: str, models: dict[str, dict[str, Any]]) -> str:
    m = bundle.manifest
    graphs = {n: i for n, i in models.items() if i["kind"] == "graph"}
    ensembles = {n: i for n, i in models.items() if i["kind"] == "ensemble"}
    pythons = [n for n, i in models.items() if i["platform"] == "python"]
    lines = [
        f"# Triton model repository for `{m.arch or m.source}`" + (f" ({m.preset})" if m.preset else ""),
        "",
        f"Written by `fine-infer triton-repo` from the bundle `{bundle.path.name}`.",
        "",
    ]
    if ensembles:
        lines += ["## Raw inputs in (ensembles)", "",
                  "Send raw inputs; the server runs the bundle's own preprocessing (fine-infer's code), then the graph."
                  " `text`: UTF-8 strings; `image`: the encoded file's bytes (PNG, JPEG, WebP, ...); both BYTES "
                  "(`TYPE_STRING`), shape `[batch, 1]`.", "",
                  "| model | task | inputs | outputs | max batch |", "|---|---|---|---|---|"]
        for n, i in ensembles.items():
            lines.append(f"| `{n}` | {i['task']} | {', '.join(f'`{x}`' for x in i['inputs'])} | "
                         f"{', '.join(f'`{x}`' for x in i['outputs'])} | {i['max_batch_size']} |")
        text_model = next((n for n, i in ensembles.items() if i["inputs"] == ["text"]), None)
        image_model = next((n for n, i in ensembles.items() if "image" in i["inputs"]), None)
        lines += [""]
        if text_model:
            lines += ["Text, with curl (KServe v2 JSON):", "",
                      f"    curl -s localhost:8000/v2/models/{text_model}/infer -d '{{\"inputs\": [{{\"name\": \"text\", "
                      "\"shape\": [1, 1], \"datatype\": \"BYTES\", \"data\": [\"a red striped dress\"]}]}'", ""]
        if image_model:
            inputs = ensembles[image_model]["inputs"]
            example = {"image": 'open("query.jpg", "rb").read()', "text": '"with long sleeves"'}
            lines += ["Image bytes (binary data: use tritonclient, HTTP or gRPC):", "",
                      "    import numpy as np, tritonclient.http as http",
                      "    client = http.InferenceServerClient(\"localhost:8000\")",
                      "    inputs = []"]
            for x in inputs:
                lines += [f"    inputs.append(http.InferInput(\"{x}\", [1, 1], \"BYTES\"))",
                          f"    inputs[-1].set_data_from_numpy(np.array([[{example[x]}]], dtype=object))"]
            lines += [f"    result = client.infer(\"{image_model}\", inputs)", ""]
        if any(i["task"] == "search" for i in ensembles.values()):
            idx = models[f"{prefix}_index"]
            lines += [f"Search ensembles answer the top `k` (default {idx['k']}; send an INT32 `k` [batch, 1] for "
                      "another) as `ids` int64, `scores` float32 and `metadata` (one JSON document per hit), best "
                      "first, from the index in `" + idx["index"] + "`.", ""]
    container = ("    docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD:/models "
                 "nvcr.io/nvidia/tritonserver:24.10-py3 \\\n        ")
    lines += ["## Starting the server", ""]
    if pythons:
        bundle_dir = next((i["bundle"] for i in models.values() if i.get("bundle")), None)
        lines += [f"The Python-backend models ({', '.join(f'`{n}`' for n in pythons)}) run fine-infer's code "
                  "(`fine_infer.serve.triton_model`): the server's Python needs fine-infer installed. "
                  + (f"They serve the copy of the bundle in `{bundle_dir}` and verify its checksums when they load."
                     if bundle_dir else ""), "",
                  "NVIDIA's container, with fine-infer installed in it (here from its source folder):", "",
                  container.replace("-v $PWD:/models", "-v $PWD:/models -v /path/to/fine-infer:/src")
                  + "sh -c 'pip install /src && tritonserver --model-repository=/models'", ""]
    else:
        lines += ["NVIDIA's container:", "", container + "tritonserver --model-repository=/models", ""]
    if not any(i["platform"] in ("onnxruntime_onnx", "tensorrt_plan") for i in graphs.values()):
        lines += ["Or on a CPU box, with the tritonserver binary of the `nvidia-pytriton` wheel (only the Python "
                  "backend: what this repository needs) and a launcher that sets up its Python backend stub:", "",
                  "    pip install --no-deps nvidia-pytriton",
                  '    pip install --no-deps --target "$VIRTUAL_ENV/triton-stub-packages" "numpy<2"   # with numpy 2: '
                  "the stub reads numpy 1 arrays",
                  "    python -m fine_infer.serve.triton_server $PWD --http-port 8000", ""]
    lines += ["## Graph models (tensors in)", "", "| model | graph | task | platform | file | max batch | inputs → outputs |",
              "|---|---|---|---|---|---|---|"]
    for name, info in graphs.items():
        spec: GraphSpec = info["spec"]
        row = [f"`{name}`", spec.name, spec.task, info["platform"], info["file"], str(info["max_batch_size"]),
               f"{_sig(spec.inputs)} → {_sig(spec.outputs)}"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Preprocessing (clients sending tensors to a graph model)", ""]
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
        clean = (f" after the bundle's text cleaning (`{t.clean}`)" if t.clean else "") + (
            f" and template (`{t.template}`)" if t.template else "")
        lines += [
            f"- **Text** → `input_ids`, `attention_mask` int64 (batch, sequence): tokenize with `tokenizer.json` "
            f"(the `tokenizers` library; {t.tokenizer}, {'lowercased' if t.lowercase else 'case kept'}){clean}, at "
            f"most {t.max_length} tokens, {pad} with id {t.pad_id}; the mask is 1 on real tokens, 0 on padding.",
        ]
    if m.embed_dim:
        lines += [f"- **Outputs**: embeddings are L2-normalised float32 rows of dimension {m.embed_dim}; "
                  "score by dot product."]
    if m.class_labels:
        lines += ["- **Outputs**: one logit tensor per attribute; labels are in `preprocess.json` (`class_labels`)."]
    lines += [
        "",
        "Each graph model folder holds `preprocess.json` (the bundle manifest's preprocessing) and, for text models, "
        "the `tokenizer.json` to use. The raw-input ensembles do all of this on the server.",
        "",
        "## Batching",
        "",
        "Every model batches dynamically up to its `max_batch_size`. Triton merges requests of an ONNX Runtime or "
        "TensorRT graph only when their non-batch dimensions agree (pad text to a fixed length to batch text "
        "requests together); a Python graph model takes them ragged and pads them itself.",
        "A `model.plan` is a TensorRT engine: it runs only on the TensorRT version and GPU architecture it was built "
        "with (`fine-infer build-engine` on the serving device) unless it was built `--version-compatible` / "
        "`--hardware-compatible`, and its `max_batch_size` is the profile's maximum.",
        "",
    ]
    plans = {n: i["tensorrt"] for n, i in graphs.items() if i.get("tensorrt")}
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
