"""TensorRT: clear one-line errors on this CPU machine; the builder's logic against a fake ``tensorrt``; GPU tests.

The ``gpu`` tests build and run real engines; they are skipped (with the reason) where there is no CUDA GPU, and
need TensorRT installed as well.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from fine_infer.bundle import read_bundle
from fine_infer.compare import Tolerance, compare
from fine_infer.errors import BackendUnavailableError, BundleError, ConfigError
from fine_infer.export.engines import (
    EngineBuildError,
    build_bundle_engines,
    build_engine,
    default_profiles,
    tensorrt_module,
)
from fine_infer.runtime.tensorrt_runner import TensorRTRunner, check_engine_compat, read_engine_meta
from fine_infer.bundle.variants import variant_file
from fine_infer.specs import GraphSpec, TensorSpec

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
TRT_MISSING = "needs TensorRT (the gpu-cu12 / gpu-cu13 extra with NVIDIA's index, or JetPack's)"

TEXT = GraphSpec("text", "embed_text",
                 (TensorSpec("input_ids", "int64", ("batch", "sequence")),
                  TensorSpec("attention_mask", "int64", ("batch", "sequence"))),
                 (TensorSpec("embedding", "float32", ("batch", 32)),))


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here: the missing-TensorRT errors cannot happen")
def test_build_engine_and_runner_say_in_one_line_that_tensorrt_is_missing(deploy_bundle, tmp_path):
    out, _, _ = deploy_bundle("triplet")
    with pytest.raises(BackendUnavailableError) as info:
        build_engine(out / "image.onnx", tmp_path / "x.engine", {"pixels": ((1, 3, 64, 64),) * 3})
    msg = str(info.value)
    assert "TensorRT is not installed here" in msg and "\n" not in msg
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        build_bundle_engines(out)  # the lint passes first, then TensorRT is missing
    spec = read_bundle(out).manifest.graphs["image"].spec
    with pytest.raises(BackendUnavailableError, match="^backend 'tensorrt' needs TensorRT, which is not installed"):
        TensorRTRunner(spec, tmp_path / "x.engine")
    with pytest.raises(BackendUnavailableError):
        tensorrt_module()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here: the missing-TensorRT errors cannot happen")
def test_build_engine_command_fails_with_one_line_and_nonzero_exit(deploy_bundle, monkeypatch, capsys):
    from test_deploy_lint import run_cli

    out, _, _ = deploy_bundle("triplet")
    assert run_cli("build-engine", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("fine-infer build-engine: error: TensorRT is not installed here") and err.count("\n") == 1
    assert run_cli("build-engine", str(out), "--batch", "4,2,1") == 2  # checked before TensorRT loads
    assert "profile range for 'batch' must be MIN,OPT,MAX" in capsys.readouterr().err


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here: the missing-TensorRT errors cannot happen")
def test_build_engine_command_as_a_real_process(deploy_bundle):
    out, _, _ = deploy_bundle("triplet")
    r = subprocess.run([sys.executable, "-m", "fine_infer.cli", "build-engine", str(out)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "TensorRT is not installed here" in r.stderr


def test_default_profiles_cover_edge_batches_and_the_full_sequence():
    p = default_profiles(TEXT, 24)
    assert p["input_ids"] == ((1, 1), (4, 24), (16, 24)) and p["attention_mask"] == p["input_ids"]
    p = default_profiles(TEXT, 24, batch=(2, 2, 8), sequence=(8, 16, 32))
    assert p["input_ids"] == ((2, 8), (2, 16), (8, 32))
    image = GraphSpec("image", "embed_image", (TensorSpec("pixels", "float32", ("batch", 3, "side", "side")),), ())
    with pytest.raises(ConfigError, match="dynamic axis 'side' without a profile range; pass --axis side=MIN,OPT,MAX"):
        default_profiles(image)
    assert default_profiles(image, axes={"side": (224, 224, 448)})["pixels"][2] == (16, 3, 448, 448)
    with pytest.raises(ConfigError, match="--sequence"):
        default_profiles(TEXT)
    with pytest.raises(ConfigError, match="1 <= MIN <= OPT <= MAX"):
        default_profiles(TEXT, 24, batch=(4, 2, 1))


def test_tensorrt_10_fp16_flag_on_fp32_graphs_strong_typing_for_fp16_graphs(deploy_bundle, tmp_path, fake_trt):
    out, _, _ = deploy_bundle("triplet")
    prof = {"pixels": ((1, 3, 64, 64), (4, 3, 64, 64), (16, 3, 64, 64))}
    trt = fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))])
    info = build_engine(out / "image.onnx", tmp_path / "a.engine", prof, fp16=True, timing_cache_path=tmp_path / "tc")
    assert trt.calls["network_flags"] == 0 and trt.calls["flags"] == [trt.BuilderFlag.FP16]  # weak typing + FP16 flag
    assert (info.precision, info.typing, info.gpu, info.compute_capability) == ("fp16", "weak", "Orin", "8.7")
    assert trt.calls["profiles"]["pixels"] == prof["pixels"] and trt.calls["ignore_mismatch"] is False
    assert (tmp_path / "a.engine").read_bytes() == b"fake-engine-bytes"
    assert read_engine_meta(tmp_path / "a.engine")["tensorrt_version"] == "10.3.0"

    trt = fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))])
    info = build_engine(out / "image.fp16.onnx", tmp_path / "b.engine", prof, fp16=True,
                        timing_cache_path=tmp_path / "tc")
    assert trt.calls["network_flags"] == 1 << 5 and trt.calls["flags"] == []  # STRONGLY_TYPED, precision from the graph
    assert info.typing == "strong" and trt.calls["cache_in"] == b"timing-cache-bytes"  # the saved cache is reused

    trt = fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))])
    build_engine(out / "image.onnx", tmp_path / "c.engine", prof)
    assert trt.calls["network_flags"] == 0 and trt.calls["flags"] == []  # plain fp32


def test_tensorrt_11_builds_fp16_only_from_the_fp16_graph(deploy_bundle, tmp_path, fake_trt):
    out, _, _ = deploy_bundle("triplet")
    prof = {"pixels": ((1, 3, 64, 64), (4, 3, 64, 64), (16, 3, 64, 64))}
    trt = fake_trt("11.4.0", inputs=[("pixels", (-1, 3, 64, 64))])
    with pytest.raises(ConfigError, match="builds fp16 only from an fp16 graph"):
        build_engine(out / "image.onnx", tmp_path / "a.engine", prof, fp16=True)
    info = build_engine(out / "image.fp16.onnx", tmp_path / "a.engine", prof, fp16=True)
    assert info.typing == "strong" and info.precision == "fp16" and trt.calls["flags"] == []
    with pytest.raises(ConfigError, match="is dynamic .* but has no profile"):
        build_engine(out / "image.onnx", tmp_path / "b.engine", {})


def test_parser_errors_are_reported_per_node(deploy_bundle, tmp_path, fake_trt):
    out, _, _ = deploy_bundle("triplet")
    errors = [{"node": 7, "name": "node_conv_7", "op": "Conv", "message": "kernel weights must be an initializer"},
              {"node": 9, "name": "node_gemm", "op": "Gemm", "message": "unsupported"}]
    fake_trt("10.3.0", parse_errors=errors)
    expected = r"cannot parse image.onnx: node node_conv_7 \(Conv\): kernel weights must be an initializer \(\+1 more\)"
    with pytest.raises(EngineBuildError, match=expected) as info:
        build_engine(out / "image.onnx", tmp_path / "a.engine", {})
    assert [e["name"] for e in info.value.node_errors] == ["node_conv_7", "node_gemm"]


def test_bundle_engines_are_recorded_in_the_manifest_and_replaced_safely(deploy_bundle, tmp_path, fake_trt):
    src, _, _ = deploy_bundle("fashion-fine")  # two graphs, one with a sequence axis
    out = tmp_path / "bundle"
    shutil.copytree(src, out)
    fake_trt("10.3.0", inputs=[])
    infos = build_bundle_engines(out, fp16=True)
    b = read_bundle(out)  # checksums of engines, sidecars and the timing cache verify
    record = b.manifest.validation["tensorrt"]
    for name, entry in b.manifest.graphs.items():
        engine = variant_file(entry, "fp16", backend="tensorrt")
        assert engine.startswith(f"{name}.trt-fp16.") and engine in b.manifest.files
        assert record["engines"][f"{name}:trt-fp16"]["onnx"] == f"{name}.fp16.onnx"
        assert record["engines"][f"{name}:trt-fp16"]["gpu"] == "Orin"
        with pytest.raises(BundleError, match="is a TensorRT engine: load the bundle with backend='tensorrt'"):
            variant_file(entry, "trt-fp16")  # an engine is never handed to ONNX Runtime
    assert record["timing_cache"] in b.manifest.files and len(infos) == len(b.manifest.graphs)
    first = set(p.name for p in out.iterdir())
    build_bundle_engines(out, fp16=True)  # a rebuild: new files, the old engines are gone, the bundle still verifies
    b = read_bundle(out)
    now = set(p.name for p in out.iterdir())
    assert not any(n.endswith(".engine") for n in first & now) and len(now) == len(first)
    with pytest.raises(BundleError, match="no graph 'nope'"):
        build_bundle_engines(out, graphs=["nope"])


def test_engine_compatibility_is_checked_against_the_device():
    meta = {"engine": "image.trt.engine", "tensorrt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}
    check_engine_compat(meta, "10.3.0", "Orin", "8.7")
    expected = (r"built with TensorRT 10.3.0 on Orin \(compute capability 8.7\) but this device has TensorRT 10.7.0 "
                r".* rebuild it here")
    with pytest.raises(BackendUnavailableError, match=expected):
        check_engine_compat(meta, "10.7.0", "Orin", "8.7")
    with pytest.raises(BackendUnavailableError, match="compute capability 8.6"):
        check_engine_compat(meta, "10.3.0", "RTX 3060", "8.6")
    with pytest.warns(UserWarning, match="built on Orin and runs on Orin NX"):
        check_engine_compat(meta, "10.3.0", "Orin NX", "8.7")
    # compatible builds: TensorRT itself judges a version-compatible plan; an ampere+ plan runs on any sm >= 8.0
    check_engine_compat({**meta, "version_compatible": True}, "10.13.3", "Orin", "8.7")
    check_engine_compat({**meta, "hardware_compatibility": "ampere+"}, "10.3.0", "H100", "9.0")
    with pytest.raises(BackendUnavailableError, match="compute capability 7.5"):
        check_engine_compat({**meta, "hardware_compatibility": "ampere+"}, "10.3.0", "T4", "7.5")
    with pytest.raises(BackendUnavailableError, match="TensorRT 10.7.0"):
        check_engine_compat({**meta, "hardware_compatibility": "ampere+"}, "10.7.0", "Orin", "8.7")


PROF = {"pixels": ((1, 3, 64, 64), (4, 3, 64, 64), (16, 3, 64, 64))}


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0"])
def test_fp32_engines_are_ieee_fp32_tf32_cleared_and_recorded(deploy_bundle, tmp_path, fake_trt, version):
    """BuilderFlag.TF32 is on by default in TensorRT: an engine recorded "fp32" must have it cleared."""
    import json

    out, _, _ = deploy_bundle("triplet")
    trt = fake_trt(version, inputs=[("pixels", (-1, 3, 64, 64))])
    info = build_engine(out / "image.onnx", tmp_path / "a.engine", PROF)
    assert trt.calls["cleared"] == [trt.BuilderFlag.TF32] and trt.BuilderFlag.TF32 not in trt.calls["flags"]
    assert info.precision == "fp32" and info.tf32 is False
    assert json.loads((tmp_path / "a.engine.json").read_text())["tf32"] is False
    trt = fake_trt(version, inputs=[("pixels", (-1, 3, 64, 64))])
    build_engine(out / "image.fp16.onnx", tmp_path / "b.engine", PROF, fp16=True)  # fp32 layers of fp16 graphs too
    assert trt.calls["cleared"] == [trt.BuilderFlag.TF32]


def test_compatible_build_modes_are_set_recorded_and_offered_on_the_command_line(deploy_bundle, tmp_path, fake_trt,
                                                                                  capsys):
    import json

    from test_deploy_lint import run_cli

    src, _, _ = deploy_bundle("triplet")
    trt = fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))])
    info = build_engine(src / "image.onnx", tmp_path / "a.engine", PROF, version_compatible=True,
                        hardware_compatibility="ampere+")
    assert trt.BuilderFlag.VERSION_COMPATIBLE in trt.calls["flags"]
    assert trt.calls["hardware_level"] == trt.HardwareCompatibilityLevel.AMPERE_PLUS
    assert (info.version_compatible, info.hardware_compatibility) == (True, "ampere+")
    trt = fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))])
    info = build_engine(src / "image.onnx", tmp_path / "b.engine", PROF)  # the default: neither
    assert trt.calls["flags"] == [] and trt.calls["hardware_level"] is None
    assert (info.version_compatible, info.hardware_compatibility) == (False, "none")
    with pytest.raises(ConfigError, match="hardware_compatibility must be one of none, ampere"):
        build_engine(src / "image.onnx", tmp_path / "c.engine", PROF, hardware_compatibility="turing")

    out = tmp_path / "bundle"
    shutil.copytree(src, out)
    trt = fake_trt("10.3.0", inputs=[])
    assert run_cli("build-engine", str(out), "--version-compatible", "--hardware-compatible", "same-cc") == 0
    assert "version-compatible, hardware-compatible same-cc" in capsys.readouterr().out
    assert trt.calls["hardware_level"] == trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
    record = read_bundle(out).manifest.validation["tensorrt"]["engines"]["image:trt"]
    sidecar = json.loads((out / f"{record['engine']}.json").read_text())
    assert record["version_compatible"] is sidecar["version_compatible"] is True
    assert record["hardware_compatibility"] == sidecar["hardware_compatibility"] == "same-cc"


def test_a_rejected_or_unsavable_timing_cache_falls_back_to_a_fresh_one(deploy_bundle, tmp_path, fake_trt):
    """set_timing_cache returns False for a cache from another GPU, create_timing_cache raises on damaged bytes and
    serialize() may return None: the build goes on with a fresh cache and says so (Polygraphy's behaviour)."""
    out, _, _ = deploy_bundle("triplet")
    cache = tmp_path / "tc"
    cache.write_bytes(b"other-gpu-cache")
    trt = fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))], reject_cache=True)
    with pytest.warns(UserWarning, match="timing cache tc not used: TensorRT rejected it.*fresh timing cache"):
        info = build_engine(out / "image.onnx", tmp_path / "a.engine", PROF, timing_cache_path=cache)
    assert trt.calls["caches_set"] == [b""]  # the fresh cache is the one the build used
    assert info.timing_cache_status.startswith("replaced: TensorRT rejected it")
    assert cache.read_bytes() == b"timing-cache-bytes" and info.timing_cache == "tc"  # replaced by this GPU's

    cache.write_bytes(b"damaged")
    fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))])
    with pytest.warns(UserWarning, match="could not be read \\(RuntimeError: timing cache: bad header\\)"):
        info = build_engine(out / "image.onnx", tmp_path / "b.engine", PROF, timing_cache_path=cache)
    assert info.timing_cache_status.startswith("replaced: it could not be read")

    cache.write_bytes(b"good-cache")
    trt = fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))], serialized_cache=None)
    with pytest.warns(UserWarning, match="returned no timing cache to save; tc is left as it was"):
        info = build_engine(out / "image.onnx", tmp_path / "c.engine", PROF, timing_cache_path=cache)
    assert trt.calls["caches_set"] == [b"good-cache"] and cache.read_bytes() == b"good-cache"
    assert info.timing_cache is None and info.timing_cache_status == "reused; not saved: TensorRT returned no cache"

    fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))])
    info = build_engine(out / "image.onnx", tmp_path / "d.engine", PROF, timing_cache_path=tmp_path / "new-tc")
    assert info.timing_cache_status == "new" and (tmp_path / "new-tc").read_bytes() == b"timing-cache-bytes"


