"""Similarity top-k: the Triton kernel (interpreter) against a float64 reference.

A correct top-k is checked three ways: the returned scores are the reference's k best (to the tolerance), each
returned index really has its returned score, and indices are distinct; exact ties (integer data, duplicated
gallery rows) must come out in the reference's order, lower index first. Fresh random inputs every run; key
workspaces are poisoned (a poisoned key decodes to NaN) and the ``out=`` buffers NaN / sentinel-filled.
"""

from __future__ import annotations

import pytest
import torch

from fine_infer import kernels
from fine_infer.kernels import _dispatch, reference
from kernel_helpers import RTOL

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("poisoned_triton")


def check_topk(queries, gallery, k, scores, idx, rtol):
    Q, N = queries.shape[0], gallery.shape[0]
    assert scores.shape == (Q, k) and idx.shape == (Q, k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    kk = min(k, N)
    assert not torch.isnan(scores).any(), "NaN score: a key was never written (poison)"
    assert (idx[:, kk:] == -1).all() and torch.isneginf(scores[:, kk:]).all(), "padding beyond the gallery"
    s, i = scores[:, :kk].double(), idx[:, :kk]
    assert ((i >= 0) & (i < N)).all(), f"index out of range: {i.min()}..{i.max()}"
    assert all(len(set(row.tolist())) == kk for row in i), "duplicate indices"
    exact = queries.double() @ gallery.double().T  # (Q, N), fine at test sizes
    ref_s = torch.sort(exact, dim=1, descending=True).values[:, :kk]
    # Rounding errors of a dot product scale with sum |q_i g_i|, not with the score: a score near 0 by cancellation
    # (one query, one gallery row) still carries the error of its terms.
    scale = (queries.double().abs() @ gallery.double().abs().T).max().item()
    tol = rtol * (scale + ref_s.abs())
    assert ((s - ref_s).abs() <= tol).all(), f"scores off by {(s - ref_s).abs().max():.3g}"
    assert ((exact.gather(1, i) - s).abs() <= tol).all(), "an index does not carry its score"
    assert (s[:, 1:] <= s[:, :-1]).all(), "not sorted best first"


SHAPES = [(1, 1, 8, 1), (3, 7, 24, 5), (5, 100, 64, 10), (4, 257, 32, 64), (2, 50, 16, 100), (17, 300, 20, 3)]


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                    (torch.float16, torch.float16)], ids=["fp32", "fp32q-fp16g", "fp16"])
@pytest.mark.parametrize("Q,N,D,k", SHAPES)
def test_topk_matches_reference(Q, N, D, k, dtypes):
    queries = torch.randn(Q, D).to(dtypes[0])
    gallery = torch.randn(N, D).to(dtypes[1])
    out = (torch.full((Q, k), float("nan")), torch.full((Q, k), -7, dtype=torch.int64))
    before = _dispatch.COUNTS[("similarity_topk", "triton")]
    scores, idx = kernels.similarity_topk(queries, gallery, k, out=out)
    assert _dispatch.COUNTS[("similarity_topk", "triton")] == before + 1
    assert scores.data_ptr() == out[0].data_ptr() and idx.data_ptr() == out[1].data_ptr()
    # fp32 precision whenever the queries are fp32 (an fp16 gallery included: the queries are not rounded to fp16)
    check_topk(queries, gallery, k, scores, idx, RTOL[dtypes[0]] if dtypes[1] == torch.float16 else RTOL[dtypes[1]])


@pytest.mark.parametrize("magnitude", [1.0, 2.0**-100, 2.0**15, 2.0**100])
def test_fp32_queries_over_an_fp16_gallery_give_the_fp32_indices(magnitude):
    """The contract of mixed dtypes: the fp32 reference's top-k (queries in fp32, the fp16 gallery widened), not a
    rounding of the queries to fp16 — which agreed on only 95-98% of the indices. Every index must be the reference's
    except where two scores are within fp32 rounding; query magnitudes far outside fp16's range work too."""
    Q, N, D, k = 48, 1500, 64, 10
    gallery = torch.nn.functional.normalize(torch.randn(N, D), dim=1).half()
    queries = torch.nn.functional.normalize(torch.randn(Q, D), dim=1) * magnitude
    scores, idx = kernels.similarity_topk(queries, gallery, k)
    exact = queries.double() @ gallery.double().T
    ref = torch.sort(exact, dim=1, descending=True, stable=True)
    tol = 4e-7 * (queries.double().abs() @ gallery.double().abs().T).amax(dim=1, keepdim=True)
    check_topk(queries, gallery, k, scores, idx, 1e-6)
    agree = idx == ref.indices[:, :k]
    # a disagreement is allowed only where the reference's own k-th/k+1-th scores are that close (a near-tie)
    near_tie = (ref.values[:, k - 1:k] - ref.values[:, k:k + 1]).abs() <= tol
    assert (agree | near_tie).all(), f"{(~agree).sum().item()} of {agree.numel()} indices differ from fp32"
    # Planted: two basis rows whose scores differ by 2^-12 (relative), below fp16's spacing at 1 (2^-10). Rounding the
    # query to fp16 makes them tie (and the tie rule picks row 0); fp32 says row 1.
    q = torch.tensor([[1 + 2**-13, 1 + 3 * 2**-13, 0.0, 0.0]]) * magnitude
    g = torch.eye(4).half()
    if magnitude == 1.0:
        assert q.half()[0, 0] == q.half()[0, 1] == 1.0
    _, top = kernels.similarity_topk(q, g, 1)
    assert top.item() == 1


