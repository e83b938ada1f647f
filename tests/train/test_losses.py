"""The training losses against independent float64 references written here with plain Python/numpy loops.

Each test draws fresh random inputs from a seed printed at the start of the test (shown by pytest on failure;
re-run with ``FINE_INFER_TEST_SEED=<seed>`` to reproduce). Tolerances: 1e-9 relative (float64 inputs, where the
implementation and the reference differ only in summation order) or 1e-5 relative (float32 inputs against the
float64 reference).
"""

import math
import os
import secrets

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fine_infer.tools.train.losses import (
    batch_softmax_loss,
    focal_contrastive_rows,
    hnm_f_loss,
    multi_head_cross_entropy,
    pairwise_squared_distances,
    same_label_targets,
    semi_hard_negatives,
    semi_hard_triplet_loss,
)

TOL64 = 1e-9
TOL32 = 1e-5


@pytest.fixture
def rng():
    seed = int(os.environ.get("FINE_INFER_TEST_SEED", secrets.randbits(32)))
    print(f"random seed {seed} (FINE_INFER_TEST_SEED={seed} reproduces it)")
    return np.random.default_rng(seed)


def unit_rows(rng, n, d, dtype=np.float64):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def labels_with_duplicates(rng, n):
    """Labels in [0, n//2): at least one label repeats (pigeonhole), at least two differ."""
    while True:
        lab = rng.integers(0, max(2, n // 2), n)
        if len(set(lab.tolist())) >= 2 and len(set(lab.tolist())) < n:
            return lab


# --- float64 references --------------------------------------------------------------------------------------
def ref_softmax_row(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ref_targets(labels, n):
    if labels is None:
        return [[1.0 if i == j else 0.0 for j in range(n)] for i in range(n)]
    out = []
    for i in range(n):
        same = [1.0 if labels[j] == labels[i] else 0.0 for j in range(n)]
        out.append([v / sum(same) for v in same])
    return out


def ref_focal_direction(sim, targets, alpha, gamma):
    """Mean over rows of -Σ_j α (1 - p_ij)^γ log p_ij t_ij."""
    rows = []
    for i in range(len(sim)):
        p = ref_softmax_row(sim[i])
        rows.append(-sum(alpha * (1.0 - p[j]) ** gamma * math.log(p[j]) * targets[i][j] for j in range(len(p))))
    return rows


def ref_hnm_f(img, txt, temp, labels=None, alpha=0.5, gamma=2.0):
    n = len(img)
    sim = [[float(np.dot(img[i], txt[j])) / temp for j in range(n)] for i in range(n)]
    sim_t = [[sim[j][i] for j in range(n)] for i in range(n)]
    tgt = ref_targets(labels, n)
    tgt_t = [[tgt[j][i] for j in range(n)] for i in range(n)]
    i2t = ref_focal_direction(sim, tgt, alpha, gamma)
    t2i = ref_focal_direction(sim_t, tgt_t, alpha, gamma)
    return 0.5 * (sum(i2t) / n + sum(t2i) / n)


def ref_cross_entropy(logits_row, target):
    m = max(logits_row)
    lse = m + math.log(sum(math.exp(v - m) for v in logits_row))
    return lse - logits_row[target]


def ref_batch_softmax(src, tgt, scale):
    n = len(src)
    total = 0.0
    for i in range(n):
        row = [scale * float(np.dot(src[i], tgt[j])) for j in range(n)]
        total += ref_cross_entropy(row, i)
    return total / n


def ref_sqdist(a, b):
    return float(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def ref_semi_hard(emb, labels, margin):
    """FaceNet's rule by brute force: for every ordered anchor–positive pair (a ≠ p, same label), the negative
    closest to a among those strictly farther than p; if there is none, the farthest negative."""
    n = len(emb)
    d = [[ref_sqdist(emb[i], emb[j]) for j in range(n)] for i in range(n)]
    triples, terms, fallbacks = [], [], 0
    for a in range(n):
        negs = [k for k in range(n) if labels[k] != labels[a]]
        if not negs:
            continue
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            farther = [k for k in negs if d[a][k] > d[a][p]]
            if farther:
                neg = min(farther, key=lambda k: d[a][k])
            else:
                neg = max(negs, key=lambda k: d[a][k])
                fallbacks += 1
            triples.append((a, p, neg))
            terms.append(max(d[a][p] - d[a][neg] + margin, 0.0))
    return triples, sum(terms) / len(terms), fallbacks


# --- HNM-F ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,gamma", [(0.5, 2.0), (1.0, 0.0), (0.25, 1.5)])
def test_hnm_f_matches_reference_without_labels(rng, alpha, gamma):
    n, d = int(rng.integers(3, 12)), int(rng.integers(2, 17))
    img, txt = unit_rows(rng, n, d), unit_rows(rng, n, d)
    temp = float(rng.uniform(0.03, 0.5))
    got = hnm_f_loss(torch.from_numpy(img), torch.from_numpy(txt), temp, None, alpha, gamma).item()
    want = ref_hnm_f(img, txt, temp, None, alpha, gamma)
    assert got == pytest.approx(want, rel=TOL64, abs=1e-12)


def test_hnm_f_with_duplicate_products_uses_every_same_label_item_as_a_positive(rng):
    n, d = int(rng.integers(6, 14)), 8
    img, txt = unit_rows(rng, n, d), unit_rows(rng, n, d)
    temp = float(rng.uniform(0.05, 0.3))
    lab = labels_with_duplicates(rng, n)
    got = hnm_f_loss(torch.from_numpy(img), torch.from_numpy(txt), temp, torch.from_numpy(lab)).item()
    assert got == pytest.approx(ref_hnm_f(img, txt, temp, lab.tolist()), rel=TOL64)
    # with duplicates the targets are no longer the diagonal: the loss differs from labels=None ...
    none = hnm_f_loss(torch.from_numpy(img), torch.from_numpy(txt), temp, None).item()
    assert abs(got - none) > 1e-6
    # ... while all-distinct labels (any permutation of ids) are exactly labels=None
    distinct = torch.from_numpy(rng.permutation(n) + 1000)
    assert hnm_f_loss(torch.from_numpy(img), torch.from_numpy(txt), temp, distinct).item() == pytest.approx(none, rel=TOL64)


def test_same_label_targets_are_uniform_over_the_label_group(rng):
    n = 10
    lab = labels_with_duplicates(rng, n)
    t = same_label_targets(torch.from_numpy(lab), n).double().numpy()
    np.testing.assert_allclose(t, np.array(ref_targets(lab.tolist(), n)), rtol=0, atol=1e-7)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(same_label_targets(None, 4).numpy(), np.eye(4))


def test_hnm_f_float32_matches_float64_reference(rng):
    n, d = 16, 32
    img, txt = unit_rows(rng, n, d), unit_rows(rng, n, d)
    lab = labels_with_duplicates(rng, n)
    got = hnm_f_loss(torch.from_numpy(img).float(), torch.from_numpy(txt).float(), torch.tensor(0.07),
                     torch.from_numpy(lab)).item()
    want = ref_hnm_f(img.astype(np.float32).astype(np.float64), txt.astype(np.float32).astype(np.float64), 0.07,
                     lab.tolist())
    assert got == pytest.approx(want, rel=TOL32)


def test_focal_factor_down_weights_easy_rows_compared_with_cross_entropy(rng):
    """Row 0 is easy (its positive already far ahead), row 1 hard (negatives close to the positive)."""
    n = 6
    sim = rng.normal(0.0, 0.3, (n, n))
    sim[0, 0] += 8.0  # easy: p_00 ≈ 1
    sim[1, 1] = sim[1].max() - 0.5  # hard: the positive is not even ranked first
    sim_t = torch.tensor(sim, requires_grad=True)
    alpha, gamma = 0.5, 2.0
    focal = focal_contrastive_rows(sim_t, torch.eye(n, dtype=torch.float64), alpha, gamma)
    ce = F.cross_entropy(sim_t, torch.arange(n), reduction="none")
    p = torch.softmax(sim_t, dim=1).diagonal()
    # with one-hot targets the focal row is exactly α (1 - p_ii)^γ × the cross-entropy row
    np.testing.assert_allclose(focal.detach().numpy(), (alpha * (1 - p) ** gamma * ce).detach().numpy(), rtol=1e-12)
    ratio = (focal / ce).detach().numpy()
    assert ratio[0] < 1e-4 * ratio[1], ratio  # the easy row is damped by orders of magnitude more
    share_focal = (focal[0] / focal.sum()).item()
    share_ce = (ce[0] / ce.sum()).item()
    assert share_focal < share_ce
    # and the hard row dominates the gradient more than under plain cross-entropy
    g_focal = torch.autograd.grad(focal.sum(), sim_t, retain_graph=True)[0]
    g_ce = torch.autograd.grad(ce.sum(), sim_t)[0]
    assert g_focal[0].norm() / g_focal[1].norm() < g_ce[0].norm() / g_ce[1].norm()
    # γ = 0 and α = 1 is plain cross-entropy
    np.testing.assert_allclose(focal_contrastive_rows(sim_t, torch.eye(n, dtype=torch.float64), 1.0, 0.0).detach().numpy(),
                               ce.detach().numpy(), rtol=1e-12)


def test_hnm_f_gradients_reach_embeddings_and_temperature(rng):
    n, d = 8, 16
    img = torch.from_numpy(unit_rows(rng, n, d)).float().requires_grad_()
    txt = torch.from_numpy(unit_rows(rng, n, d)).float().requires_grad_()
    temp = torch.tensor(0.07, requires_grad=True)
    hnm_f_loss(img, txt, temp, torch.from_numpy(labels_with_duplicates(rng, n))).backward()
    for g in (img.grad, txt.grad, temp.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0


# --- batch softmax --------------------------------------------------------------------------------------------
def test_batch_softmax_matches_reference(rng):
    n, d = int(rng.integers(2, 16)), int(rng.integers(2, 33))
    src, tgt = unit_rows(rng, n, d), unit_rows(rng, n, d)
    scale = float(rng.uniform(1.0, 30.0))
    got = batch_softmax_loss(torch.from_numpy(src), torch.from_numpy(tgt), scale).item()
    assert got == pytest.approx(ref_batch_softmax(src, tgt, scale), rel=TOL64)
    got32 = batch_softmax_loss(torch.from_numpy(src).float(), torch.from_numpy(tgt).float(), torch.tensor(scale)).item()
    want32 = ref_batch_softmax(src.astype(np.float32).astype(np.float64), tgt.astype(np.float32).astype(np.float64), scale)
    assert got32 == pytest.approx(want32, rel=TOL32)


def test_batch_softmax_gradients_reach_queries_targets_and_scale(rng):
    src = torch.from_numpy(unit_rows(rng, 6, 8)).float().requires_grad_()
    tgt = torch.from_numpy(unit_rows(rng, 6, 8)).float().requires_grad_()
    scale = torch.tensor(4.0, requires_grad=True)
    batch_softmax_loss(src, tgt, scale**2).backward()
    for g in (src.grad, tgt.grad, scale.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0


# --- semi-hard triplet ------------------------------------------------------------------------------------------
def test_pairwise_squared_distances_match_brute_force(rng):
    emb = rng.standard_normal((9, 5))
    got = pairwise_squared_distances(torch.from_numpy(emb)).numpy()
    want = np.array([[ref_sqdist(a, b) for b in emb] for a in emb])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert (got >= 0).all()


@pytest.mark.parametrize("dtype,tol", [(np.float64, TOL64), (np.float32, TOL32)])
def test_semi_hard_triplet_matches_brute_force_mining(rng, dtype, tol):
    # 4 products x 4 items plus 2 singletons: anchors with several positives, items without any
    labels = np.array([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4, 5])
    rng.shuffle(labels)
    emb = unit_rows(rng, len(labels), 6, dtype)
    margin = float(rng.uniform(0.1, 0.5))
    triples, want, _ = ref_semi_hard(emb.astype(np.float64), labels.tolist(), margin)
    if dtype == np.float64:  # in float32 a near-tie of two distances may legitimately pick the other negative
        a, p, n = semi_hard_negatives(pairwise_squared_distances(torch.from_numpy(emb)), torch.from_numpy(labels))
        assert list(zip(a.tolist(), p.tolist(), n.tolist())) == triples
    got = semi_hard_triplet_loss(torch.from_numpy(emb), torch.from_numpy(labels), margin).item()
    assert got == pytest.approx(want, rel=tol, abs=tol / 10)
    assert 0 < len(triples) == 4 * 4 * 3


def test_semi_hard_mining_falls_back_to_the_farthest_negative():
    """Anchor 0 and positive 1 are far apart and every negative is closer than the positive: the farthest negative
    is taken; for anchor 2 (positive 3 close by), the closest negative beyond it."""
    emb = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 5.0], [0.0, 5.5], [1.0, 0.0], [2.0, 0.0], [0.0, 7.0]],
                       dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    triples, want, fallbacks = ref_semi_hard(emb.numpy(), labels.tolist(), 0.2)
    a, p, n = semi_hard_negatives(pairwise_squared_distances(emb), labels)
    got = {(x, y): z for x, y, z in zip(a.tolist(), p.tolist(), n.tolist())}
    assert got == {(x, y): z for x, y, z in triples}
    assert got[(0, 1)] == 6  # (0, 7): the farthest negative of anchor 0 — none is beyond its positive at 10
    assert got[(2, 3)] == 6  # (0, 7) is 2 away, beyond the positive at 0.5; (0, 0) is 5 away
    assert fallbacks >= 1
    assert semi_hard_triplet_loss(emb, labels, 0.2).item() == pytest.approx(want, rel=TOL64)


def test_semi_hard_triplet_gradients_flow(rng):
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    emb = torch.from_numpy(unit_rows(rng, 8, 4)).float().requires_grad_()
    loss = semi_hard_triplet_loss(emb, labels, margin=4.0)  # margin > max squared distance of unit vectors: all active
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(emb.grad).all() and emb.grad.abs().max() > 0


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4], [7, 7, 7, 7]], ids=["no-positive", "no-negative"])
def test_semi_hard_triplet_refuses_a_batch_without_triplets(rng, labels):
    emb = torch.from_numpy(unit_rows(rng, len(labels), 4)).float()
    with pytest.raises(ValueError, match="anchor-positive pair"):
        semi_hard_triplet_loss(emb, torch.tensor(labels))


# --- attribute heads ---------------------------------------------------------------------------------------------
def test_multi_head_cross_entropy_matches_reference(rng):
    b = int(rng.integers(2, 20))
    sizes = [8, 12, 4]
    logits = [rng.standard_normal((b, c)) * 3 for c in sizes]
    targets = [rng.integers(0, c, b) for c in sizes]
    want = sum(sum(ref_cross_entropy(z[i].tolist(), int(y[i])) for i in range(b)) / b for z, y in zip(logits, targets))
    got = multi_head_cross_entropy([torch.from_numpy(z) for z in logits], [torch.from_numpy(y) for y in targets])
    assert got.item() == pytest.approx(want, rel=TOL64)
    got32 = multi_head_cross_entropy([torch.from_numpy(z).float() for z in logits], [torch.from_numpy(y) for y in targets])
    want32 = sum(sum(ref_cross_entropy(z.astype(np.float32)[i].astype(np.float64).tolist(), int(y[i])) for i in range(b)) / b
                 for z, y in zip(logits, targets))
    assert got32.item() == pytest.approx(want32, rel=TOL32)


def test_multi_head_cross_entropy_gradients_and_head_mismatch(rng):
    logits = [torch.randn(5, c, generator=torch.Generator().manual_seed(int(rng.integers(1 << 31))), requires_grad=True)
              for c in (3, 4)]
    targets = [torch.tensor([0, 1, 2, 0, 1]), torch.tensor([3, 2, 1, 0, 3])]
    multi_head_cross_entropy(logits, targets).backward()
    for z in logits:
        assert torch.isfinite(z.grad).all() and z.grad.abs().max() > 0
    with pytest.raises(ValueError, match="2 heads of logits but 1 label tensors"):
        multi_head_cross_entropy(logits, targets[:1])
