"""MAA pooling and the patch-pooling adapter: Triton kernels (interpreter) against a float64 reference.

Fresh random inputs every run (the seed is printed on failure), odd and non-power-of-two sizes, all-masked and
half-masked rows, fp16 inputs; every buffer the wrapper allocates is NaN-poisoned, and ``out=`` buffers are
NaN-filled, so an element a kernel forgets to write fails. Tolerance: |out - ref| <= rtol·(|ref| + max|ref|) with
rtol 1e-5 (fp32) / 2e-3 (fp16); a row without a kept token must be exactly 0.
"""

from __future__ import annotations

import pytest
import torch

from fine_infer import kernels
from fine_infer.kernels import _dispatch, reference
from kernel_helpers import RTOL, assert_close

pytest.importorskip("triton")

pytestmark = pytest.mark.usefixtures("poisoned_triton")


def _weights(H: int, dtype: torch.dtype):
    w1 = torch.randn(H, H) / H**0.5
    b1 = torch.randn(H) * 0.5
    w2 = torch.randn(H) * 4 / H**0.5  # scores of a few units: a softmax neither flat nor one-hot
    return tuple(t.to(dtype) for t in (w1, b1, w2))


def _mask(kind: str, B: int, N: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    m = torch.rand(B, N) < 0.5
    m[:, 0] = True
    if kind == "half+empty":
        m[-1] = False  # a row without any kept token
    if kind == "tail":
        m = torch.arange(N)[None, :] >= N // 2  # only the later tokens: the first tiles are skipped
        m = m.expand(B, N).clone()
    return m


SHAPES = [(2, 1, 24), (3, 7, 24), (2, 100, 64), (1, 257, 24), (2, 7, 768)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mask_kind", ["none", "half+empty", "tail"])
@pytest.mark.parametrize("B,N,H", SHAPES)
def test_maa_pool_matches_reference(B, N, H, mask_kind, dtype):
    x = torch.randn(B, N, H).to(dtype)
    w1, b1, w2 = _weights(H, dtype)
    mask = _mask(mask_kind, B, N)
    out = torch.full((B, H), float("nan"), dtype=dtype)
    before = _dispatch.COUNTS[("maa_pool", "triton")]
    got = kernels.maa_pool(x, w1, b1, w2, mask, out=out)
    assert _dispatch.COUNTS[("maa_pool", "triton")] == before + 1
    assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
    ref = reference.maa_pool(x.double(), w1.double(), b1.double(), w2.double(), mask)
    assert_close(got, ref, RTOL[dtype])
    if mask is not None:
        empty = ~mask.any(dim=1)
        assert (got[empty] == 0).all(), "a row without a kept token must be exactly zero"


@pytest.mark.parametrize("block_n", [16, 32])
def test_maa_pool_strided_input_and_many_tiles(block_n):
    """A non-contiguous view (what the adapter pools: tokens[:, 1:]) over several tiles and merge chunks."""
    from fine_infer.kernels import _maa_pool

    B, N, H = 2, 300, 40
    tokens = torch.randn(B, N + 1, H * 2)[:, 1:, ::2]  # strides in every dim
    w1, b1, w2 = _weights(H, torch.float32)
    mask = _mask("half+empty", B, N)
    got = _maa_pool.maa_pool(tokens, w1, b1, w2, mask, block_n=block_n)
    assert_close(got, reference.maa_pool(tokens.double(), w1.double(), b1.double(), w2.double(), mask), 1e-5)


def test_maa_pool_rejects_bad_shapes():
    from fine_infer.kernels import _maa_pool

    x = torch.randn(2, 5, 8)
    w1, b1, w2 = _weights(8, torch.float32)
    with pytest.raises(ValueError, match="w1"):
        _maa_pool.maa_pool(x, w1[:, :4], b1, w2)
    with pytest.raises(ValueError, match="mask"):
        _maa_pool.maa_pool(x, w1, b1, w2, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="out"):
        _maa_pool.maa_pool(x, w1, b1, w2, out=torch.empty(2, 9))


ADAPTER = [  # B, N (with CLS / CLS+SEP in front), H, P, E, pool_start, r
    (2, 8, 24, 16, 24, 1, 0.05),
    (3, 102, 64, 48, 32, 2, 0.25),
    (1, 258, 24, 24, 16, 1, 0.5),
    (2, 9, 768, 256, 256, 1, 0.05),  # the paper's widths: ViT-B 768 → proj 256 → combine 256
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("B,N,H,P,E,pool_start,r", ADAPTER)
def test_patch_pool_adapter_matches_reference(B, N, H, P, E, pool_start, r, masked, dtype):
    tokens = torch.randn(B, N, H).to(dtype)
    w1, b1, w2 = _weights(H, dtype)
    proj_w, proj_b = (torch.randn(P, H) / H**0.5).to(dtype), (torch.randn(P) * 0.1).to(dtype)
    comb_w, comb_b = (torch.randn(E, P) / P**0.5).to(dtype), (torch.randn(E) * 0.1).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(B, N) < 0.6
        mask[0, pool_start:] = False  # nothing to pool: the embedding is the global token's alone
    args = (w1, b1, w2, proj_w, proj_b, comb_w, comb_b)
    out = torch.full((B, E), float("nan"), dtype=dtype)
    got = kernels.patch_pool_adapter(tokens, mask, *args, r, pool_start, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = reference.patch_pool_adapter(tokens.double(), mask, *(a.double() for a in args), r, pool_start)
    assert_close(got, ref, RTOL[dtype])
    assert torch.allclose(got.double().norm(dim=-1), torch.ones(B, dtype=torch.float64), atol=RTOL[dtype] * 4)
