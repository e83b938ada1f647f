"""`export --int8-static` on every tiny zoo arch with its shipped weights: the ONNX Runtime static QDQ graph
(``int8-static``) and the NNCF OpenVINO int8 IR (``openvino-int8``) are calibrated on generated catalogue items, pass
their gates on held-out ones, are hashed in the manifest (the IR's .bin too), and run through ``fine_infer.load``
agreeing with fp32 on fresh catalogue items within the gate's tolerance.

Tolerances: the gates' own (min cosine ≥ 0.99 and top-10 agreement ≥ 0.9 per embedding output; arg-max agreement
≥ 0.9 for classifier logits), on 16 calibration and 12 held-out items (catalogue seed 17) — small sets so the file stays
fast; the run-time check uses 24 other items (catalogue seed 99) against ONNX Runtime fp32 with the same thresholds.
SmoothQuant is fixed on (``smooth_quant="on"``: one NNCF pass a graph instead of two)."""

import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'fine-infer[openvino]'")
pytest.importorskip("nncf", reason="the openvino extra (nncf) is not installed: pip install 'fine-infer[openvino]'")

import fine_infer  # noqa: E402
from fine_infer.bundle import read_bundle  # noqa: E402
from fine_infer.compare import Tolerance, compare  # noqa: E402
from fine_infer.export import export_arch  # noqa: E402
from fine_infer.export._calibrate import CalibrationData  # noqa: E402
from fine_infer.export.gates import VARIANT_TOLERANCES  # noqa: E402
from fine_infer.tools.catalogue import generate  # noqa: E402

ARCHS = ["attributes", "fashion-fine", "triplet"]  # maaf and raf: test_int8_static_fusion.py (one file would take
# minutes on a 2-core box)
CAL, HELD = 32, 12
# Every arch's NNCF int8 IR must pass its gate, the ResNet towers (maaf, raf, triplet) included: before
# quantize_openvino converted the graph with ov.convert_model, took min/max activation ranges and left bias correction
# off, they failed it on the AVX2-only AMD EPYC these tests ran on (min cosine -0.64 for maaf's gallery graph, 0.10 for
# its compose graph, 0.75 for triplet's image graph; the first two an OpenVINO CPU fault on the graph as read with a
# dynamic batch, the last NNCF's mean-of-per-sample ranges clipping activations).


# classifier logits on the 24 unseen items: arg-max agreement ≥ 0.9 as the gate, min cosine ≥ 0.98 (the gate's 0.99
# is on its 12 held-out items; logit vectors of 3-12 classes move more in cosine than 256-d embeddings)
LOGITS = Tolerance(atol=None, min_cosine=0.98, min_topk=0.9, k=1)


def calibration(size: int = CAL, held: int = HELD) -> CalibrationData:
    items = generate(size + held, seed=17)
    return CalibrationData([i.image for i in items], [i.caption for i in items], source="catalogue seed 17",
                           size=size, held_out=held, smooth_quant="on")


def _feeds(spec, session, items):
    names = {t.name for t in spec.inputs}
    feeds = {}
    if "pixels" in names:
        feeds["pixels"] = session.preprocess_images([i.image for i in items])
    if "input_ids" in names:
        feeds["input_ids"], feeds["attention_mask"] = session.tokenize([i.caption for i in items], truncate=True)
    return {k: v for k, v in feeds.items() if k in names}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tiny_arch_exports_gates_and_runs_calibrated_int8(arch, tmp_path):
    check_arch(arch, tmp_path)


def check_arch(arch, tmp_path):
    """Export ``arch`` (tiny, shipped weights) with both calibrated variants; gates, files, load and run."""
    out = tmp_path / arch
    report = export_arch(arch, out, "tiny", pretrained=True, variants=["int8-static", "openvino-int8"],
                         calibration=calibration(), batch_sizes=(1, 3), references=False, drop_failed_variants=True)
    assert report.passed, report.reason
    b = read_bundle(out)  # every file, the IR's weights included, verifies against the manifest
    assert all(g["variants"]["openvino-int8"]["passed"] for g in report.graphs.values()), {
        n: g["variants"]["openvino-int8"].get("reason") for n, g in report.graphs.items()}
    assert "openvino-int8" not in (b.manifest.validation.get("dropped_variants") or {})
    for name, entry in b.manifest.graphs.items():
        rows = report.graphs[name]["variants"]
        for v in ("int8-static", "openvino-int8"):
            row = rows[v]
            assert row["passed"], row["reason"]
            assert row["inputs"] == "held-out real" and row["calibration"]["samples"] == CAL, row["calibration"]
            assert row["calibration"]["held_out"] == HELD
            assert row["tensorrt"] is False
        assert entry.variants["int8-static"] == f"{name}.int8-static.onnx"
        assert rows["int8-static"]["qdq_nodes"]["QuantizeLinear"] > 0
        assert entry.variants["openvino-int8"] == f"{name}.openvino-int8.xml"
        assert {f"{name}.openvino-int8.xml", f"{name}.openvino-int8.bin"} <= set(b.manifest.files)
        ov_row = rows["openvino-int8"]
        assert ov_row["smooth_quant"] in ("on", "n/a")
        assert (ov_row["activation_ranges"], ov_row["bias_correction"], ov_row["conversion"]) == (
            "minmax", "off", "convert_model"), ov_row
    fp32 = fine_infer.load(out, backend="onnxruntime")
    items = generate(24, seed=99)
    paths = [("onnxruntime", "int8-static", "int8-static"), ("openvino", "int8", "openvino-int8")]
    for backend, variant, key in paths:
        s = fine_infer.load(out, backend=backend, variant=variant)
        assert s.label == f"{backend}/{variant}"
        tol = VARIANT_TOLERANCES[key]
        for name, entry in b.manifest.graphs.items():
            feeds = _feeds(entry.spec, fp32, items)
            want, got = fp32.run(name, feeds), s.run(name, feeds)
            for t in entry.spec.outputs:
                kind = "logits" if entry.spec.task == "classify" else "embedding"
                c = compare(want[t.name], got[t.name], tol if kind == "embedding" else LOGITS, kind=kind, seed=0)
                assert c.passed, (arch, backend, name, t.name, c.reason)
        if backend == "openvino":
            assert all(p.endswith("-int8") for p in s.providers.values()), s.providers
