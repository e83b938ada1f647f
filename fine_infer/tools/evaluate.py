"""Retrieval and classification quality on the generated catalogue's held-out split, after the papers' protocols.

The same numbers come from a PyTorch :class:`fine_infer.models.ZooModel` (:func:`evaluate_model`) and from an
exported bundle run by a :class:`fine_infer.runtime.Session` (:func:`evaluate_bundle`): both see the same pixels
(:func:`fine_infer.preprocess.preprocess_images` with the model's or the manifest's preprocessing) and the same
token ids, so any gap is the exported graph's. The ONNX Runtime path imports no torch.

The evaluation set is :func:`fine_infer.tools.catalogue.held_out_split` (``n`` items from id 1,000,000 of the catalogue
with seed ``seed``, drawn at 96 px); no training image is among them. Metrics are fractions in [0, 1]:

- **Text ↔ image (FashionGen protocol, Fashion-FINE)**: each held-out item's caption is a query against its own
  image plus 100 negative images (``t2i_r1/5/10``), and each image a query against its caption plus 100 negative
  captions (``i2t_r1/5/10``). Negatives are drawn (seeded) from the held-out items whose ``(category, colour,
  pattern)`` differs from the query's: an item with the same attributes would be a second correct answer.
- **Composed retrieval (FashionIQ protocol, MAAF and RAF)**: :func:`fine_infer.tools.catalogue.composed_pairs` gives one
  (reference image, relative caption, target) query per held-out item; the gallery is every held-out image except
  the reference; Recall@K (``composed_r1/10/50``) counts a query as a hit when its exact target item ranks in the
  top K. Only the target counts, as in FashionIQ, even though another item may share the target's attributes.
- **Image retrieval (triplet)**: each held-out image queries the other held-out images; a result is relevant when it
  has the query's category, colour *and* pattern (the same product drawn with other jitter). ``image_r1/10``: the
  fraction of queries with a relevant result in the top K, over queries that have one in the gallery.
- **Attributes**: accuracy of each head on the held-out items (``acc_category``, ``acc_colour``, ``acc_pattern``)
  and their mean ``acc_mean``.

:func:`recall_at_10` is the headline number of an arch (the one the export recall gate compares): ``t2i_r10``,
``composed_r10``, ``image_r10``, or ``acc_mean`` for the attribute classifier, which has no recall.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fine_infer.tools.catalogue import CATEGORIES, COLOURS, PATTERNS, CatalogueItem, attribute_key, composed_pairs
from fine_infer.errors import ConfigError

DEFAULT_N = 1000  # held-out items
DEFAULT_SEED = 0  # catalogue seed (the training split is drawn from the same catalogue)
IMAGE_SIZE = 96  # catalogue render size; each model's preprocessing resizes from it
N_NEGATIVES = 100  # FashionGen: 1 positive + 100 candidates
BATCH = 256

HEADLINE: dict[str, str] = {
    "fashion-fine": "t2i_r10",
    "maaf": "composed_r10",
    "raf": "composed_r10",
    "triplet": "image_r10",
    "attributes": "acc_mean",
}


@dataclass
class EvalReport:
    """Metrics of one model or bundle on the held-out split; ``source`` says what ran (``pytorch``,
    ``onnxruntime``, ``onnxruntime/fp16``…)."""

    arch: str
    source: str
    metrics: dict[str, float]
    n: int
    seed: int
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> float:
        """The arch's headline metric (see :data:`HEADLINE`)."""
        return self.metrics[HEADLINE[self.arch]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self) | {"headline": HEADLINE[self.arch]}


# --- encoders: one interface over a torch model and a bundle session ---------------------------------------------
class _Encoder:
    """What the protocols need: the arch, its task → graph map, preprocessing, tokenisation and ``run``."""

    arch: str
    source: str
    graphs: dict[str, str]  # task → graph name
    class_labels: dict[str, list[str]] | None

    def pixels(self, images: Sequence[Any]) -> np.ndarray:
        raise NotImplementedError  # abstract

    def tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError  # abstract

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError  # abstract


