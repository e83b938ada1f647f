"""The one comparison function: errors, cosine, top-k agreement, and its verdicts."""

import numpy as np

from fine_infer.compare import Tolerance, compare, topk_agreement


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_identical_passes_with_zero_error(rng):
    a = _unit(rng, 8, 32)
    c = compare(a, a.copy())
    assert c.passed and c.max_abs == 0 and c.topk_agreement == 1.0
    assert abs(c.mean_cosine - 1) < 1e-12


def test_small_noise_measured_and_judged_against_atol(rng):
    a = _unit(rng, 8, 32)
    noise = rng.standard_normal(a.shape) * 1e-3
    c = compare(a, a + noise, Tolerance(atol=1e-4))
    assert not c.passed and "max abs error" in c.reason
    assert np.isclose(c.max_abs, np.abs(noise).max())
    assert np.isclose(c.max_rel, np.abs(noise).max() / np.abs(a).max())
    assert compare(a, a + noise, Tolerance(atol=1e-2)).passed


def test_topk_agreement_drops_for_unrelated_vectors(rng):
    a, b = _unit(rng, 16, 64), _unit(rng, 16, 64)
    assert topk_agreement(a, a, k=10) == 1.0
    assert topk_agreement(a, b, k=10) < 0.5
    c = compare(a, b, Tolerance(atol=None, min_topk=0.9))
    assert not c.passed and "top-10 agreement" in c.reason


def test_nan_and_shape_mismatch_fail():
    a = np.ones((2, 3))
    bad = a.copy()
    bad[1, 1] = np.nan
    assert "non-finite" in compare(a, bad).reason
    assert "shape mismatch" in compare(a, np.ones((2, 4))).reason


def test_logits_use_argmax_agreement(rng):
    a = rng.standard_normal((10, 5))
    c = compare(a, a * 2, Tolerance(atol=None, min_topk=1.0), kind="logits")
    assert c.passed and c.k == 1
