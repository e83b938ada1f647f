"""The zoo models with the kernels forced: every graph of the archs that call ``fine_infer.kernels`` (tiny presets,
interpreter) dispatches to its Triton kernel and matches the same model on the reference backend."""

from __future__ import annotations

import pytest
import torch

from fine_infer import kernels
from fine_infer.kernels import _dispatch

pytest.importorskip("triton")
_registry = pytest.importorskip("fine_infer.models._registry")

KERNEL_ARCHS = {"fashion-fine": "patch_pool_adapter", "maaf": "attention_fusion", "raf": "attention_fusion"}


def _model(arch: str):
    entry = _registry.get_arch(arch)
    torch.manual_seed(0)
    return entry.model_cls(entry.presets["tiny"]()).eval()


@pytest.mark.parametrize("arch", sorted(KERNEL_ARCHS))
def test_zoo_graphs_run_their_kernels(arch):
    model = _model(arch)
    op = KERNEL_ARCHS[arch]
    for name in model.graphs():
        module = model.graph_module(name)
        inputs = list(model.example_inputs(name, batch=3, generator=torch.Generator().manual_seed(1)).values())
        with torch.inference_mode():
            want = module(*inputs)
            before = _dispatch.COUNTS[(op, "triton")]
            with kernels.use_backend("triton"):
                got = module(*inputs)
            assert _dispatch.COUNTS[(op, "triton")] > before, f"{arch}/{name} did not reach the {op} kernel"
        want = want if isinstance(want, tuple) else (want,)
        got = got if isinstance(got, tuple) else (got,)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()))
