"""FAISS export, and the device (torch) search path: its logic on CPU tensors here, on CUDA where present."""

import numpy as np
import pytest
from conftest import unit

from fine_infer.index import Index


@pytest.mark.parametrize("rescore", [False, True])
def test_to_faiss_holds_the_same_vectors_and_ids(dtype, rescore):
    faiss = pytest.importorskip("faiss")
    g, q = unit(3000, 48, 0), unit(20, 48, 1)
    ids = np.arange(3000) * 11 + 5
    index = Index(48, dtype, rescore=rescore)
    index.add(g, ids)
    index.remove(ids[:7])
    f = index.to_faiss()
    assert isinstance(f, faiss.IndexIDMap) and f.ntotal == len(index)
    fs, fi = f.search(q, 10)
    exact = rescore or dtype == "float32"  # the copies, or the stored values dequantised
    s, i = index.search(q, 10, exact=exact if dtype != "float32" else None)
    agree = (fi == i).mean()
    assert agree >= 0.999, agree
    np.testing.assert_allclose(fs, s, atol=1e-5)


def test_device_search_logic_on_cpu_tensors(dtype):
    """GpuGallery is device-agnostic torch code: run it on CPU tensors and compare with the native search."""
    pytest.importorskip("torch")
    from fine_infer.index._gpu import GpuGallery
    from fine_infer.index import _native_search

    g, q = unit(5000, 40, 2), unit(9, 40, 3)
    index = Index(40, dtype)
    index.add(g, np.arange(5000))
    store = index._store
    used = -(-store.n // _native_search.PANEL)
    rows = store.panels[:used].transpose(0, 2, 1).reshape(-1, 40)[: store.n]
    dev = GpuGallery("cpu", rows, store.scales, version=0)
    s1, i1 = dev.search(q, 12)
    s2, i2 = index.search(q, 12)
    assert (i1 == i2).all()
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    s3, i3 = dev.search(q[:2], 6000)  # k beyond the gallery: padded like the CPU path
    assert (i3[:, 5000:] == -1).all() and np.isneginf(s3[:, 5000:]).all()


@pytest.mark.gpu
def test_cuda_search_matches_cpu(dtype):
    g, q = unit(50_000, 128, 4), unit(64, 128, 5)
    cpu, gpu = Index(128, dtype, device="cpu"), Index(128, dtype, device="cuda")
    for index in (cpu, gpu):
        index.add(g, np.arange(50_000))
    s1, i1 = cpu.search(q, 10)
    s2, i2 = gpu.search(q, 10)
    assert (i1 == i2).mean() >= 0.999
    np.testing.assert_allclose(s1, s2, atol=1e-4)
    gpu.remove(np.arange(100))  # the device copy follows mutations
    assert not np.isin(gpu.search(q, 10)[1], np.arange(100)).any()
