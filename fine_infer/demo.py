"""``fine-infer demo``: the embedded default, end to end in well under a minute on a 2-core CPU.

Exports the tiny Fashion-FINE model to a bundle (every gate runs), draws a small catalogue of garments,
indexes it with ONNX Runtime, runs text→image and image→image searches, and times ONNX Runtime against
PyTorch eager in the same run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from fine_infer.bench import _median_ms

TEXT_QUERIES = ("a red striped dress", "a blue shirt with dots", "a black bag", "green checked trousers")


def latency_table(bundle: Path, pixels: np.ndarray, texts: list[str], batches=(1, 8)) -> list[dict]:
    """Median latency of the image and text graphs, ONNX Runtime vs PyTorch eager, measured in this run."""
    import fine_infer

    ort = fine_infer.load(bundle, backend="onnxruntime", verify=False)
    pt = fine_infer.load(bundle, backend="torch", verify=False)
    ids, mask = ort.tokenize(texts)
    rows = []
    for graph, make in (
        ("image", lambda b: {"pixels": np.resize(pixels, (b, *pixels.shape[1:]))}),
        ("text", lambda b: {"input_ids": np.resize(ids, (b, ids.shape[1])), "attention_mask": np.resize(mask, (b, mask.shape[1]))}),
    ):
        for b in batches:
            feeds = make(b)
            t_ort = _median_ms(lambda: ort.run(graph, feeds))
            t_pt = _median_ms(lambda: pt.run(graph, feeds))
            rows.append({"graph": graph, "batch": b, "onnxruntime_ms": t_ort, "torch_ms": t_pt,
                         "speedup": t_pt / t_ort, "provider": ort.providers.get(graph, "")})
    return rows


def run_demo(workdir: str | Path | None = None, items: int = 48, seed: int = 0) -> int:
    """Run the demo; returns the process exit code (0)."""
    import fine_infer
    from fine_infer.catalogue import generate
    from fine_infer.export import export_arch
    from fine_infer.index import Index
    from fine_infer.models._checkpoint import WEIGHTS_DIR

    t_start = time.perf_counter()
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fine-infer-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = work / "fashion-fine-tiny"
    pretrained = (WEIGHTS_DIR / "fashion-fine-tiny.safetensors").is_file()

    print(f"1. export  fashion-fine (tiny{', pretrained' if pretrained else ', random weights'}) → {bundle}")
    report = export_arch("fashion-fine", bundle, "tiny", pretrained=pretrained, force=True)
    for line in report.summary_lines():
        print("     " + line)

    catalogue = generate(items, seed=seed)
    print(f"2. index   {len(catalogue)} generated catalogue images with ONNX Runtime")
    session = fine_infer.load(bundle)
    vectors = session.embed_images([it.image for it in catalogue])
    index = Index(vectors.shape[1])
    index.add(vectors, [it.id for it in catalogue], metadata=[{"caption": it.caption} for it in catalogue])
    print(f"     providers: {session.providers}")

    print("3. search  text → image (top 3)")
    text_vecs = session.embed_texts(list(TEXT_QUERIES))
    scores, ids = index.search(text_vecs, 3)
    for q, srow, irow in zip(TEXT_QUERIES, scores, ids):
        hits = ", ".join(f"{index.get_metadata(int(i))['caption']} ({s:.2f})" for s, i in zip(srow, irow))
        print(f"     {q!r:<28} → {hits}")
    print("   search  image → image (top 3, the query item itself first)")
    for it in catalogue[:2]:
        s, i = index.search(session.embed_images([it.image]), 3)
        hits = ", ".join(f"#{int(j)} {index.get_metadata(int(j))['caption']} ({v:.2f})" for v, j in zip(s[0], i[0]))
        print(f"     #{it.id} {it.caption!r:<26} → {hits}")
    if not pretrained:
        print("     (random weights: the ranking is not meaningful; pretrained tiny weights make it so)")

    print("4. latency (median ms, same run)")
    pixels = session.preprocess_images([catalogue[0].image])
    rows = latency_table(bundle, pixels, list(TEXT_QUERIES[:1]))
    print(f"     {'graph':<6} {'batch':>5} {'onnxruntime':>12} {'torch eager':>12} {'ratio':>7}")
    for r in rows:
        print(f"     {r['graph']:<6} {r['batch']:>5} {r['onnxruntime_ms']:>12.2f} {r['torch_ms']:>12.2f} "
              f"{r['speedup']:>6.2f}×")
    print(f"done in {time.perf_counter() - t_start:.1f} s; bundle and files in {work}")
    return 0
