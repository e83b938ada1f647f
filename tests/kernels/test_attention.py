"""Attention-fusion core and the whole fusion block: Triton kernels (interpreter) against a float64 reference.

Fresh random inputs every run (seed printed on failure), any L (1, 7, 100, 257), head dims that are not powers of
two, strided q/k/v as the models pass them, all-masked and half-masked rows, fp16; outputs and workspaces
NaN-poisoned. Tolerance: |out - ref| <= rtol·(|ref| + max|ref|), rtol 1e-5 (fp32) / 2e-3 (fp16).
"""

from __future__ import annotations

import pytest
import torch

from fine_infer import kernels
from fine_infer.kernels import FusionBlockWeights, _dispatch, reference
from kernel_helpers import RTOL, assert_close

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("poisoned_triton")


def _mask(kind: str, B: int, L: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "half+empty":
        m = torch.rand(B, L) < 0.5
        m[-1] = False  # every key masked: that batch row's queries return zeros
        return m
    # "padding": image tokens kept, then a text of random length padded to L (the MAAF/RAF layout)
    keep = torch.arange(L)[None, :] < torch.randint(1, L + 1, (B, 1))
    return keep


def _qkv(B: int, heads: int, L: int, d: int, dtype: torch.dtype):
    """q, k, v as strided (B, heads, L, d) views of (B, L, heads·d) projections, as FusionAttention makes them."""
    return tuple(torch.randn(B, L, heads, d).to(dtype).transpose(1, 2) for _ in range(3))


SHAPES = [(2, 2, 1, 16), (1, 2, 7, 64), (2, 1, 100, 24), (1, 2, 257, 64), (2, 8, 33, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mask_kind", ["none", "half+empty", "padding"])
@pytest.mark.parametrize("B,heads,L,d", SHAPES)
def test_attention_matches_reference(B, heads, L, d, mask_kind, dtype):
    q, k, v = _qkv(B, heads, L, d, dtype)
    mask = _mask(mask_kind, B, L)
    out = torch.full((B, L, heads, d), float("nan"), dtype=dtype).transpose(1, 2)  # a strided out= buffer
    before = _dispatch.COUNTS[("attention_fusion", "triton")]
    got = kernels.attention_fusion(q, k, v, mask, out=out)
    assert _dispatch.COUNTS[("attention_fusion", "triton")] == before + 1
    assert got.data_ptr() == out.data_ptr()
    ref = reference.attention_fusion(q.double(), k.double(), v.double(), mask)
    assert_close(got, ref, RTOL[dtype])
    if mask is not None:
        empty = ~mask.any(dim=1)
        assert (got[empty] == 0).all(), "queries without a kept key must return exactly zero"


def test_attention_scores_of_large_magnitude():
    """Large logits (a peaked softmax) stay finite and exact: the online max is what keeps exp() in range."""
    q, k, v = _qkv(1, 2, 70, 32, torch.float32)
    q = q * 30
    mask = _mask("padding", 1, 70)
    ref = reference.attention_fusion(q.double(), k.double(), v.double(), mask)
    assert_close(kernels.attention_fusion(q, k, v, mask), ref, 1e-5)


def test_attention_rejects_bad_inputs():
    from fine_infer.kernels import _attention

    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="alike"):
        _attention.attention_fusion(q, q[:, :, :4], q)
    with pytest.raises(ValueError, match="key_padding_mask"):
        _attention.attention_fusion(q, q, q, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dtype|float16"):
        _attention.attention_fusion(q, q.half(), q)


def _block_weights(D: int, FF: int, dtype: torch.dtype) -> FusionBlockWeights:
    def lin(o, i):
        return torch.randn(o, i) / i**0.5, torch.randn(o) * 0.1

    (qw, qb), (kw, kb), (vw, vb), (ow, ob) = (lin(D, D) for _ in range(4))
    (f1w, f1b), (f2w, f2b) = lin(FF, D), lin(D, FF)
    n1w, n1b, n2w, n2b = torch.rand(D) + 0.5, torch.randn(D) * 0.1, torch.rand(D) + 0.5, torch.randn(D) * 0.1
    return FusionBlockWeights(n1w, n1b, qw, qb, kw, kb, vw, vb, ow, ob, n2w, n2b, f1w, f1b, f2w, f2b).to(dtype)


BLOCKS = [(2, 7, 48, 2, 24), (1, 100, 64, 4, 32), (2, 37, 64, 8, 128)]  # B, L, D, heads, FF


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("norm", ["annotated", "layernorm"])
@pytest.mark.parametrize("B,L,D,heads,FF", BLOCKS)
def test_fusion_block_matches_reference(B, L, D, heads, FF, norm, dtype):
    x = torch.randn(B, L, D).to(dtype)
    w = _block_weights(D, FF, dtype)
    mask = _mask("half+empty", B, L)
    out = torch.full((B, L, D), float("nan"), dtype=dtype)
    got = kernels.fusion_block(x, mask, w, heads, norm, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = reference.fusion_block(x.double(), mask, w.to(torch.float64), heads, norm)
    assert_close(got, ref, RTOL[dtype])


def test_fusion_block_reference_is_the_models_block():
    """reference.fusion_block computes what fine_infer.models' FusionBlock computes, from its own state dict."""
    _fusion = pytest.importorskip("fine_infer.models._fusion")
    for norm in ("annotated", "layernorm"):
        block = _fusion.FusionBlock(32, 4, 16, norm=norm).double().eval()
        for p in block.parameters():
            p.data.normal_(0, 0.3)
        x = torch.randn(2, 9, 32, dtype=torch.float64)
        mask = _mask("half+empty", 2, 9)
        w = FusionBlockWeights.from_state_dict(block.state_dict())
        with kernels.use_backend("reference"):
            want = block(x, mask)
        torch.testing.assert_close(reference.fusion_block(x, mask, w, 4, norm), want, rtol=1e-12, atol=1e-12)
        # and the fused kernel path from the same weights, in fp32
        got = kernels.fusion_block(x.float(), mask, w.to(torch.float32), 4, norm)
        assert_close(got, want, 1e-5)
