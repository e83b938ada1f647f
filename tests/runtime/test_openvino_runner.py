"""The OpenVINO runner on real tiny bundles of every arch: the ORT runner's parity (f32 within 1e-4 of PyTorch and of
ONNX Runtime), bf16 within its gate, hints and threads, concurrent callers, clear errors, and no torch on its path."""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import fine_infer
from fine_infer.errors import BackendUnavailableError, BundleError, ConfigError, InputError
from fine_infer.models import list_archs

pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'fine-infer[openvino]'")

from fine_infer.runtime.openvino_runner import (  # noqa: E402
    OpenVINORunner,
    device_capabilities,
    precision_unsupported,
)

ZOO_ARCHS = ["attributes", "fashion-fine", "maaf", "raf", "triplet"]  # the five archs of the model zoo
ARCHS = list_archs()  # every registered arch: the zoo's five, and any added later
ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Per arch: (bundle path, the PyTorch model it was exported from). Exported without the export gates (the
    tests here are the parity check; tests/export gates the same exports) to keep the suite quick."""
    from fine_infer.export import export_model
    from fine_infer.models import create

    root = tmp_path_factory.mktemp("ov")
    out = {}
    for arch in ARCHS:
        model = create(arch, "tiny").eval()
        export_model(model, root / arch, gates=False)
        out[arch] = (root / arch, model)
    return out


def _inputs(model, graph: str, batch: int, seq_len: int | None = None) -> dict[str, np.ndarray]:
    """Fresh random inputs, pixels as standard normals, drawn from torch's global RNG (each call draws new ones;
    tests/conftest.py seeds it per test with the printed seed)."""
    return {k: v.numpy() for k, v in model.example_inputs(graph, batch, seq_len).items()}


def _torch(model, spec, feeds):
    with torch.no_grad():
        out = model.graph_module(spec.name)(*[torch.from_numpy(feeds[t.name]) for t in spec.inputs])
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return {t.name: o.float().numpy() for t, o in zip(spec.outputs, outs)}


def test_the_five_zoo_archs_are_registered():
    assert set(ZOO_ARCHS) <= set(ARCHS), f"not registered: {sorted(set(ZOO_ARCHS) - set(ARCHS))}"


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_matches_torch_and_onnxruntime_within_1e4(tiny, arch):
    out, model = tiny[arch]
    ov = fine_infer.load(out, backend="openvino")
    ort = fine_infer.load(out, backend="onnxruntime")
    text_len = model.text_preprocess.max_length if model.text_preprocess else None
    for name, entry in ov.manifest.graphs.items():
        # two batch sizes and, for text graphs, two sequence lengths: the dynamic axes really are dynamic
        for batch, seq in ((1, text_len), (5, max(2, (text_len or 4) // 2))):
            feeds = _inputs(model, name, batch, seq if text_len else None)
            got, ref, base = ov.run(name, feeds), _torch(model, entry.spec, feeds), ort.run(name, feeds)
            for k in ref:
                assert got[k].dtype == np.float32 and got[k].shape == ref[k].shape
                np.testing.assert_allclose(got[k], ref[k], atol=ATOL, err_msg=f"{arch}.{name}.{k} vs torch")
                np.testing.assert_allclose(got[k], base[k], atol=ATOL, err_msg=f"{arch}.{name}.{k} vs ORT")
                if entry.spec.task != "classify":
                    np.testing.assert_allclose(np.linalg.norm(got[k], axis=1), 1.0, atol=1e-5)
    assert set(ov.providers.values()) == {"OpenVINO-CPU-f32"}  # f32 really: OpenVINO's CPU default may be bf16
    assert ov.label == "openvino" and ov.choice is None


def _bf16_or_skip():
    why = precision_unsupported("bf16")
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("arch", ["fashion-fine", "maaf"])
def test_bf16_runs_in_bf16_within_its_gate(tiny, arch):
    _bf16_or_skip()
    out, model = tiny[arch]
    s = fine_infer.load(out, backend="openvino", variant="bf16")
    for name, entry in s.manifest.graphs.items():
        feeds = _inputs(model, name, 6)
        got, ref = s.run(name, feeds), _torch(model, entry.spec, feeds)
        for k in ref:
            cos = (got[k] * ref[k]).sum(1) / np.linalg.norm(got[k], axis=1) / np.linalg.norm(ref[k], axis=1)
            assert cos.min() >= 0.999, (name, cos.min())  # the bf16 gate's cosine
            assert np.abs(got[k] - ref[k]).max() > 1e-6  # and it really ran in reduced precision
    assert set(s.providers.values()) == {"OpenVINO-CPU-bf16"}
    assert s.label == "openvino/bf16"


def test_cpu_without_bf16_gets_a_reason_not_a_crash(tiny):
    out, model = tiny["triplet"]
    b = fine_infer.load(out, backend="openvino").bundle
    entry = b.graph("image")
    no_bf16 = {"FP32", "INT8", "BIN", "EXPORT_IMPORT"}
    why = precision_unsupported("bf16", no_bf16)
    assert "cannot run bf16" in why and "BF16" in why and "use f32" in why
    assert precision_unsupported("f32", no_bf16) == ""
    assert "FP32" in device_capabilities()  # what this CPU really reports
    with pytest.raises(BackendUnavailableError, match="cannot run bf16"):
        OpenVINORunner(entry.spec, b.file(entry.file), "bf16", capabilities=no_bf16)
    r = OpenVINORunner(entry.spec, b.file(entry.file), "f32", capabilities=no_bf16)
    assert r.run(_inputs(model, "image", 2))["embedding"].shape[0] == 2


def test_throughput_hint_threads_and_concurrent_callers(tiny):
    out, model = tiny["fashion-fine"]
    s = fine_infer.load(out, backend="openvino", hint="throughput", threads=2)
    feeds = [_inputs(model, "text", 3) for _ in range(6)]
    expected = [s.run("text", f)["embedding"] for f in feeds]
    info = s.runner("text").info()
    assert info["hint"] == "throughput" and info["threads"] == 2 and info["infer_requests"] >= 1
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = s.run("text", feeds[i])["embedding"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(feeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i, e in enumerate(expected):  # every caller got its own rows back, not another caller's
        np.testing.assert_allclose(results[i], e, atol=1e-6)
    lat = fine_infer.load(out, backend="openvino", threads=1)
    lat.run("text", feeds[0])
    assert lat.runner("text").info()["hint"] == "latency" and lat.runner("text").info()["infer_requests"] == 1


def test_bad_options_and_feeds_are_clear_errors(tiny):
    out, model = tiny["fashion-fine"]
    with pytest.raises(ConfigError, match="int8-static and cpu-opt are ONNX Runtime graphs"):
        fine_infer.load(out, backend="openvino", variant="cpu-opt")
    with pytest.raises(BundleError, match="no OpenVINO int8 model.*--int8-static"):  # said at load, not first run
        fine_infer.load(out, backend="openvino", variant="int8")
    for backend in ("onnxruntime", "auto"):  # auto with a variant runs ONNX Runtime, which has no bf16 variant
        with pytest.raises(BundleError, match="no variant 'bf16'.*load with backend='openvino'"):
            fine_infer.load(out, backend=backend, variant="bf16")
    with pytest.raises(ConfigError, match="OpenVINO performance hint"):
        fine_infer.load(out, backend="onnxruntime", hint="throughput")
    with pytest.raises(ConfigError, match="unknown OpenVINO performance hint"):
        fine_infer.load(out, backend="openvino", hint="fast")
    s = fine_infer.load(out, backend="openvino")
    feeds = _inputs(model, "text", 2)
    with pytest.raises(InputError, match="needs int64"):
        s.run("text", {**feeds, "input_ids": feeds["input_ids"].astype(np.float32)})
    with pytest.raises(InputError, match="missing"):
        s.run("text", {"input_ids": feeds["input_ids"]})


def test_openvino_path_imports_no_torch(tiny):
    out, model = tiny["fashion-fine"]
    ids = _inputs(model, "text", 2)
    code = (
        "import sys, json, numpy as np, fine_infer\n"
        f"s = fine_infer.load({str(out)!r}, backend='openvino')\n"
        f"f = {{k: np.array(v) for k, v in json.loads({json.dumps({k: v.tolist() for k, v in ids.items()})!r}).items()}}\n"
        "e = s.run('text', f)['embedding']\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'shape': list(e.shape), 'provider': s.providers['text']}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res == {"torch": False, "shape": [2, model.embed_dim], "provider": "OpenVINO-CPU-f32"}
