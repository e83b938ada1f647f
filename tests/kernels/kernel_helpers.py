"""Helpers of the kernel tests (imported by them; a unique module name, not conftest): tolerances and the
comparison against a float64 reference."""

from __future__ import annotations

import torch

RTOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """|out - ref| <= rtol·(|ref| + max|ref|) everywhere, and every element of ``out`` finite."""
    assert torch.isfinite(out).all(), "non-finite output: an element was never written (NaN poison) or overflowed"
    ref = ref.double()
    scale = ref.abs().max().item()
    err = (out.double() - ref).abs()
    worst = (err / (ref.abs() + scale).clamp(min=1e-300)).max().item()
    assert (err <= rtol * (ref.abs() + scale)).all(), f"relative error {worst:.3g} > {rtol}"
