"""`tune` in interleaved rounds on a real tiny bundle with the calibrated int8 paths (text graph of the shipped tiny
Fashion-FINE, every CPU path it has), the stored result's structure (per-round speedups, medians, spread, load, runs and
whether they agree), `auto` running the stored pick, and `bench` warning when the stored pick is not the fastest it
measured. Timing on a shared 2-core box is noisy: the test asserts the structure and the rule's consistency, never
which path wins."""

import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'fine-infer[openvino]'")
pytest.importorskip("nncf", reason="the openvino extra (nncf) is not installed")

from fine_infer.bundle import read_bundle  # noqa: E402
from fine_infer.cli import main as cli_main  # noqa: E402
from fine_infer.export import export_arch  # noqa: E402
from fine_infer.export._calibrate import CalibrationData  # noqa: E402
from fine_infer.runtime.choice import VERDICTS, auto_choice, clearly_faster  # noqa: E402
from fine_infer.runtime.paths import BASELINE, CPU_PATHS  # noqa: E402
from fine_infer.tools import bench  # noqa: E402
from fine_infer.tools.catalogue import generate  # noqa: E402
from fine_infer.tools.tune import tune_bundle, write_tune  # noqa: E402

ROUNDS, RUNS = 3, 3


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    items = generate(44, seed=17)
    cal = CalibrationData([i.image for i in items], [i.caption for i in items], source="catalogue seed 17", size=32,
                          held_out=12, smooth_quant="on")
    out = tmp_path_factory.mktemp("tune-rounds") / "ff"
    export_arch("fashion-fine", out, "tiny", pretrained=True, graphs=["text"], batch_sizes=(1, 3),
                variants=["int8", "int8-static", "openvino-int8"], calibration=cal, references=False)
    return out


def test_tune_rounds_result_structure_and_auto(bundle):
    result = tune_bundle(bundle, batch_sizes=(1,), rounds=ROUNDS, runs=RUNS)
    assert result["version"] == 2 and result["rounds"] == ROUNDS and len(result["runs"]) == RUNS
    assert result["verdict"] in VERDICTS
    load = result["load"]
    assert len(load["before"]) == 3 and len(load["after"]) == 3 and load["cores"] >= 1
    paths = result["paths"]
    measured = [label for label, p in paths.items() if p.get("rounds")]
    assert {"onnxruntime", "onnxruntime/int8", "onnxruntime/int8-static", "openvino", "openvino/int8"} <= set(measured)
    for label in measured:
        p = paths[label]
        assert len(p["rounds"]) == ROUNDS * RUNS and all(x > 0 for x in p["rounds"])
        assert p["spread"]["min"] <= p["spread"]["q25"] <= p["speedup"] <= p["spread"]["q75"] <= p["spread"]["max"]
        assert set(p["p50_ms"]) == {"text@1"} and set(p["cells"]) == {"text@1"}
    assert paths[BASELINE.label]["rounds"] == [1.0] * (ROUNDS * RUNS)
    assert paths["onnxruntime/int8-static"]["gate"] == "passed" and paths["openvino/int8"]["gate"] == "passed"
    assert paths["onnxruntime/int8-static"]["gate_min_cosine"] >= 0.99
    assert "export with --optimize cpu" in paths["onnxruntime/cpu-opt"]["skipped"]
    # the rule's consistency: a non-baseline pick is clearly faster than ONNX Runtime fp32 over the pooled rounds
    if result["choice"] != BASELINE.label:
        assert clearly_faster(paths[result["choice"]]["rounds"], paths[BASELINE.label]["rounds"])
        assert paths[result["choice"]]["gate"] == "passed"
    if result["verdict"] == "noise":
        assert result["choice"] == BASELINE.label and "inside the noise" in result["reason"]
    picks = [r["choice"] for r in result["runs"]]
    assert result["agree"] == (len(set(picks)) == 1)
    assert ("did not agree" in result["reason"]) == (not result["agree"])
    assert ("all 3 runs agreed" in result["reason"]) == result["agree"]
    write_tune(bundle, result)
    b = read_bundle(bundle)
    assert b.manifest.validation["tune"]["verdict"] == result["verdict"]
    c = auto_choice(b)
    assert c.label == result["choice"] and c.reason == result["reason"]


def _result(auto: str, p50: dict[str, float]) -> dict:
    rows = [{"backend": label, "graph": "text", "batch": 1, "p50_ms": ms, "p90_ms": ms, "p99_ms": ms, "ms_per_item": ms,
             "items_per_s": 1e3 / ms, "gate": "passed"} for label, ms in p50.items()]
    return {"mode": "runtime", "bundle": "B", "rows": rows, "auto": {"label": auto}}


def test_pick_warning_when_the_stored_pick_is_not_the_fastest_now():
    assert bench.pick_warning(_result("openvino/int8", {"onnxruntime": 2.0, "openvino/int8": 1.0})) == ""
    line = bench.pick_warning(_result("openvino/int8", {"onnxruntime": 2.0, "openvino/int8": 4.0,
                                                         "onnxruntime/int8": 1.0}))
    assert "stored pick openvino/int8 (0.50×" in line and "onnxruntime/int8 2.00×" in line and "\n" not in line
    # within the tune rule's 5 % margin: no warning
    assert bench.pick_warning(_result("onnxruntime", {"onnxruntime": 1.0, "openvino": 0.97})) == ""
    ungated = _result("onnxruntime", {"onnxruntime": 2.0, "openvino": 1.0})
    ungated["rows"][1]["gate"] = "missing"  # auto never picks an ungated path: not a reason to warn
    assert bench.pick_warning(ungated) == ""


def test_bench_cli_warns_on_stderr(bundle, monkeypatch, capsys):
    fake = _result("openvino/int8", {"onnxruntime": 2.0, "openvino/int8": 4.0})
    fake.update(kind=bench.RESULT_KIND, skipped=[], machine={})
    monkeypatch.setattr(bench, "bench_bundle", lambda *a, **k: fake)
    assert cli_main(["bench", str(bundle), "--quick", "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fine-infer bench: warning: the stored pick openvino/int8")


def test_cpu_paths_list_the_calibrated_ones():
    labels = [p.label for p in CPU_PATHS]
    assert "onnxruntime/int8-static" in labels and "openvino/int8" in labels
