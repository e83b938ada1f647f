"""Warming the kernels up before a server reports ready (``fine_infer.kernels.record_shapes`` / ``warm_up``) and
keeping the compiled kernels and tuning choices across restarts (``configure_cache``).

On the CPU the warm-up runs in the interpreter (nothing compiles, but every recorded call, batch size and k bucket
must run through the kernel path); on a GPU (``gpu`` marker) a second process with the same cache directory must be
ready much faster than the first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from fine_infer import kernels
from fine_infer.kernels import _dispatch

pytest.importorskip("triton")
_registry = pytest.importorskip("fine_infer.models._registry")


def _model(arch: str):
    entry = _registry.get_arch(arch)
    torch.manual_seed(0)
    return entry.model_cls(entry.presets["tiny"]()).eval()


def _probe(model, batch=2):
    """What serve's probe does: one call of each graph (here on the reference path: cheap)."""
    for name in model.graphs():
        inputs = model.example_inputs(name, batch=batch, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            model.graph_module(name)(*inputs.values())


def test_record_shapes_sees_every_entry_point_from_every_thread():
    ff, maaf = _model("fashion-fine"), _model("maaf")
    with kernels.use_backend("reference"), kernels.record_shapes() as log:
        _probe(ff)
        worker = threading.Thread(target=_probe, args=(maaf,))  # serve's batcher calls from its own threads
        worker.start()
        worker.join()
        kernels.similarity_topk(torch.randn(3, 8), torch.randn(50, 8).half(), 5)
    ops = {op for op, _ in log.calls}
    assert ops == {"patch_pool_adapter", "attention_fusion", "similarity_topk"}, ops
    att = [s for op, s in log.calls if op == "attention_fusion"]
    assert all(s["B"] == 2 and s["mask"] in (True, False) and len(s["strides"]) == 4 for s in att)
    topk = next(s for op, s in log.calls if op == "similarity_topk")
    assert topk == {"Q": 3, "D": 8, "N": 50, "k": 5, "dtype": "float32", "gallery_dtype": "float16"}
    kernels.similarity_topk(torch.randn(3, 8), torch.randn(50, 8), 5)  # outside the block: not recorded
    assert len([1 for op, _ in log.calls if op == "similarity_topk"]) == 1


def test_warm_up_runs_every_call_at_every_batch_size_and_k_bucket(interpreter):
    model = _model("fashion-fine")
    with kernels.use_backend("reference"), kernels.record_shapes() as log:
        _probe(model)
        kernels.similarity_topk(torch.randn(1, 8), torch.randn(700, 8).half(), 10)
    before = dict(_dispatch.COUNTS)
    report = kernels.warm_up(log, batch_sizes=[1, 3], max_k=300, device="cpu")  # the interpreter here
    ran = [(c["op"], c["shape"].get("B", c["shape"].get("Q")), c["shape"].get("k")) for c in report["calls"]]
    assert {(op, b) for op, b, _ in ran if op == "patch_pool_adapter"} == {("patch_pool_adapter", 1),
                                                                           ("patch_pool_adapter", 3)}
    # one k per width bucket (128, 256, 512) up to max_k, plus the recorded one, each at both batch sizes
    assert sorted({k for op, _, k in ran if op == "similarity_topk"}) == [10, 128, 256, 300]
    assert len([1 for op, _, _ in ran if op == "similarity_topk"]) == 8
    for op in ("patch_pool_adapter", "similarity_topk"):
        assert _dispatch.COUNTS[(op, "triton")] - before.get((op, "triton"), 0) == sum(1 for o, _, _ in ran if o == op)
    assert report["seconds"] > 0 and report["cache_dir"] and "skipped" not in report


def test_a_call_the_kernel_does_not_take_is_reported_not_raised(interpreter):
    """A head dim over the kernel's limit runs on the reference under ``auto``: the warm-up says so and goes on."""
    calls = [("attention_fusion", {"B": 1, "heads": 1, "L": 3, "d": 300, "dtype": "float32", "mask": False}),
             ("maa_pool", {"B": 1, "N": 4, "H": 8, "dtype": "float32", "mask": True})]
    report = kernels.warm_up(calls, device="cpu")
    assert "head dim 300 > 256" in report["calls"][0]["skipped"] and "skipped" not in report["calls"][1]


def test_warm_up_without_a_cuda_device_is_a_no_op(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU server: nothing can compile
    report = kernels.warm_up([("maa_pool", {"B": 1, "N": 4, "H": 8, "dtype": "float32", "mask": False})],
                             device="cpu")
    assert report["calls"] == [] and "no CUDA device" in report["skipped"]


def test_configure_cache_points_triton_at_a_kept_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "home"))
    assert kernels.configure_cache() == str(tmp_path / "home" / ".triton" / "cache")
    path = kernels.configure_cache(tmp_path / "kept")
    assert path == os.environ["TRITON_CACHE_DIR"] == str((tmp_path / "kept").resolve()) and os.path.isdir(path)
    import triton

    assert triton.knobs.cache.dir == path  # what Triton reads when it compiles and tunes


WARM = """
import json, sys, time
t0 = time.perf_counter()
import torch
from fine_infer import kernels
kernels.configure_cache(sys.argv[1])
calls = [("attention_fusion", {"B": 32, "heads": 8, "L": 260, "d": 64, "dtype": "float16", "mask": True,
                               "strides": (260 * 512, 64, 512, 1)}),
         ("patch_pool_adapter", {"B": 32, "N": 257, "H": 768, "P": 256, "E": 256, "dtype": "float16", "mask": False,
                                 "pool_start": 1}),
         ("similarity_topk", {"Q": 16, "D": 256, "N": 100000, "k": 10, "dtype": "float32",
                              "gallery_dtype": "float16"})]
report = kernels.warm_up(calls, batch_sizes=[1, 8, 32], max_k=100)
print(json.dumps({"seconds": time.perf_counter() - t0, "tuned": report["tuned"]}))
"""


@pytest.mark.gpu
def test_a_restarted_process_is_warm_in_seconds(tmp_path):
    """Two processes share a cache folder: the second compiles and tunes nothing, so it is ready far sooner."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", WARM, str(tmp_path / "cache")], env=env, capture_output=True,
                             text=True, timeout=3600)
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    cold, warm = runs[0]["seconds"], runs[1]["seconds"]
    print(f"warm-up: cold {cold:.1f} s, restarted {warm:.1f} s")
    assert warm < max(30.0, cold / 4), (cold, warm)
    assert runs[1]["tuned"] == runs[0]["tuned"]
