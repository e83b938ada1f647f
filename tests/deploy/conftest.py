"""Fixtures for the deployment tests: tiny zoo bundles with fp16/int8/cpu-opt variants, a fake ``tensorrt``."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from deploy_helpers import FakeTensorRT, build_tiny, export_with_variants


@pytest.fixture(scope="session")
def deploy_bundle(tmp_path_factory):
    """``deploy_bundle(arch)`` → (bundle path, export report, model): built once per arch per session."""
    root = tmp_path_factory.mktemp("deploy")
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            torch.manual_seed(0)
            model = build_tiny(arch)
            out = root / arch
            cache[arch] = (out, export_with_variants(model, out), model)
        return cache[arch]

    return get


@pytest.fixture
def fake_trt(monkeypatch):
    """``fake_trt(version, **kw)`` installs a :class:`FakeTensorRT` as ``tensorrt``, a fake GPU (Orin, sm 8.7)
    and a fake ``torch.cuda.device`` scope (the builder records the device that was current)."""
    import fine_infer.export.engines as trt_mod

    def install(version: str = "10.3.0", **kw) -> FakeTensorRT:
        fake = FakeTensorRT(version, **kw)
        names = ("__version__", "NetworkDefinitionCreationFlag", "BuilderFlag", "MemoryPoolType", "Logger", "Builder",
                 "OnnxParser", "HardwareCompatibilityLevel")
        monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(**{k: getattr(fake, k) for k in names}))
        monkeypatch.setattr(trt_mod, "cuda_device", lambda index=0: ("Orin", "8.7"))

        @contextlib.contextmanager
        def device_scope(index):  # torch.cuda.device(index), without CUDA
            previous, fake.current_device = fake.current_device, index
            try:
                yield
            finally:
                fake.current_device = previous

        monkeypatch.setattr(trt_mod, "_device_scope", device_scope)
        return fake

    return install