def test_engines_are_built_on_the_device_asked_for(deploy_bundle, tmp_path, fake_trt):
    """TensorRT builds for the current CUDA device: build_engine(device=N) makes N current, not only the name."""
    src, _, _ = deploy_bundle("triplet")
    trt = fake_trt("10.3.0", inputs=[("pixels", (-1, 3, 64, 64))])
    info = build_engine(src / "image.onnx", tmp_path / "a.engine", PROF, device=1)
    assert trt.calls["device"] == 1 and info.device == 1 and trt.current_device is None  # restored after
    out = tmp_path / "bundle"
    shutil.copytree(src, out)
    trt = fake_trt("10.3.0", inputs=[])
    build_bundle_engines(out, device=2)
    assert trt.calls["device"] == 2


def test_plan_runs_on_follows_tensorrt_version_rules():
    from fine_infer.export.engines import plan_runs_on

    exact = {"tensorrt_version": "10.3.0.26", "version_compatible": False}
    assert plan_runs_on(exact, "10.3.0.26") is None and plan_runs_on(exact, "10.3") is None
    assert "only on the TensorRT version that built it" in plan_runs_on(exact, "10.3.1")
    assert "--version-compatible" in plan_runs_on(exact, "10.13.3.9")
    vc = {"tensorrt_version": "10.3.0", "version_compatible": True}
    assert plan_runs_on(vc, "10.13.3.9") is None and plan_runs_on(vc, "11.4.0") is None  # later 10.x, and 10 -> 11
    assert "that release and later ones only" in plan_runs_on(vc, "10.2.0")
    assert "not on 12.0" in plan_runs_on(vc, "12.0")
    assert "11.0" not in (plan_runs_on({"tensorrt_version": "11.0.0", "version_compatible": True}, "11.4") or "")
    assert "does not say which TensorRT" in plan_runs_on({}, "10.3")
    with pytest.raises(ConfigError, match="not a TensorRT version"):
        plan_runs_on(exact, "latest")


