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

A first call per shape bucket compiles and autotunes (minutes on a small CPU). A server warms up before it reports
ready, and keeps Triton's cache across restarts (:mod:`fine_infer.kernels._warmup`)::

    kernels.configure_cache("/var/cache/fine-infer/triton")   # TRITON_CACHE_DIR, a kept volume
    with kernels.record_shapes() as shapes:                   # one probe request of each kind, any backend
        session.embed_images([image]); session.embed_texts(["a"]); index.search(query, k=1)
    kernels.warm_up(shapes, batch_sizes=range(1, max_batch + 1), max_k=max_k)
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
from fine_infer.kernels._dispatch import note as _note
from fine_infer.kernels._dispatch import recording_active as _recording
from fine_infer.kernels.reference import NORM_KINDS, FusionBlockWeights

_FLOATS = (torch.float16, torch.float32)
_MAX_HEAD_DIM = 256  # kept in step with _attention.MAX_HEAD_DIM (not imported: that module imports Triton)
_MAX_K = 1024  # _topk.MAX_K
_MAX_FFN = 1024  # _fusion_block.MAX_FFN; on a GPU, also what fits its shared memory (_fusion_block.ffn_unsupported)


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
    if _recording():
        _note("maa_pool", (x,), B=x.shape[0], N=x.shape[1], H=x.shape[2], dtype=str(x.dtype)[6:],
              mask=mask is not None)
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
    if _recording():
        _note("patch_pool_adapter", (tokens,), B=tokens.shape[0], N=tokens.shape[1], H=tokens.shape[2],
              P=proj_w.shape[0], E=combine_w.shape[0], dtype=str(tokens.dtype)[6:], mask=mask is not None,
              pool_start=int(pool_start))
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

    if _recording():
        _note("attention_fusion", (q,), B=q.shape[0], heads=q.shape[1], L=q.shape[2], d=q.shape[3],
              dtype=str(q.dtype)[6:], mask=key_padding_mask is not None, strides=tuple(q.stride()))
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
        problem = _dtype_problem(*tensors[:1], *tensors[2:])
        if problem is None and x.is_cuda:  # the kernel is about to run (Triton is imported anyway)
            from fine_infer.kernels import _fusion_block

            problem = _fusion_block.ffn_unsupported(weights.ffn1_weight.shape[0], x.dtype, x.device)
        return problem

    if _recording():
        _note("fusion_block", (x,), B=x.shape[0], L=x.shape[1], D=x.shape[2], heads=int(num_heads),
              FF=weights.ffn1_weight.shape[0], norm=norm, dtype=str(x.dtype)[6:],
              mask=key_padding_mask is not None)
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

    "Exact" means the reference's arithmetic: both sides promoted to their common dtype and scored with fp32
    accumulation. Mixed dtypes lose nothing: fp32 queries over an fp16 gallery are never rounded to fp16 (the
    kernel splits them into two fp16 halves, :mod:`fine_infer.kernels._topk`), so the result matches an fp32
    computation up to fp32 rounding, and indices differ only where scores are that close.
    """
    def problem() -> str | None:
        return f"k={k} outside 1..{_MAX_K}" if not 1 <= k <= _MAX_K else _dtype_problem(queries, gallery)

    if _recording():
        _note("similarity_topk", (queries, gallery), Q=queries.shape[0], D=queries.shape[1], N=gallery.shape[0],
              k=int(k), dtype=str(queries.dtype)[6:], gallery_dtype=str(gallery.dtype)[6:])
    if use_kernel("similarity_topk", (queries, gallery), problem):
        from fine_infer.kernels import _topk

        return _topk.similarity_topk(queries, gallery, k, out=out)
    scores, idx = reference.similarity_topk(queries, gallery, k)
    if out is None:
        return scores, idx
    return _into(out[0], scores), _into(out[1], idx)


def record_shapes():
    """``with kernels.record_shapes() as log:`` collects the shapes every kernel entry point sees (any backend, any
    thread) for :func:`warm_up`; see :mod:`fine_infer.kernels._warmup`."""
    from fine_infer.kernels import _warmup

    return _warmup.record_shapes()


def warm_up(shapes, *, batch_sizes=None, max_k=None, device=None) -> dict:
    """Compile and tune every recorded kernel call (``record_shapes``) at every batch size a server can form and
    every k bucket of search up to ``max_k``, before it reports ready; a report of what ran and how long it took.
    A no-op (with ``skipped`` in the report) without a CUDA device. See :mod:`fine_infer.kernels._warmup`."""
    from fine_infer.kernels import _warmup

    return _warmup.warm_up(shapes, batch_sizes=batch_sizes, max_k=max_k, device=device)


def configure_cache(path=None) -> str:
    """Point Triton's cache of compiled kernels and autotuning results at ``path`` (``TRITON_CACHE_DIR``; keep it
    across restarts) and return the folder in use. See :mod:`fine_infer.kernels._warmup`."""
    from fine_infer.kernels import _warmup

    return _warmup.configure_cache(path)


__all__ = [
    "BACKENDS",
    "FusionBlockWeights",
    "KernelUnavailableError",
    "NORM_KINDS",
    "attention_fusion",
    "configure_cache",
    "fusion_block",
    "get_backend",
    "maa_pool",
    "patch_pool_adapter",
    "record_shapes",
    "reference",
    "set_backend",
    "similarity_topk",
    "use_backend",
    "warm_up",
]