class _ModelEncoder(_Encoder):
    def __init__(self, model) -> None:
        import torch

        from fine_infer.tokenization import encode

        self._torch = torch
        self._encode = encode
        self.model = model.eval()
        self.arch = model.arch
        self.source = "pytorch"
        self.graphs = {spec.task: name for name, spec in model.graphs().items()}
        self.class_labels = model.class_labels
        self._tokenizer = model.build_tokenizer()
        self._modules: dict[str, Any] = {}

    def pixels(self, images: Sequence[Any]) -> np.ndarray:
        from fine_infer.preprocess import preprocess_images

        return preprocess_images(images, self.model.image_preprocess)

    def tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self._encode(self._tokenizer, texts, self.model.text_preprocess)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        spec = self.model.graph(graph)
        module = self._modules.setdefault(graph, self.model.graph_module(graph).eval())
        with torch.inference_mode():
            out = module(*[torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in spec.inputs])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {t.name: o.float().numpy() for t, o in zip(spec.outputs, outs)}


class _SessionEncoder(_Encoder):
    def __init__(self, session) -> None:
        m = session.manifest
        if not m.arch or m.arch not in HEADLINE:
            raise ConfigError(f"bundle {session.bundle.path} is not a zoo arch ({m.arch or m.source}); "
                              "the catalogue evaluation needs one of " + ", ".join(HEADLINE))
        self.session = session
        self.arch = m.arch
        variant = getattr(session, "variant", None) or "fp32"
        self.source = session.backend + ("" if variant == "fp32" else f"/{variant}")
        self.graphs = {entry.spec.task: name for name, entry in m.graphs.items()}
        self.class_labels = m.class_labels

    def pixels(self, images: Sequence[Any]) -> np.ndarray:
        return self.session.preprocess_images(images)

    def tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.session.tokenize(texts)

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session.run(graph, feeds)


def _graph(enc: _Encoder, task: str) -> str:
    if task not in enc.graphs:
        raise ConfigError(f"{enc.arch} ({enc.source}) has no {task!r} graph; it has {', '.join(enc.graphs.values())}")
    return enc.graphs[task]


def _embed(enc: _Encoder, task: str, images: Sequence[Any] | None = None, texts: Sequence[str] | None = None) -> np.ndarray:
    """Run ``task`` over images and/or texts in chunks of :data:`BATCH`; returns the single output stacked."""
    graph = _graph(enc, task)
    n = len(images) if images is not None else len(texts)
    out = []
    for s in range(0, n, BATCH):
        feeds: dict[str, np.ndarray] = {}
        if images is not None:
            feeds["pixels"] = enc.pixels(images[s:s + BATCH])
        if texts is not None:
            feeds["input_ids"], feeds["attention_mask"] = enc.tokens(texts[s:s + BATCH])
        result = enc.run(graph, feeds)
        out.append(result if task == "classify" else next(iter(result.values())))
    if task == "classify":
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}  # type: ignore[return-value]
    return np.concatenate(out).astype(np.float32)


