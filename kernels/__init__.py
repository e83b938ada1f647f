"""Fused blocks of the model family (``fine_infer.kernels``): this is the public API.

Each function runs a Triton kernel or the plain PyTorch reference of the same name in
:mod:`fine_infer.kernels.reference`, decided call by call (:mod:`fine_infer.kernels._dispatch`):

- while torch exports or traces (ONNX export, ``torch.export``, ``torch.compile``, FakeTensor/meta inputs): the
  reference, always, so exported graphs never contain a kernel;
- backend ``"auto"`` (default): the kernel on CUDA tensors (inference only, supported sizes), else the reference;
- backend ``"triton"``: the kernel — on CUDA, or on CPU in the Triton interpreter when ``TRITON_INTERPRET=1`` was
  set before the kernels were first used — or :class:`KernelUnavailableError` saying why not;
- backend ``"reference"``: the reference.

Switch with :func:`set_backend` (process-wide; ``FINE_INFER_KERNELS`` sets the initial value) or
:func:`use_backend` (a ``with`` block). Triton is imported only when a kernel runs, so ``import fine_infer.kernels``
works without it. Every function takes an optional ``out=`` buffer. Masks are bool, True = keep.

    from fine_infer import kernels
    with kernels.use_backend("triton"):
        pooled = kernels.maa_pool(x, w1, b1, w2, mask)
"""

from __future__ import annotations

if __name__ != "fine_infer.kernels":  # a bare `import kernels` found this folder: hand it on (fine_infer/_bare_import.py)
    from fine_infer._bare_import import step_aside

    step_aside(__name__, __file__)

import torch

from fine_infer.kernels import reference
from fine_infer.kernels._dispatch import (
    BACKENDS,
    KernelUnavailableError,
    get_backend,
    set_backend,
    use_backend,
    use_kernel,
)
from fine_infer.kernels._dispatch import into as _into
from fine_infer.kernels.reference import NORM_KINDS, FusionBlockWeights

_FLOATS = (torch.float16, torch.float32)
_MAX_HEAD_DIM = 256  # kept in step with _attention.MAX_HEAD_DIM (not imported: that module imports Triton)
_MAX_K = 1024  # _topk.MAX_K
_MAX_FFN = 1024  # _fusion_block.MAX_FFN


def _dtype_problem(*tensors: torch.Tensor | None) -> str | None:
    for t in tensors:
        if t is not None and t.dtype not in _FLOATS:
            return f"the kernels take float16/float32, not {t.dtype}"
    return None


