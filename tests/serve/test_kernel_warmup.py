"""A server that runs the fused Triton kernels compiles and tunes every kernel call at every batch size its batcher
can form before /readyz, into the kernel cache folder the deployment keeps (here: the Triton interpreter on CPU,
which tests/conftest.py turns on where no CUDA device is; on a GPU box the same path compiles for real)."""

import pytest

import fine_infer
from fine_infer.batching import BatchSettings

pytest.importorskip("triton", reason="the kernels extra is not installed")


@pytest.fixture(scope="module")
def ff_bundle(tmp_path_factory):
    from fine_infer.export import export_arch

    out = tmp_path_factory.mktemp("kw") / "ff"
    export_arch("fashion-fine", out, "tiny", pretrained=True)
    return out


def test_kernels_are_warmed_for_every_batch_size_before_ready(ff_bundle, tmp_path):
    from fine_infer.serve import ServeState

    session = fine_infer.load(ff_bundle, backend="torch", kernels=True)
    state = ServeState(session, batching=BatchSettings(max_batch_size=3), kernel_cache=str(tmp_path / "cache"))
    state.prepare()
    assert state.ready, state.error
    report = state.kernel_report
    assert report is not None and "skipped" not in report, report
    assert report["cache_dir"] == str((tmp_path / "cache").resolve())
    warmed = [c for c in report["calls"] if "skipped" not in c]
    # fashion-fine's image and text towers both pool through the patch-pooling adapter: its calls at batch 1..3
    ops = {c["op"] for c in warmed}
    assert ops, report["calls"]
    for op in ops:
        sizes = {c["shape"].get("B", c["shape"].get("Q")) for c in warmed if c["op"] == op}
        assert {1, 2, 3} <= sizes, (op, sizes)
    assert state.info()["kernels"]["cache_dir"] == report["cache_dir"]


def test_a_server_without_kernels_imports_and_warms_none(ff_bundle):
    from fine_infer.serve import ServeState

    state = ServeState(fine_infer.load(ff_bundle, backend="onnxruntime"), batching=BatchSettings(max_batch_size=2))
    state.prepare()
    assert state.ready and state.kernel_report is None and state.info()["kernels"] is None
