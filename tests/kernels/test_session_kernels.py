"""The torch backend with the fused kernels on a real bundle: ``load(bundle, backend="torch", kernels=True)`` runs
the Triton kernels (interpreter on CPU) and gives the embeddings ONNX Runtime gives on the same bundle, within 1e-4."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("triton")
pytest.importorskip("onnxruntime")

import fine_infer  # noqa: E402
from fine_infer.export import export_arch  # noqa: E402
from fine_infer.kernels import _dispatch  # noqa: E402

KERNEL_OF = {"fashion-fine": "patch_pool_adapter", "maaf": "attention_fusion", "raf": "attention_fusion"}


@pytest.fixture(scope="module", params=sorted(KERNEL_OF))
def bundle(request, tmp_path_factory):
    arch = request.param
    out = tmp_path_factory.mktemp("kernel-bundles") / arch
    export_arch(arch, out, "tiny", batch_sizes=(1, 3))  # random weights: the comparison is of the two runtimes
    return arch, out


def _feeds(session, graph: str, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Fresh inputs for ``graph``: random pixels, and random token ids with ragged lengths (padding masked)."""
    spec = session.manifest.graphs[graph].spec
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        if t.name == "pixels":
            size = session.manifest.image.size
            feeds["pixels"] = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    if "input_ids" in feeds or any(t.name == "input_ids" for t in spec.inputs):
        texts = [" ".join(rng.choice(["red", "striped", "dress", "make", "it", "blue", "with", "dots"],
                                     int(rng.integers(1, 9)))) for _ in range(batch)]
        feeds["input_ids"], feeds["attention_mask"] = session.tokenize(texts)
    return feeds


def test_torch_backend_with_kernels_matches_onnxruntime(bundle, rng):
    arch, path = bundle
    ort = fine_infer.load(path, backend="onnxruntime")
    fused = fine_infer.load(path, backend="torch", kernels=True)
    op = KERNEL_OF[arch]
    for graph in ort.manifest.graphs:
        feeds = _feeds(ort, graph, 3, rng)
        before = _dispatch.COUNTS[(op, "triton")]
        got = fused.run(graph, feeds)
        assert _dispatch.COUNTS[(op, "triton")] > before, f"{arch}/{graph} did not run the {op} kernel"
        want = ort.run(graph, feeds)
        for name, w in want.items():
            assert got[name].dtype == np.float32
            np.testing.assert_allclose(got[name], w, rtol=0, atol=1e-4, err_msg=f"{arch}/{graph}/{name}")
            assert np.abs(w).max() > 1e-3  # never a comparison of zeros
