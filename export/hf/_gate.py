"""The source-parity gate: the sealed bundle, fed through its own tokenizer and image preprocessing (the functions the
runtime calls), against the source library itself (sentence-transformers ``encode``, transformers
``get_text_features``/``get_image_features``) on fresh seeded texts and images."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fine_infer.bundle import read_manifest
from fine_infer.compare import Tolerance
from fine_infer.export.gates import GraphJob, Sample, compare_runs, fresh_seed, ort_cpu_runner, summarize
from fine_infer.export.hf._inputs import sample_images, sample_texts, text_feeds
from fine_infer.preprocess import preprocess_images
from fine_infer.tokenization import load_tokenizer

CHUNKS = (1, 3, 8)  # batch sizes of the first chunks; the rest is one more batch


def _chunks(items: Sequence[Any]) -> list[list[Any]]:
    out, i = [], 0
    for n in CHUNKS:
        if i < len(items):
            out.append(list(items[i : i + n]))
            i += n
    if i < len(items):
        out.append(list(items[i:]))
    return out


class SourceParity:
    """A :class:`~fine_infer.export.report.SealedCheck` named ``source_parity``: ``embed_text(texts)`` /
    ``embed_image(images)`` (the source library, L2-normalised) against the bundle's graphs fed by its tokenizer and
    preprocessing, on ``texts`` texts within the token limit plus ``over`` past it (truncated) and ``images`` random
    images of varied size, aspect and mode, in batches of 1, 3, 8 and the rest; decided with
    :func:`~fine_infer.export.gates.compare_runs` over every row."""

    name = "source_parity"

    def __init__(self, label: str, embed_text, embed_image, tolerance: Tolerance, *, texts: int = 24, over: int = 4,
                 images: int = 8, seed: int | None = None) -> None:
        self.label, self.embed_text, self.embed_image, self.tolerance = label, embed_text, embed_image, tolerance
        self.texts, self.over, self.images, self.seed = texts, over, images, seed

    def _gate(self, spec, run, samples: list[Sample], seed: int) -> tuple[dict[str, Any], str]:
        rows, reason = compare_runs(run, GraphJob(spec, None, None), samples, self.tolerance, seed, label=self.label)
        return {"passed": not reason, "rows": sum(s.batch for s in samples),
                **summarize([r for r in rows if r["batch"] == "all"])}, reason

    def __call__(self, model: Any, bundle: Path, variants: Sequence[str]) -> dict[str, Any]:
        m = read_manifest(bundle)
        seed = fresh_seed() if self.seed is None else self.seed
        rng = np.random.default_rng(seed)
        graphs: dict[str, Any] = {}
        reasons: list[str] = []
        tasks = {g.spec.task: g for g in m.graphs.values()}
        if self.embed_text is not None and self.texts + self.over > 0:
            entry = tasks["embed_text"]
            tok = load_tokenizer(bundle / m.tokenizer)
            texts = sample_texts(rng, self.texts, tok, m.text.max_length, over=self.over)
            texts = [texts[i] for i in rng.permutation(len(texts))]
            run = ort_cpu_runner(bundle / entry.file)
            samples = [Sample(len(c), None, {"texts": np.array(c, dtype=object)}, [self.embed_text(c)])
                       for c in _chunks(texts)]
            graphs[entry.spec.name], reason = self._gate(
                entry.spec, lambda feeds: run(text_feeds(tok, m.text, list(feeds["texts"]))), samples, seed)
            graphs[entry.spec.name].update(texts=len(texts), past_limit=self.over, max_length=m.text.max_length)
            reasons += [reason] if reason else []
        if self.embed_image is not None and self.images > 0:
            entry = tasks["embed_image"]
            images = sample_images(rng, self.images, m.image.size)
            run_img = ort_cpu_runner(bundle / entry.file)
            chunks = _chunks(list(range(len(images))))
            samples = [Sample(len(c), None, {"index": np.array(c)}, [self.embed_image([images[i] for i in c])])
                       for c in chunks]
            graphs[entry.spec.name], reason = self._gate(
                entry.spec, lambda feeds: run_img({"pixels": preprocess_images([images[i] for i in feeds["index"]],
                                                                               m.image)}), samples, seed)
            graphs[entry.spec.name].update(images=len(images))
            reasons += [reason] if reason else []
        figures = "; ".join(f"{name} max abs {g.get('max_abs', float('nan')):.2e} min cos "
                            f"{g.get('min_cosine', float('nan')):.7f} ({g['rows']} rows)" for name, g in graphs.items())
        return {"passed": not reasons, "reason": "; ".join(reasons), "seed": seed, "library": self.label,
                "tolerance": {"atol": self.tolerance.atol, "min_topk": self.tolerance.min_topk}, "graphs": graphs,
                "line": f"source parity vs {self.label} (seed {seed}): {figures}"}
