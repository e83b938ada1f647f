"""CPU paths end to end on one real tiny Fashion-FINE bundle (fp32 + int8 graphs): `validate --backend` gates recorded
in the manifest, bench rows per path with skips and reasons, `tune` stored with the bundle, and `backend="auto"`
picking the fastest gated path (never a failed one; ONNX Runtime fp32 without a usable tune result)."""

import json

import numpy as np
import pytest

import fine_infer
from fine_infer.tools import bench
from fine_infer.bundle import read_bundle, read_manifest, sha256_file
from fine_infer.cli import main as cli_main
from fine_infer.errors import BundleError, ConfigError
from fine_infer.runtime.choice import MIN_SPEEDUP, VERDICTS, auto_choice, clearly_faster, gate_status, pick, read_tune
from fine_infer.runtime.paths import CALIBRATED, CPU_PATHS, ExecPath
from fine_infer.tools.tune import tune_bundle, write_tune
from fine_infer.tools.validate import record_gates, validate_bundle

pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'fine-infer[openvino]'")

NO_BF16 = {"FP32", "INT8", "BIN", "EXPORT_IMPORT"}  # what OpenVINO reports on a CPU without AVX-512 BF16 / AMX


def _has_bf16() -> bool:
    from fine_infer.runtime.openvino_runner import precision_unsupported

    return not precision_unsupported("bf16")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny Fashion-FINE bundle with its int8 graphs (export gates on) and no cpu-opt graphs."""
    from fine_infer.export import export_arch

    out = tmp_path_factory.mktemp("tune") / "ff"
    export_arch("fashion-fine", out, "tiny", variants=["int8"])
    return out


@pytest.fixture(scope="module")
def gated(bundle):
    """The bundle after `validate --backend onnxruntime openvino` (gates recorded)."""
    before = {n: sha256_file(bundle / n) for n in read_manifest(bundle).files}
    report = validate_bundle(bundle, backends=["onnxruntime", "openvino"])
    return bundle, report, before


def test_validate_records_every_gate_and_keeps_checksums(gated):
    bundle, report, before = gated
    assert report["passed"], report["summary"]
    gates = report["gates"]
    assert set(gates) == {p.label for p in CPU_PATHS if p not in CALIBRATED}  # those keep their export gate
    assert "export with --optimize cpu" in gates["onnxruntime/cpu-opt"]["skipped"]
    ran = ["onnxruntime", "onnxruntime/int8", "openvino"] + (["openvino/bf16"] if _has_bf16() else [])
    for label in ran:
        g = gates[label]
        assert g["passed"] and not g.get("skipped"), (label, g)
        assert set(g["graphs"]) == {"image", "text"} and g["batch_sizes"] == [1, 3, 8]
        tol = g["tolerance"]
        if tol["min_cosine"]:
            assert g["summary"]["min_cosine"] >= tol["min_cosine"]
        if tol["atol"]:
            assert g["summary"]["max_abs"] <= tol["atol"]
        assert g["summary"]["topk_agreement"] >= tol["min_topk"]
    assert gates["onnxruntime/int8"]["tolerance"]["min_cosine"] == 0.99
    if _has_bf16():
        assert gates["openvino/bf16"]["tolerance"]["min_cosine"] == 0.999
        assert gates["openvino/bf16"]["summary"]["max_abs"] > 1e-6  # bf16 really ran
    m = read_bundle(bundle).manifest  # every checksum still verifies
    assert m.validation["cpu_gates"]["openvino"]["passed"]
    assert {n: sha256_file(bundle / n) for n in m.files} == before  # only manifest.json changed
    for p in CPU_PATHS:
        if p in CALIBRATED:  # not exported with --int8-static: no export gate, and validate does not gate them
            assert gate_status(m, p)[0] == "missing"
            continue
        assert gate_status(m, p)[0] == ("skipped" if p.variant == "cpu-opt" or (p.variant == "bf16" and not
                                                                                  _has_bf16()) else "passed")


def test_validate_on_a_cpu_without_bf16_skips_it_with_a_reason(gated):
    bundle, _, _ = gated
    report = validate_bundle(bundle, backends=["openvino"], capabilities=NO_BF16, record=False)
    assert report["passed"]
    assert "cannot run bf16" in report["gates"]["openvino/bf16"]["skipped"]
    assert report["gates"]["openvino"]["passed"]
    with pytest.raises(ConfigError, match="onnxruntime or openvino"):
        validate_bundle(bundle, backends=["tensorrt"])


def test_bench_has_a_row_per_cpu_path_and_skips_with_reasons(gated):
    bundle, _, _ = gated
    res = bench.bench_bundle(bundle, batch_sizes=(2,), graphs=["text"], budget=bench.QUICK, progress=False)
    rows = {r["backend"]: r for r in res["rows"]}
    expect = {"torch", "onnxruntime", "onnxruntime/int8", "openvino"} | ({"openvino/bf16"} if _has_bf16() else set())
    assert expect <= set(rows)
    assert rows["openvino"]["provider"] == "OpenVINO-CPU-f32" and rows["onnxruntime"]["gate"] == "passed"
    assert rows["torch"]["provider"] == "torch-cpu" and "gate" not in rows["torch"]
    skipped = {s["backend"]: s["reason"] for s in res["skipped"]}
    assert "export with --optimize cpu" in skipped["onnxruntime/cpu-opt"]
    assert "tensorrt" in skipped
    import torch

    # the kernels row runs only on a CUDA device; elsewhere it is skipped with the reason
    assert ("torch+kernels" in skipped) == (not torch.cuda.is_available())
    assert ("torch+kernels" in rows) == torch.cuda.is_available()
    assert res["auto"]["label"] and res["auto"]["reason"]
    assert "openvino" in res["machine"]["versions"]
    table = bench.format_table(res)
    assert "onnxruntime/int8" in table and f"auto picks {res['auto']['label']}" in table
    no_bf16 = bench.bench_bundle(bundle, backends=["openvino/bf16"], batch_sizes=(1,), budget=bench.QUICK,
                                 progress=False, capabilities=NO_BF16)
    assert not no_bf16["rows"] and "cannot run bf16" in no_bf16["skipped"][0]["reason"]


def test_tune_stores_the_fastest_gated_path_and_auto_runs_it(gated):
    bundle, _, _ = gated
    result = tune_bundle(bundle, batch_sizes=(1, 4), budget=bench.QUICK)
    paths = result["paths"]
    assert paths["onnxruntime"]["speedup"] == pytest.approx(1.0)
    assert "export with --optimize cpu" in paths["onnxruntime/cpu-opt"]["skipped"]
    assert set(paths["openvino"]["cells"]) == {"image@1", "image@4", "text@1", "text@4"}
    # the choice (fine_infer.runtime.choice.decide on the per-round speedups): ONNX Runtime fp32, or a gated path
    # clearly faster than it over the rounds (median ratio ≥ MIN_SPEEDUP and lower quartile > 1)
    assert result["verdict"] in VERDICTS
    if result["choice"] != "onnxruntime":
        assert paths[result["choice"]]["gate"] == "passed"
        assert clearly_faster(paths[result["choice"]]["rounds"], paths["onnxruntime"]["rounds"])
        assert paths[result["choice"]]["speedup"] >= MIN_SPEEDUP
    name = write_tune(bundle, result)
    b = read_bundle(bundle)  # the tune file is hashed into the manifest and verifies
    assert name in b.manifest.files and b.manifest.validation["tune"]["file"] == name
    assert read_tune(b)["choice"] == result["choice"]
    s = fine_infer.load(bundle)
    assert s.label == result["choice"] and s.choice.reason == result["reason"]
    rng = np.random.default_rng(np.random.randint(2**31))  # of the test's printed seed: conftest seeds np.random
    images = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(2)]
    ref = fine_infer.load(bundle, backend="onnxruntime").embed_images(images)
    assert (s.embed_images(images) * ref).sum(1).min() > 0.99  # whatever it picked passed a cosine gate
    second = write_tune(bundle, result)  # replaced under a new name; the old file is gone
    assert second != name and not (bundle / name).exists() and name not in read_bundle(bundle).manifest.files


def test_a_failed_gate_is_never_picked(gated):
    bundle, _, _ = gated
    m = read_manifest(bundle)
    ranked = {"onnxruntime": {"speedup": 1.0, "gate_detail": ""},
              "openvino": {"speedup": 3.0, "gate_detail": ""},
              "onnxruntime/int8": {"speedup": 2.0, "gate_detail": "gate"},
              "openvino/bf16": {"speedup": 1.02, "gate_detail": ""}}
    eligible = _eligible(m)
    assert pick(ranked, eligible).label == "openvino"
    record_gates(bundle, {"openvino": {"passed": False, "reason": "text.embedding: max abs error 0.3 > atol 0.0001"}})
    m = read_bundle(bundle).manifest
    assert gate_status(m, ExecPath("openvino")) == ("failed", "text.embedding: max abs error 0.3 > atol 0.0001")
    c = pick(ranked, _eligible(m))
    assert c.label == "onnxruntime/int8" and "openvino (3.00×) gate failed" in c.reason
    del ranked["onnxruntime/int8"]  # what is left is 1.02×: not worth bf16's precision loss
    c = pick(ranked, _eligible(m))
    assert c.label == "onnxruntime" and f"≥ {MIN_SPEEDUP:g}×" in c.reason
    validate_bundle(bundle, backends=["openvino"])  # a fresh gate run replaces the failed record
    assert gate_status(read_manifest(bundle), ExecPath("openvino"))[0] == "passed"


def _eligible(m):
    from fine_infer.runtime.choice import eligibility

    return eligibility(m, None)


def test_auto_without_a_usable_tune_result_is_onnxruntime_fp32(gated, tmp_path):
    bundle, _, _ = gated
    b = read_bundle(bundle)
    result = read_tune(b)
    if result is None:
        result = tune_bundle(bundle, batch_sizes=(1,), graphs=["text"], budget=bench.QUICK)
    elsewhere = {**result, "signature": {"cpu": "Some Other CPU", "cores": 64}}
    write_tune(bundle, elsewhere)
    c = auto_choice(bundle)
    assert (c.backend, c.variant) == ("onnxruntime", "fp32") and "another CPU" in c.reason
    s = fine_infer.load(bundle)
    assert s.label == "onnxruntime" and "another CPU" in s.choice.reason
    assert "bf16" not in {auto_choice(bundle, NO_BF16).variant}
    # a tampered tune file is a checksum error at load, naming the file
    name = read_manifest(bundle).validation["tune"]["file"]
    (bundle / name).write_text("{}")
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        fine_infer.load(bundle)
    write_tune(bundle, result)  # repaired for the other tests
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(bundle, plain)
    for f in plain.glob("tune.*.json"):
        f.unlink()
    mpath = plain / "manifest.json"
    data = json.loads(mpath.read_text())
    data["validation"].pop("tune")
    data["files"] = {k: v for k, v in data["files"].items() if not k.startswith("tune.")}
    mpath.write_text(json.dumps(data))
    c = auto_choice(plain)
    assert c.label == "onnxruntime" and "no tune result" in c.reason


def test_cli_validate_tune_info(gated, capsys):
    bundle, _, _ = gated
    assert cli_main(["tune", str(bundle), "--quick", "--batch-sizes", "1", "--graphs", "text", "--dry-run",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "choice:" in out and "openvino" in out and "wrote" not in out
    assert cli_main(["tune", str(bundle), "--quick", "--batch-sizes", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote tune." in out
    assert cli_main(["info", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "cpu path onnxruntime/int8" in out and "auto     " in out
    assert cli_main(["validate", str(bundle), "--backend", "onnxruntime", "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime/int8 passed" in out and "recorded" not in out
    with pytest.raises(SystemExit):  # argparse: tensorrt is not a gated CPU backend
        cli_main(["validate", str(bundle), "--backend", "tensorrt"])
    capsys.readouterr()
    assert cli_main(["embed", str(bundle), "--text", "a red dress", "--backend", "openvino", "--variant", "int8"]) == 2
    assert "ONNX Runtime graphs" in capsys.readouterr().err
