"""The evaluation protocols: metric functions against brute force, and the shipped tiny models on the held-out split.

The metric tests draw fresh random embeddings from a seed printed at the start of each test (shown on failure;
``FINE_INFER_TEST_SEED=<seed>`` reproduces it). The pretrained tests evaluate the weights shipped in
``fine_infer/weights`` and compare with the issue's targets and with what ``TRAINING.json`` recorded for them.
"""

import json
import os
import secrets

import numpy as np
import pytest

from fine_infer.tools.catalogue import CATEGORIES, COLOURS, PATTERNS, generate
from fine_infer.errors import ConfigError
from fine_infer.tools.evaluate import (
    HEADLINE,
    EvalReport,
    attribute_metrics,
    composed_metrics,
    fashiongen_candidates,
    image_retrieval_metrics,
    ranks_of_positive,
    recall_from_ranks,
    side_by_side,
    text_image_metrics,
)

TARGETS = {"fashion-fine": 0.9, "maaf": 0.7, "attributes": 0.9}  # issue 6: t2i_r10, composed_r10, acc_mean


@pytest.fixture
def rng():
    seed = int(os.environ.get("FINE_INFER_TEST_SEED", secrets.randbits(32)))
    print(f"random seed {seed} (FINE_INFER_TEST_SEED={seed} reproduces it)")
    return np.random.default_rng(seed)


def unit_rows(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --- metric functions vs brute force -----------------------------------------------------------------------------
def test_ranks_of_positive_counts_strictly_higher_scores(rng):
    scores = rng.integers(0, 6, (50, 30)).astype(np.float32)  # many ties: a tie does not push the positive down
    positive = rng.integers(0, 30, 50)
    want = [sum(1 for j in range(30) if scores[i, j] > scores[i, positive[i]]) for i in range(50)]
    assert ranks_of_positive(scores, positive).tolist() == want


def test_recall_from_ranks(rng):
    ranks = rng.integers(0, 60, 200)
    got = recall_from_ranks(ranks, (1, 5, 10, 50))
    assert got == {k: sum(1 for r in ranks if r < k) / len(ranks) for k in (1, 5, 10, 50)}


def test_composed_metrics_remove_the_reference_from_the_gallery(rng):
    nq, ng, d = 80, 120, 64
    gallery = unit_rows(rng.standard_normal((ng, d)))
    refs = rng.integers(0, ng, nq)
    targets = np.array([(r + 1 + rng.integers(ng - 1)) % ng for r in refs])  # never the reference itself
    # each query is its reference image, slightly moved towards the target: the reference would rank first
    query = unit_rows(gallery[refs] + 0.8 * gallery[targets])
    scores = query @ gallery.T
    assert (ranks_of_positive(scores, targets) >= 1).mean() > 0.9  # without removal the target is rarely first
    before = (query.copy(), gallery.copy())
    got = composed_metrics(query, gallery, refs, targets)
    np.testing.assert_array_equal(query, before[0])
    np.testing.assert_array_equal(gallery, before[1])
    ranks = []
    for i in range(nq):
        s = [float(query[i] @ gallery[j]) for j in range(ng)]
        ranks.append(sum(1 for j in range(ng) if j != refs[i] and s[j] > s[targets[i]]))
    want = {f"composed_r{k}": sum(r < k for r in ranks) / nq for k in (1, 10, 50)}
    assert got == want
    assert got["composed_r1"] > 0.5  # with the reference gone, the target is mostly first


def test_fashiongen_candidates_never_contain_the_querys_key(rng):
    keys = rng.integers(0, 25, 400)
    cand = fashiongen_candidates(keys, seed=3)
    assert cand.shape == (400, 101)
    assert cand[:, 0].tolist() == list(range(400))  # the positive first
    for i, row in enumerate(cand):
        assert len(set(row.tolist())) == 101
        assert (keys[row[1:]] != keys[i]).all()
    np.testing.assert_array_equal(cand, fashiongen_candidates(keys, seed=3))
    assert not np.array_equal(cand, fashiongen_candidates(keys, seed=4))
    with pytest.raises(ConfigError, match="100 negatives"):
        fashiongen_candidates(np.array([0] * 50 + [1] * 60), seed=0)


def test_text_image_metrics_match_brute_force(rng):
    n, d = 300, 24
    keys = rng.integers(0, 40, n)
    image = unit_rows(rng.standard_normal((n, d)))
    text = unit_rows(image + rng.normal(0, 0.25, (n, d)))  # captions near their image: recall well above chance
    got = text_image_metrics(image, text, keys, seed=7)
    cand = fashiongen_candidates(keys, seed=7)
    want = {}
    for name, q, g in (("t2i", text, image), ("i2t", image, text)):
        ranks = [sum(1 for c in cand[i, 1:] if q[i] @ g[c] > q[i] @ g[i]) for i in range(n)]
        for k in (1, 5, 10):
            want[f"{name}_r{k}"] = sum(r < k for r in ranks) / n
    assert got == pytest.approx(want, abs=1e-12)
    assert 0.1 < got["t2i_r1"] < 1.0


def test_image_retrieval_metrics_match_brute_force(rng):
    n, d = 150, 12
    keys = rng.integers(0, 60, n)  # some keys occur once: those queries are left out
    centres = rng.standard_normal((60, d))
    emb = unit_rows(centres[keys] + rng.normal(0, 0.8, (n, d)))
    got = image_retrieval_metrics(emb, keys, ks=(1, 5, 10))
    hits = {1: [], 5: [], 10: []}
    for q in range(n):
        others = [j for j in range(n) if j != q]
        if not any(keys[j] == keys[q] for j in others):
            continue
        order = sorted(others, key=lambda j: -float(emb[q] @ emb[j]))
        for k, found in hits.items():
            found.append(any(keys[j] == keys[q] for j in order[:k]))
    assert got == pytest.approx({f"image_r{k}": float(np.mean(v)) for k, v in hits.items()}, abs=1e-12)
    assert len(hits[1]) < n  # the singleton case is exercised


def test_attribute_metrics_match_brute_force(rng):
    items = generate(40, seed=int(rng.integers(1000)), size=24)
    truth = {"category": [CATEGORIES.index(it.category) for it in items],
             "colour": [COLOURS.index(it.colour) for it in items],
             "pattern": [PATTERNS.index(it.pattern) for it in items]}
    sizes = {"category": len(CATEGORIES), "colour": len(COLOURS), "pattern": len(PATTERNS)}
    logits = {}
    for head, y in truth.items():
        z = rng.standard_normal((40, sizes[head])).astype(np.float32)
        right = rng.random(40) < 0.6
        z[np.arange(40)[right], np.array(y)[right]] += 10.0
        logits[head] = z
    logits["sleeve"] = rng.standard_normal((40, 3)).astype(np.float32)  # not a catalogue attribute: ignored
    got = attribute_metrics(logits, items)
    want = {f"acc_{h}": sum(int(np.argmax(logits[h][i])) == truth[h][i] for i in range(40)) / 40 for h in truth}
    want["acc_mean"] = sum(want.values()) / 3
    assert got == pytest.approx(want, abs=1e-12)
    with pytest.raises(ConfigError, match="no head"):
        attribute_metrics({"sleeve": logits["sleeve"]}, items)


def test_side_by_side_marks_the_headline_and_prints_percent():
    a = EvalReport("maaf", "pytorch", {"composed_r1": 0.25, "composed_r10": 0.75, "composed_r50": 1.0}, 300, 0, 1.0)
    b = EvalReport("maaf", "onnxruntime", {"composed_r1": 0.25, "composed_r10": 0.7467, "composed_r50": 1.0}, 300, 0)
    text = side_by_side([a, b])
    lines = text.splitlines()
    assert "maaf on 300 held-out items" in lines[0] and "pytorch" in lines[1] and "onnxruntime" in lines[1]
    row = next(line for line in lines if line.startswith("composed_r10"))
    assert row.startswith("composed_r10*") and "75.00" in row and "74.67" in row
    assert a.headline == 0.75 and a.to_dict()["headline"] == HEADLINE["maaf"] == "composed_r10"


# --- the shipped pretrained weights ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def training_json():
    from fine_infer.models._checkpoint import WEIGHTS_DIR

    return json.loads((WEIGHTS_DIR / "TRAINING.json").read_text())["archs"]


@pytest.fixture(scope="module")
def recorded_threads(training_json):
    """Evaluate with the thread count the training run used (its evaluation ran in the same process)."""
    import torch

    threads = {e["threads"] for e in training_json.values()}
    assert len(threads) == 1, f"TRAINING.json entries use different thread counts: {threads}"
    before = torch.get_num_threads()
    torch.set_num_threads(threads.pop())
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pretrained_reports(training_json, recorded_threads):
    from fine_infer.tools.evaluate import evaluate_model
    from fine_infer.models import create

    cache = {}

    def get(arch):
        if arch not in cache:
            entry = training_json[arch]
            cache[arch] = evaluate_model(create(arch, "tiny", pretrained=True), n=entry["catalogue"]["held_out_items"],
                                         seed=entry["catalogue"]["seed"])
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["fashion-fine", "maaf", "attributes", "raf", "triplet"])
def test_pretrained_model_reproduces_training_json(arch, training_json, pretrained_reports):
    """Same weights, code and data as the training run's own evaluation: the same numbers (TRAINING.json stores
    them rounded to 4 decimals), and the issue's targets where it sets one."""
    entry = training_json[arch]
    report = pretrained_reports(arch)
    assert report.arch == arch and report.source == "pytorch" and report.n == 1000
    assert set(report.metrics) == set(entry["eval"])
    for m, v in report.metrics.items():
        assert round(v, 4) == pytest.approx(entry["eval"][m], abs=1e-9), (m, v, entry["eval"][m])
    if arch in TARGETS:
        assert report.headline >= TARGETS[arch], report.metrics


