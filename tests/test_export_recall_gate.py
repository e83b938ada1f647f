"""The export recall gate and ``fine-infer eval``: real exports of the shipped tiny weights, real ONNX Runtime
sessions, real processes.

The gate evaluates the sealed bundle (fp32 and fp16) on the catalogue's held-out split before it is moved into place;
its headline metric must be within the check's ``tolerance_points`` of the PyTorch model's, else nothing is written.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fine_infer.export import GateFailure, export_arch
from fine_infer.tools.recall import RecallCheck, default_checks

from fine_infer.bundle import read_bundle
from fine_infer.tools.evaluate import HEADLINE

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def run(*args, timeout=600, **env):
    """``fine-infer ARGS`` in a fresh process, as tests/test_cli.py runs it."""
    return subprocess.run([sys.executable, "-m", "fine_infer.cli", *args], capture_output=True, text=True, check=False,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **env})


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """Fashion-FINE with the shipped weights and an fp16 variant; the gate is on by default with ``pretrained``."""
    out = tmp_path_factory.mktemp("gate") / "ff"
    report = export_arch("fashion-fine", out, "tiny", pretrained=True, variants=["fp16"], checks=default_checks(True))
    return out, report


def test_gate_passes_and_records_fp32_and_fp16_recall(gated):
    out, report = gated
    assert report.passed and report.checks["recall"] is not None
    manifest = read_bundle(out, verify=True).manifest  # still verifies after the manifest gained the recall block
    rec = manifest.validation["recall"]
    assert rec == report.checks["recall"] == json.loads((out / "manifest.json").read_text())["validation"]["recall"]
    assert rec["metric"] == HEADLINE["fashion-fine"] == "t2i_r10"
    assert set(rec["variants"]) == {"fp32", "fp16"} and rec["passed"] is True and rec["tolerance_points"] == 0.5
    for v, points in rec["variants"].items():
        assert 0.0 <= points <= 100.0 and abs(points - rec["pytorch"]) <= 0.5, (v, rec)
    assert rec["pytorch"] >= 90.0  # the shipped weights, not random ones (issue 6's t2i R@10 target)
    assert any(line.startswith("recall gate t2i_r10: PyTorch") and "pass" in line for line in report.summary_lines())
    assert report.to_dict()["recall"] == rec
    assert sorted(p.name for p in out.parent.iterdir()) == ["ff"]  # no .partial temp folder left


# The failing-gate cases use the triplet model, the quickest to export and evaluate; the gate does not depend on the arch.
def test_impossible_tolerance_fails_and_writes_nothing(tmp_path):
    out = tmp_path / "triplet"
    with pytest.raises(GateFailure, match="recall gate failed: fp32 image_r10") as exc:
        export_arch("triplet", out, "tiny", pretrained=True, checks=[RecallCheck(-1.0)])
    assert exc.value.report.checks["recall"]["passed"] is False and set(exc.value.report.checks["recall"]["variants"]) == {"fp32"}
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .partial temp folder either


def test_failed_gate_leaves_an_existing_bundle_untouched(gated, tmp_path):
    out = tmp_path / "ff"
    shutil.copytree(gated[0], out)
    before = tree_bytes(out)
    with pytest.raises(GateFailure, match="recall gate failed"):
        export_arch("triplet", out, "tiny", pretrained=True, checks=[RecallCheck(-1.0)], force=True)
    assert tree_bytes(out) == before  # manifest.json and every other file byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ff"]
    read_bundle(out, verify=True)


def test_cli_eval_json_matches_the_gate(gated):
    out, report = gated
    r = run("eval", str(out), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    reports = {x["source"]: x for x in doc["reports"]}
    assert list(reports) == ["pytorch", "onnxruntime", "onnxruntime/fp16"]
    ref = reports["pytorch"]
    assert ref["headline"] == "t2i_r10" and ref["n"] == 1000
    for src, x in reports.items():
        assert x["arch"] == "fashion-fine" and set(x["metrics"]) == set(ref["metrics"])
        assert abs(x["metrics"]["t2i_r10"] - ref["metrics"]["t2i_r10"]) <= 0.005, src
    # the same numbers the gate recorded in the manifest (same bundle, items and runtime)
    rec = report.checks["recall"]
    assert round(100 * reports["onnxruntime"]["metrics"]["t2i_r10"], 2) == rec["variants"]["fp32"]
    assert round(100 * reports["onnxruntime/fp16"]["metrics"]["t2i_r10"], 2) == rec["variants"]["fp16"]
    assert abs(100 * ref["metrics"]["t2i_r10"] - rec["pytorch"]) <= 0.5


def test_cli_eval_unknown_variant_and_tiny_n_are_one_line_errors(gated):
    out, _ = gated
    r = run("eval", str(out), "--variant", "int8", "--no-reference")
    assert r.returncode == 2 and r.stdout == ""
    msg = r.stderr.strip()
    assert "\n" not in msg and "Traceback" not in msg
    assert "no variant int8" in msg and "fp16" in msg and "--int8" in msg  # what it has and what to do
    r = run("eval", str(out), "--n", "50")
    assert r.returncode == 2 and "\n" not in r.stderr.strip() and "--n 50 is too small" in r.stderr


def test_cli_recall_gate_flags(tmp_path):
    # --module has no catalogue protocol: asking for the gate is an error before anything is exported
    r = run("export", "--module", "user_encoder:factory", "--recall-gate", "--out", str(tmp_path / "user"),
            PYTHONPATH=str(FIXTURES))
    assert r.returncode == 2 and "\n" not in r.stderr.strip()
    assert "--recall-gate" in r.stderr and "--module" in r.stderr
    assert list(tmp_path.iterdir()) == []
    # --no-recall-gate turns off the gate --pretrained would otherwise run
    out = tmp_path / "nogate"
    r = run("export", "--arch", "triplet", "--preset", "tiny", "--pretrained", "--no-recall-gate",
            "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert "recall" not in json.loads(r.stdout)
    assert "recall" not in read_bundle(out).manifest.validation


def test_a_variant_failing_the_recall_gate_is_dropped_only_on_request(tmp_path):
    """Calibrated int8 passes its cosine gate but may lose recall: the recall gate then fails the export, and with
    ``drop_failed_variants`` the bundle is written without that variant (fp32 kept), recorded as dropped."""
    from fine_infer.export import drop_warning
    from fine_infer.export._calibrate import CalibrationData
    from fine_infer.tools.catalogue import generate

    import fine_infer

    items = generate(80, seed=17)  # the CLI's calibration draw for zoo archs
    cal = CalibrationData([i.image for i in items], [i.caption for i in items], source="catalogue seed 17")
    out = tmp_path / "triplet"
    kw = dict(pretrained=True, variants=["int8-static"], calibration=cal, force=True)
    rec = export_arch("triplet", out, "tiny", checks=[RecallCheck(0.5)], **kw).checks["recall"]
    d_fp32 = abs(rec["variants"]["fp32"] - rec["pytorch"])
    d_int8 = abs(rec["variants"]["int8-static"] - rec["pytorch"])
    print("recall figures", rec)
    if d_int8 <= d_fp32:
        pytest.skip(f"int8-static recall is as close to PyTorch as fp32 here ({rec}): no tolerance separates them")
    tol = (d_fp32 + d_int8) / 2  # fp32 inside, int8-static outside
    before = tree_bytes(out)
    with pytest.raises(GateFailure, match=r"recall gate failed: int8-static"):
        export_arch("triplet", out, "tiny", checks=[RecallCheck(tol)], **kw)
    assert tree_bytes(out) == before  # a failed export leaves the existing bundle as it was

    report = export_arch("triplet", out, "tiny", checks=[RecallCheck(tol)], drop_failed_variants=True, **kw)
    bundle = read_bundle(out, verify=True)  # hashes match after the files were removed
    assert all("int8-static" not in e.variants for e in bundle.manifest.graphs.values())
    assert not list(out.glob("*int8-static*"))
    assert list(bundle.manifest.validation["dropped_variants"]) == ["int8-static"]
    assert "recall gate failed" in bundle.manifest.validation["dropped_variants"]["int8-static"][0]
    assert bundle.manifest.validation["recall"]["dropped"] == ["int8-static"]
    assert "int8-static" in drop_warning(report.graphs) and "recall gate" in drop_warning(report.graphs)
    session = fine_infer.load(out, backend="onnxruntime")  # the fp32 graphs still run
    assert session.embed_images([items[0].image]).shape[0] == 1
    with pytest.raises(Exception, match="int8-static"):
        fine_infer.load(out, backend="onnxruntime", variant="int8-static")