@pytest.mark.parametrize("tiles_per_split,min_width", [(1, 16), (2, 16), (3, 64)])
def test_topk_splits_and_tiles(tiles_per_split, min_width):
    """Many gallery tiles per program and many splits merged by the wrapper."""
    from fine_infer.kernels import _topk

    queries, gallery = torch.randn(6, 24), torch.randn(333, 24)
    scores, idx = _topk.similarity_topk(queries, gallery, 9, tiles_per_split=tiles_per_split, min_width=min_width)
    check_topk(queries, gallery, 9, scores, idx, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_topk_ties_break_to_the_lower_index(dtype):
    """Integer data makes every score exact in fp16 and fp32; duplicated rows and -0/+0 make exact ties."""
    from fine_infer.kernels import _topk

    base = torch.randint(-3, 4, (40, 12)).to(dtype)
    gallery = torch.cat([base, base, base[:7]])[torch.randperm(87)]  # each score appears 2-3 times
    gallery[5] = 0.0
    gallery[60] = -0.0  # scores -0.0 and +0.0: one score
    queries = torch.randint(-3, 4, (5, 12)).to(dtype)
    want_s, want_i = reference.similarity_topk(queries.double(), gallery.double(), 30)
    for min_width in (16, 64):
        scores, idx = _topk.similarity_topk(queries, gallery, 30, tiles_per_split=1, min_width=min_width)
        assert torch.equal(idx, want_i), "ties must come out lower index first"
        assert torch.equal(scores, want_s)


def test_topk_k_1024():
    """The largest k, over a gallery that is not a multiple of the tile (the few-queries-per-program path)."""
    queries, gallery = torch.randn(3, 40), torch.randn(1500, 40)
    scores, idx = kernels.similarity_topk(queries, gallery, 1024)
    check_topk(queries, gallery, 1024, scores, idx, 1e-5)


def test_topk_degenerate_sizes():
    q = torch.randn(2, 8)
    s, i = kernels.similarity_topk(q, torch.empty(0, 8), 3)
    assert torch.isneginf(s).all() and (i == -1).all()
    s, i = kernels.similarity_topk(torch.empty(0, 8), torch.randn(5, 8), 3)
    assert s.shape == (0, 3) and i.shape == (0, 3)


def test_topk_rejects_bad_inputs():
    from fine_infer.kernels import _topk

    with pytest.raises(ValueError, match="k=0"):
        _topk.similarity_topk(torch.randn(2, 8), torch.randn(5, 8), 0)
    with pytest.raises(ValueError, match="queries"):
        _topk.similarity_topk(torch.randn(2, 8), torch.randn(5, 7), 3)
    with pytest.raises(kernels.KernelUnavailableError, match="k=2000"):
        kernels.similarity_topk(torch.randn(2, 8), torch.randn(5000, 8), 2000)


def test_topk_when_later_tiles_cannot_enter():
    """A gallery sorted worst-last: after the first tile no key beats the k-th, so the merges are skipped."""
    from fine_infer.kernels import _topk

    D = 16
    queries = torch.zeros(2, D)
    queries[0, 0], queries[1, 1] = 1.0, 1.0
    gallery = torch.randn(500, D) * 0.01
    gallery[:, 0] = torch.linspace(1, -1, 500)  # query 0: best first
    gallery[:, 1] = torch.linspace(-1, 1, 500)  # query 1: best last
    scores, idx = _topk.similarity_topk(queries, gallery, 5, min_width=16, tiles_per_split=40)
    check_topk(queries, gallery, 5, scores, idx, 1e-5)
    assert idx[0].tolist() == [0, 1, 2, 3, 4] and idx[1].tolist() == [499, 498, 497, 496, 495]


@pytest.mark.parametrize("rows_dtype", ["float16", "int8"])
def test_device_index_scores_stored_rows_without_widening_them(rows_dtype, monkeypatch):
    """fine_infer.index._gpu hands float16 rows to the kernel as they are (int8 widened to float16, exact) and the
    fp32 queries keep fp32 precision: the top-k is the exact fp32 one."""
    import numpy as np

    from fine_infer.index._gpu import GpuGallery

    rng = np.random.default_rng(0)
    if rows_dtype == "float16":
        rows, scales = rng.standard_normal((600, 24)).astype(np.float16), None
        dense = rows.astype(np.float64)
    else:
        rows = rng.integers(-127, 128, (600, 24)).astype(np.int8)
        scales = rng.uniform(0.001, 0.01, 24).astype(np.float32)
        dense = rows.astype(np.float64) * scales
    queries = rng.standard_normal((5, 24)).astype(np.float32)
    seen = []
    real = kernels.similarity_topk
    monkeypatch.setattr(kernels, "similarity_topk", lambda q, g, k: seen.append(g.dtype) or real(q, g, k))
    scores, idx = GpuGallery("cpu", rows, scales, version=0).search(queries, 7)
    assert seen and set(seen) == {torch.float16}
    if scales is not None:
        exact = (queries.astype(np.float64) * scales.astype(np.float32)).astype(np.float32).astype(np.float64) \
            @ rows.astype(np.float64).T
    else:
        exact = queries.astype(np.float64) @ dense.T
    want = np.argsort(-exact, axis=1, kind="stable")[:, :7]
    assert (idx == want).all()
    np.testing.assert_allclose(scores, np.take_along_axis(exact, want, 1), rtol=1e-5, atol=1e-5)