# --- metrics (numpy; no model) -----------------------------------------------------------------------------------
def ranks_of_positive(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per row, the 0-based rank of column ``positive[i]``: how many columns score strictly higher."""
    pos = scores[np.arange(len(scores)), positive]
    return (scores > pos[:, None]).sum(axis=1)


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose rank is below each K."""
    return {k: float((ranks < k).mean()) for k in ks}


def _key_ids(items: Sequence[CatalogueItem]) -> np.ndarray:
    keys = {k: i for i, k in enumerate(sorted({attribute_key(it) for it in items}))}
    return np.array([keys[attribute_key(it)] for it in items])


def fashiongen_candidates(keys: np.ndarray, seed: int, n_negatives: int = N_NEGATIVES) -> np.ndarray:
    """Per query ``i``: ``[i, n_negatives distinct items whose key differs from keys[i]]`` (the positive first)."""
    rng = np.random.default_rng([seed, 101])
    out = np.empty((len(keys), n_negatives + 1), dtype=np.int64)
    for i, k in enumerate(keys):
        pool = np.flatnonzero(keys != k)
        if len(pool) < n_negatives:
            raise ConfigError(f"the FashionGen protocol needs {n_negatives} negatives per query; use more items")
        out[i, 0] = i
        out[i, 1:] = rng.choice(pool, n_negatives, replace=False)
    return out


def text_image_metrics(image_emb: np.ndarray, text_emb: np.ndarray, keys: np.ndarray, seed: int) -> dict[str, float]:
    """FashionGen R@1/5/10 with 1 positive + 100 candidates, text→image and image→text (see the module docstring)."""
    cand = fashiongen_candidates(keys, seed)
    zero = np.zeros(len(cand), dtype=np.int64)
    t2i = np.einsum("qd,qcd->qc", text_emb, image_emb[cand])
    i2t = np.einsum("qd,qcd->qc", image_emb, text_emb[cand])
    out = {}
    for name, scores in (("t2i", t2i), ("i2t", i2t)):
        for k, v in recall_from_ranks(ranks_of_positive(scores, zero), (1, 5, 10)).items():
            out[f"{name}_r{k}"] = v
    return out


def composed_metrics(query_emb: np.ndarray, gallery_emb: np.ndarray, refs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """FashionIQ Recall@1/10/50: each query's reference image is removed from the gallery; only the target counts."""
    scores = query_emb @ gallery_emb.T
    scores[np.arange(len(refs)), refs] = -np.inf
    ranks = ranks_of_positive(scores, targets)
    return {f"composed_r{k}": v for k, v in recall_from_ranks(ranks, (1, 10, 50)).items()}


def image_retrieval_metrics(emb: np.ndarray, keys: np.ndarray, ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Image→image Recall@K: a hit when a result with the query's key is in the top K (the query itself removed);
    queries without another item of their key are left out."""
    scores = emb @ emb.T
    np.fill_diagonal(scores, -np.inf)
    relevant = keys[:, None] == keys[None, :]
    np.fill_diagonal(relevant, False)
    has = relevant.any(axis=1)
    best = np.where(relevant, scores, -np.inf).max(axis=1)  # the best-scored relevant item decides the hit
    ranks = (scores > best[:, None]).sum(axis=1)[has]
    return {f"image_r{k}": v for k, v in recall_from_ranks(ranks, ks).items()}


def attribute_metrics(logits: dict[str, np.ndarray], items: Sequence[CatalogueItem]) -> dict[str, float]:
    """Accuracy per attribute head (``acc_<head>``) and their mean ``acc_mean``."""
    truth = {"category": (CATEGORIES, "category"), "colour": (COLOURS, "colour"), "pattern": (PATTERNS, "pattern")}
    out = {}
    for name, z in logits.items():
        if name not in truth:
            continue
        labels, attr = truth[name]
        y = np.array([labels.index(getattr(it, attr)) for it in items])
        out[f"acc_{name}"] = float((z.argmax(axis=1) == y).mean())
    if not out:
        raise ConfigError(f"no head of {sorted(logits)} is a catalogue attribute (category, colour, pattern)")
    out["acc_mean"] = float(np.mean(list(out.values())))
    return out


# --- protocols over an encoder ----------------------------------------------------------------------------------
def held_out_items(n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> list[CatalogueItem]:
    """The evaluation items: the held-out split of the catalogue with ``seed`` (rendered once per process)."""
    from fine_infer.tools.catalogue import HELD_OUT_START, generate

    key = (n, seed)
    if key not in _ITEMS:
        _ITEMS.clear()
        _ITEMS[key] = generate(n, seed, IMAGE_SIZE, start=HELD_OUT_START)
    return _ITEMS[key]


_ITEMS: dict[tuple[int, int], list[CatalogueItem]] = {}


def _metrics(enc: _Encoder, items: Sequence[CatalogueItem], seed: int) -> dict[str, float]:
    images = [it.image for it in items]
    keys = _key_ids(items)
    if enc.arch == "fashion-fine":
        return text_image_metrics(_embed(enc, "embed_image", images), _embed(enc, "embed_text", texts=[it.caption for it in items]),
                                  keys, seed)
    if enc.arch in ("maaf", "raf"):
        index = {it.id: i for i, it in enumerate(items)}
        pairs = composed_pairs(items, seed=seed)
        refs = np.array([index[a] for a, _, _ in pairs])
        targets = np.array([index[b] for _, b, _ in pairs])
        query = _embed(enc, "compose", [images[i] for i in refs], [t for _, _, t in pairs])
        return composed_metrics(query, _embed(enc, "embed_image", images), refs, targets)
    if enc.arch == "triplet":
        return image_retrieval_metrics(_embed(enc, "embed_image", images), keys)
    if enc.arch == "attributes":
        return attribute_metrics(_embed(enc, "classify", images), items)  # type: ignore[arg-type]
    raise ConfigError(f"no catalogue protocol for arch {enc.arch!r}; known: {', '.join(HEADLINE)}")


def _evaluate(enc: _Encoder, n: int, seed: int) -> EvalReport:
    t0 = time.perf_counter()
    items = held_out_items(n, seed)
    metrics = _metrics(enc, items, seed)
    return EvalReport(enc.arch, enc.source, metrics, n, seed, time.perf_counter() - t0)


def evaluate_model(model, *, n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> EvalReport:
    """Evaluate a PyTorch zoo model (:class:`fine_infer.models.ZooModel`, put in eval mode) on the held-out split."""
    return _evaluate(_ModelEncoder(model), n, seed)


def evaluate_bundle(
    bundle, *, backend: str = "auto", variant: str | None = None, n: int = DEFAULT_N, seed: int = DEFAULT_SEED
) -> EvalReport:
    """Evaluate an exported bundle (a path, or an open :class:`fine_infer.runtime.Session`) on the held-out split.

    ``backend`` and ``variant`` (e.g. ``"fp16"``) are passed to :func:`fine_infer.load` when a path is given."""
    return _evaluate(_SessionEncoder(_session(bundle, backend, variant)), n, seed)


def _session(bundle, backend: str = "auto", variant: str | None = None):
    if isinstance(bundle, (str, Path)):
        import fine_infer

        kwargs = {"variant": variant} if variant not in (None, "fp32") else {}
        return fine_infer.load(bundle, backend=backend, **kwargs)
    if variant not in (None, "fp32", getattr(bundle, "variant", "fp32")):
        raise ConfigError(f"variant {variant!r} asked for, but the session given runs {getattr(bundle, 'variant', 'fp32')!r}")
    return bundle


def evaluate_reference(bundle, *, n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> EvalReport:
    """Evaluate the bundle's own PyTorch model (rebuilt from its config and ``weights.safetensors``)."""
    from fine_infer.runtime.torch_runner import model_from_bundle

    session = _session(bundle)
    return evaluate_model(model_from_bundle(session.bundle), n=n, seed=seed)


def recall_at_10(model_or_session, arch: str | None = None, *, n: int = DEFAULT_N, seed: int = DEFAULT_SEED) -> float:
    """The headline metric (:data:`HEADLINE`) of a ZooModel, a Session or a bundle path on the held-out split:
    text→image R@10 (fashion-fine), composed R@10 (maaf, raf), image R@10 (triplet), mean accuracy (attributes).

    ``arch``, when given, must match what is evaluated (a guard against comparing different models)."""
    if isinstance(model_or_session, (str, Path)) or hasattr(model_or_session, "manifest"):
        report = evaluate_bundle(model_or_session, n=n, seed=seed)
    else:
        report = evaluate_model(model_or_session, n=n, seed=seed)
    if arch is not None and arch != report.arch:
        raise ConfigError(f"recall_at_10 was asked for arch {arch!r} but the model is {report.arch!r}")
    return report.headline


# --- presentation ----------------------------------------------------------------------------------------------
def side_by_side(reports: Sequence[EvalReport]) -> str:
    """A text table: one row per metric, one column per report (percent), the headline metric marked with *."""
    if not reports:
        return ""
    names = list(reports[0].metrics)
    head = HEADLINE.get(reports[0].arch)
    width = max(12, *(len(r.source) + 2 for r in reports))
    lines = [f"{reports[0].arch} on {reports[0].n} held-out items (catalogue seed {reports[0].seed})",
             f"{'metric':<16}" + "".join(f"{r.source:>{width}}" for r in reports)]
    for m in names:
        mark = "*" if m == head else " "
        lines.append(f"{m + mark:<16}" + "".join(f"{100 * r.metrics.get(m, float('nan')):>{width}.2f}" for r in reports))
    lines.append(f"{'seconds':<16}" + "".join(f"{r.seconds:>{width}.1f}" for r in reports))
    return "\n".join(lines)


__all__ = [
    "DEFAULT_N",
    "DEFAULT_SEED",
    "EvalReport",
    "HEADLINE",
    "attribute_metrics",
    "composed_metrics",
    "evaluate_bundle",
    "evaluate_model",
    "evaluate_reference",
    "fashiongen_candidates",
    "held_out_items",
    "image_retrieval_metrics",
    "ranks_of_positive",
    "recall_at_10",
    "recall_from_ranks",
    "side_by_side",
    "text_image_metrics",
]
