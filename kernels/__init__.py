"""Fused blocks of the model family (``fine_infer.kernels``).

Each public function dispatches to a Triton kernel on CUDA tensors (or under ``TRITON_INTERPRET=1``) and to the
plain PyTorch reference in :mod:`fine_infer.kernels.reference` otherwise. Triton is imported only when a kernel
actually runs, so the models and export work without it.
"""

from fine_infer.kernels.reference import attention_fusion, maa_pool, patch_pool_adapter, similarity_topk

__all__ = ["attention_fusion", "maa_pool", "patch_pool_adapter", "similarity_topk"]