@pytest.fixture(scope="module")
def pretrained_bundles(tmp_path_factory):
    from fine_infer.export import export_arch

    cache = {}

    def get(arch):
        if arch not in cache:
            out = tmp_path_factory.mktemp("eval-bundles") / arch
            export_arch(arch, out, "tiny", pretrained=True)
            cache[arch] = out
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["attributes", "maaf"])  # fashion-fine: tests/test_export_recall_gate.py
def test_exported_bundle_evaluates_like_pytorch(arch, pretrained_bundles, pretrained_reports):
    from fine_infer.tools.evaluate import evaluate_bundle, evaluate_reference

    bundle = pretrained_bundles(arch)
    ref = pretrained_reports(arch)
    onnx = evaluate_bundle(bundle, backend="onnxruntime", n=ref.n, seed=ref.seed)
    assert onnx.arch == arch and onnx.source == "onnxruntime" and set(onnx.metrics) == set(ref.metrics)
    assert abs(onnx.headline - ref.headline) <= 0.005, (onnx.metrics, ref.metrics)  # 0.5 points
    for m in ref.metrics:
        assert abs(onnx.metrics[m] - ref.metrics[m]) <= 0.005, m
    # the bundle's own PyTorch model (rebuilt from its weights.safetensors) is the shipped model
    assert evaluate_reference(bundle, n=ref.n, seed=ref.seed).metrics == ref.metrics
