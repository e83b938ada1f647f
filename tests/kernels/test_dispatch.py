"""Dispatch between the Triton kernels and the PyTorch references.

- CPU tensors run the reference by default, even under TRITON_INTERPRET=1 (``auto`` never opts into the
  interpreter); forcing ``triton`` runs the kernel; a forced kernel that cannot run raises and says why.
- ONNX export (dynamo and legacy), ``torch.compile`` and meta tensors always see the reference: the exported graph
  has no trace of a kernel, even with ``triton`` forced.
- ``import fine_infer.kernels`` needs no Triton, and a CPU without the interpreter never imports it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from fine_infer import kernels
from fine_infer.kernels import _dispatch, reference

pytest.importorskip("triton")


def _maa_inputs(B=2, N=9, H=16):
    x = torch.randn(B, N, H)
    mask = torch.rand(B, N) < 0.7
    return x, torch.randn(H, H) / H**0.5, torch.randn(H), torch.randn(H), mask


def _counts(op):
    return _dispatch.COUNTS[(op, "triton")], _dispatch.COUNTS[(op, "reference")]


def test_cpu_default_is_the_reference_even_in_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py
    assert kernels.get_backend() == "auto"
    t0, r0 = _counts("maa_pool")
    out = kernels.maa_pool(*_maa_inputs())
    assert _counts("maa_pool") == (t0, r0 + 1)
    assert out.shape == (2, 16)


def test_forcing_the_kernel_runs_it():
    args = _maa_inputs()
    with kernels.use_backend("triton"), torch.no_grad():
        t0, r0 = _counts("maa_pool")
        got = kernels.maa_pool(*args)
        assert _counts("maa_pool") == (t0 + 1, r0)
    torch.testing.assert_close(got, reference.maa_pool(*args), rtol=1e-5, atol=1e-5)


def test_backend_switches_nest_and_restore():
    assert kernels.get_backend() == "auto"
    with kernels.use_backend("triton"):
        assert kernels.get_backend() == "triton"
        with kernels.use_backend("reference"):
            assert kernels.get_backend() == "reference"
        assert kernels.get_backend() == "triton"
    previous = kernels.set_backend("reference")
    try:
        assert previous == "auto" and kernels.get_backend() == "reference"
        with kernels.use_backend("triton"):
            assert kernels.get_backend() == "triton"
        assert kernels.get_backend() == "reference"
    finally:
        kernels.set_backend(previous)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        with kernels.use_backend("fast"):
            pass


def test_forced_kernel_refuses_what_it_cannot_run():
    x, w1, b1, w2, mask = _maa_inputs()
    with kernels.use_backend("triton"):
        with pytest.raises(kernels.KernelUnavailableError, match="inference-only"):
            kernels.maa_pool(x, w1.requires_grad_(), b1, w2, mask)
        with pytest.raises(kernels.KernelUnavailableError, match="bfloat16"):
            kernels.maa_pool(x.bfloat16(), w1.detach().bfloat16(), b1.bfloat16(), w2.bfloat16(), mask)
        q = torch.randn(1, 1, 4, 300)
        with pytest.raises(kernels.KernelUnavailableError, match="head dim 300"):
            kernels.attention_fusion(q, q, q)
    # auto falls back instead, and autograd works through the reference
    w1 = torch.randn(16, 16, requires_grad=True)
    kernels.maa_pool(x, w1, b1, w2, mask).sum().backward()
    assert w1.grad is not None


def test_auto_picks_the_kernel_on_cuda_tensors(monkeypatch):
    """The decision table for CUDA, without a GPU: tensors stand-ins that only carry a device."""
    monkeypatch.setattr(_dispatch, "is_tracing", lambda tensors=(): False)
    cuda = [types.SimpleNamespace(device=torch.device("cuda", 0), requires_grad=False) for _ in range(2)]
    cpu = [types.SimpleNamespace(device=torch.device("cpu"), requires_grad=False)]
    assert _dispatch.use_kernel("probe", cuda) is True
    assert _dispatch.use_kernel("probe", cuda, unsupported="too big") is False
    assert _dispatch.use_kernel("probe", cpu) is False  # the interpreter is opt-in
    assert _dispatch.use_kernel("probe", cuda + cpu) is False  # mixed devices
    with kernels.use_backend("reference"):
        assert _dispatch.use_kernel("probe", cuda) is False
    with kernels.use_backend("triton"):
        assert _dispatch.use_kernel("probe", cpu) is True  # TRITON_INTERPRET=1 here
        with pytest.raises(kernels.KernelUnavailableError, match="several devices"):
            _dispatch.use_kernel("probe", cuda + cpu)


def test_reference_path_honours_out():
    args = _maa_inputs()
    out = torch.full((2, 16), float("nan"))
    got = kernels.maa_pool(*args, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="out must be"):
        kernels.maa_pool(*args, out=torch.empty(3, 16))


def test_meta_tensors_use_the_reference():
    x, w1, b1, w2, mask = (t.to("meta") for t in _maa_inputs())
    with kernels.use_backend("triton"):
        out = kernels.maa_pool(x, w1, b1, w2, mask)
        q = torch.empty(2, 4, 10, 8, device="meta")
        att = kernels.attention_fusion(q, q, q, torch.ones(2, 10, dtype=torch.bool, device="meta"))
    assert out.is_meta and out.shape == (2, 16)
    assert att.is_meta and att.shape == (2, 4, 10, 8)


def test_torch_compile_traces_the_reference():
    def fn(q, k, v, m):
        return kernels.attention_fusion(q, k, v, m) * 2

    q, k, v = (torch.randn(1, 2, 11, 8) for _ in range(3))
    m = torch.rand(1, 11) < 0.6
    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    with kernels.use_backend("triton"), torch.no_grad():
        t0 = _dispatch.COUNTS[("attention_fusion", "triton")]
        got = compiled(q, k, v, m)
        assert _dispatch.COUNTS[("attention_fusion", "triton")] == t0
    torch.testing.assert_close(got, fn(q, k, v, m))


class _Tiny(torch.nn.Module):
    """The three hot blocks in one graph: MAA pooling, masked attention, the adapter."""

    def __init__(self, H=16, heads=2):
        super().__init__()
        self.heads = heads
        self.w1 = torch.nn.Parameter(torch.randn(H, H) / H**0.5)
        self.b1 = torch.nn.Parameter(torch.randn(H))
        self.w2 = torch.nn.Parameter(torch.randn(H))
        self.proj = torch.nn.Linear(H, 8)
        self.combine = torch.nn.Linear(8, 8)

    def forward(self, x, mask):
        B, N, H = x.shape
        q = x.reshape(B, N, self.heads, H // self.heads).transpose(1, 2)
        att = kernels.attention_fusion(q, q, q, mask).transpose(1, 2).reshape(B, N, H)
        pooled = kernels.maa_pool(att, self.w1, self.b1, self.w2, mask)
        emb = kernels.patch_pool_adapter(att, mask, self.w1, self.b1, self.w2, self.proj.weight, self.proj.bias,
                                         self.combine.weight, self.combine.bias, 0.25, 1)
        return pooled, emb


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_export_has_no_trace_of_a_kernel(tmp_path, dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(2, 9, 16)
    mask = torch.rand(2, 9) < 0.7
    mask[:, 0] = True
    path = tmp_path / "tiny.onnx"
    before = {op: _dispatch.COUNTS[(op, "triton")] for op in ("attention_fusion", "maa_pool", "patch_pool_adapter")}
    with kernels.use_backend("triton"), torch.no_grad():
        torch.onnx.export(model, (x, mask), str(path), dynamo=dynamo, input_names=["x", "mask"],
                          output_names=["pooled", "emb"])
    assert {op: _dispatch.COUNTS[(op, "triton")] for op in before} == before, "a kernel ran during export"
    graph = onnx.load(str(path))
    domains = {n.domain for n in graph.graph.node} | {f.domain for f in graph.functions}
    assert domains <= {"", "ai.onnx"}, f"non-standard ops in the exported graph: {domains}"
    text = str(graph).lower()
    assert "triton" not in text and "fine_infer" not in text
    # The graph computes the reference; the eager kernel agrees with it.
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: v for i, v in zip(sess.get_inputs(), (x.numpy(), mask.numpy()))}
    got = sess.run(None, feeds)
    with torch.no_grad():
        want = model(x, mask)
        with kernels.use_backend("triton"):
            fused = model(x, mask)
    for g, w, f in zip(got, want, fused):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(f, w, rtol=1e-4, atol=1e-5)


def _run(code: str, env_updates: dict[str, str | None]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for k, v in env_updates.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_cpu_without_interpreter_never_imports_triton():
    res = _run("""
        import sys, torch
        from fine_infer import kernels
        x = torch.randn(2, 5, 8)
        kernels.maa_pool(x, torch.randn(8, 8), torch.randn(8), torch.randn(8))
        q = torch.randn(1, 2, 5, 4)
        kernels.attention_fusion(q, q, q)
        kernels.similarity_topk(torch.randn(2, 8), torch.randn(20, 8), 3)
        assert "triton" not in sys.modules, "triton was imported on the reference path"
        try:
            with kernels.use_backend("triton"):
                kernels.attention_fusion(q, q, q)
        except kernels.KernelUnavailableError as e:
            print("REFUSED:", e)
    """, {"TRITON_INTERPRET": None})
    assert res.returncode == 0, res.stderr
    assert "REFUSED:" in res.stdout and "TRITON_INTERPRET is not set" in res.stdout


def test_import_without_triton_installed():
    res = _run("""
        import sys
        sys.modules["triton"] = None  # as if not installed: import triton raises ImportError
        import torch
        from fine_infer import kernels
        x = torch.randn(2, 5, 8)
        print(kernels.maa_pool(x, torch.randn(8, 8), torch.randn(8), torch.randn(8)).shape)
        try:
            with kernels.use_backend("triton"):
                kernels.maa_pool(x, torch.randn(8, 8), torch.randn(8), torch.randn(8))
        except kernels.KernelUnavailableError as e:
            print("REFUSED:", e)
    """, {"TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr
    assert "torch.Size([2, 8])" in res.stdout
    assert "REFUSED:" in res.stdout and "not installed" in res.stdout


def test_public_limits_match_the_kernels():
    """fine_infer.kernels states the kernels' limits without importing them (they import Triton): keep in step."""
    from fine_infer.kernels import _attention, _fusion_block, _topk

    assert kernels._MAX_HEAD_DIM == _attention.MAX_HEAD_DIM
    assert kernels._MAX_K == _topk.MAX_K
    assert kernels._MAX_FFN == _fusion_block.MAX_FFN