# --- on a GPU box with TensorRT ------------------------------------------------------------------------------------
GPU_ARCHS = ["triplet", "maaf", "fashion-fine"]


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason=TRT_MISSING)
@pytest.mark.parametrize("arch", GPU_ARCHS)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_onnxruntime(deploy_bundle, tmp_path, arch, precision):
    import onnxruntime as ort

    src, _, model = deploy_bundle(arch)
    out = tmp_path / "bundle"
    shutil.copytree(src, out)
    build_bundle_engines(out, fp16=precision == "fp16")
    b = read_bundle(out)
    for name, entry in b.manifest.graphs.items():
        engine = variant_file(entry, None if precision == "fp32" else "fp16", "tensorrt")
        runner = TensorRTRunner(entry.spec, b.file(engine))
        ref = ort.InferenceSession(b.file(entry.file), providers=["CPUExecutionProvider"])
        for batch in (1, 3, 16):
            gen = torch.Generator().manual_seed(batch)
            feeds = {k: v.numpy() for k, v in model.example_inputs(name, batch, None, gen).items()}
            got = runner.run(feeds)
            want = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, feeds)))
            for k, w in want.items():
                if precision == "fp32":
                    np.testing.assert_allclose(got[k], w, atol=1e-3)
                else:
                    kind = "logits" if entry.spec.task == "classify" else "embedding"
                    c = compare(w, got[k], Tolerance(atol=None, min_cosine=0.999), kind=kind)
                    assert c.passed, c.reason
        assert runner.provider.startswith("tensorrt-")


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason=TRT_MISSING)
def test_compatible_engines_build_load_and_match(deploy_bundle, tmp_path):
    """A version- and (from sm 8.0) hardware-compatible plan builds, loads through the runner (lean runtime: host code
    allowed) and matches ONNX Runtime; its record says so and it clears TF32."""
    import onnxruntime as ort

    src, _, model = deploy_bundle("triplet")
    out = tmp_path / "bundle"
    shutil.copytree(src, out)
    hardware = "ampere+" if torch.cuda.get_device_capability(0)[0] >= 8 else "none"
    (info,) = build_bundle_engines(out, version_compatible=True, hardware_compatibility=hardware)
    assert info.version_compatible and info.hardware_compatibility == hardware and info.tf32 is False
    entry = read_bundle(out).manifest.graphs["image"]
    runner = TensorRTRunner(entry.spec, out / variant_file(entry, None, "tensorrt"))
    feeds = {k: v.numpy() for k, v in model.example_inputs("image", 3, None, torch.Generator().manual_seed(3)).items()}
    ref = ort.InferenceSession(out / entry.file, providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, feeds)))
    got = runner.run(feeds)
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w, atol=1e-3)