def maa_pool(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, mask: torch.Tensor | None = None,
    *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fashion-FINE's additive-attention pooler: ``softmax_tokens(tanh(x W1ᵀ + b1) · w2)``-weighted sum of ``x``.

    ``x`` (B, N, H), ``w1`` (H, H), ``b1`` (H,), ``w2`` (H,), ``mask`` (B, N) bool (True = keep) or None →
    (B, H) in ``x``'s dtype; a row without a kept token is 0. The kernel makes one pass over the tokens with an
    online softmax: the (B, N, H) hidden activations never reach memory.
    """
    if use_kernel("maa_pool", (x, w1, b1, w2, mask), lambda: _dtype_problem(x, w1, b1, w2)):
        from fine_infer.kernels import _maa_pool

        return _maa_pool.maa_pool(x, w1, b1, w2, mask, out=out)
    return _into(out, reference.maa_pool(x, w1, b1, w2, mask))


def patch_pool_adapter(
    tokens: torch.Tensor, mask: torch.Tensor | None,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
    proj_w: torch.Tensor, proj_b: torch.Tensor, combine_w: torch.Tensor, combine_b: torch.Tensor,
    r: float, pool_start: int = 1, *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fashion-FINE's MAA integration, encoder tokens → embedding (B, E): ``norm((1-r)·g + r·l)`` with
    ``g = norm(combine(proj(CLS)))`` and ``l = norm(combine(proj(maa_pool(tokens[:, pool_start:]))))``.

    See :func:`fine_infer.kernels.reference.patch_pool_adapter` for the arguments.
    """
    tensors = (tokens, mask, w1, b1, w2, proj_w, proj_b, combine_w, combine_b)
    if use_kernel("patch_pool_adapter", tensors, lambda: _dtype_problem(*tensors[:1], *tensors[2:])):
        from fine_infer.kernels import _maa_pool

        return _maa_pool.patch_pool_adapter(tokens, mask, w1, b1, w2, proj_w, proj_b, combine_w, combine_b, r,
                                            pool_start, out=out)
    return _into(out, reference.patch_pool_adapter(tokens, mask, w1, b1, w2, proj_w, proj_b, combine_w, combine_b,
                                                   r, pool_start))


def attention_fusion(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
    *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked multi-head attention ``softmax(q kᵀ / √d) v``: ``q``, ``k``, ``v`` (B, heads, L, d) any strides,
    ``key_padding_mask`` (B, L) bool (True = keep) or None → (B, heads, L, d). A query whose keys are all masked
    returns zeros. The kernel streams keys with an online softmax: no (L, L) matrix in memory, any ``L``.
    """
    def problem() -> str | None:
        if q.dtype != k.dtype or q.dtype != v.dtype:
            return "q, k and v have different dtypes"
        if q.shape[-1] > _MAX_HEAD_DIM:
            return f"head dim {q.shape[-1]} > {_MAX_HEAD_DIM}"
        return _dtype_problem(q)

    if use_kernel("attention_fusion", (q, k, v, key_padding_mask), problem):
        from fine_infer.kernels import _attention

        return _attention.attention_fusion(q, k, v, key_padding_mask, out=out)
    return _into(out, reference.attention_fusion(q, k, v, key_padding_mask))


def fusion_block(
    x: torch.Tensor, key_padding_mask: torch.Tensor | None, weights: FusionBlockWeights, num_heads: int,
    norm: str = "annotated", eps: float = 1e-6, *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One pre-norm attention-fusion block of MAAF / RAF: ``x += attn(norm1(x))``, ``x += ffn(norm2(x))``.

    ``x`` (B, L, D), ``key_padding_mask`` (B, L) bool or None, ``weights`` a :class:`FusionBlockWeights`
    (``FusionBlockWeights.from_state_dict(block.state_dict())``), ``norm`` ``"annotated"`` (yahoo/maaf) or
    ``"layernorm"``. The kernel path fuses norm1, the attention core, the residuals and norm2 + FFN (see
    :mod:`fine_infer.kernels._fusion_block`); projections run on cuBLAS.
    """
    tensors = (x, key_padding_mask, *(getattr(weights, f) for f in FusionBlockWeights._KEYS))

    def problem() -> str | None:
        if x.shape[-1] % num_heads == 0 and x.shape[-1] // num_heads > _MAX_HEAD_DIM:
            return f"head dim {x.shape[-1] // num_heads} > {_MAX_HEAD_DIM}"
        if weights.ffn1_weight.shape[0] > _MAX_FFN:
            return f"FFN width {weights.ffn1_weight.shape[0]} > {_MAX_FFN}"
        return _dtype_problem(*tensors[:1], *tensors[2:])

    if use_kernel("fusion_block", tensors, problem):
        from fine_infer.kernels import _fusion_block

        return _fusion_block.fusion_block(x, key_padding_mask, weights, num_heads, norm, eps, out=out)
    return _into(out, reference.fusion_block(x, key_padding_mask, weights, num_heads, norm, eps))


def similarity_topk(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, *, out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products of ``queries`` (Q, D) against ``gallery`` (N, D), fp16 or fp32:
    ``(scores (Q, k) float32, indices (Q, k) int64)``, best first, ties broken by the lower index; beyond the
    gallery, ``-inf`` / ``-1``. The kernel keeps a running top-k per query: no (Q, N) score matrix in memory.
    """
    def problem() -> str | None:
        return f"k={k} outside 1..{_MAX_K}" if not 1 <= k <= _MAX_K else _dtype_problem(queries, gallery)

    if use_kernel("similarity_topk", (queries, gallery), problem):
        from fine_infer.kernels import _topk

        return _topk.similarity_topk(queries, gallery, k, out=out)
    scores, idx = reference.similarity_topk(queries, gallery, k)
    if out is None:
        return scores, idx
    return _into(out[0], scores), _into(out[1], idx)


__all__ = [
    "BACKENDS",
    "FusionBlockWeights",
    "KernelUnavailableError",
    "NORM_KINDS",
    "attention_fusion",
    "fusion_block",
    "get_backend",
    "maa_pool",
    "patch_pool_adapter",
    "reference",
    "set_backend",
    "similarity_topk",
    "use_backend",
]
