"""`export --int8-static` from the command line: `--calibration` with a folder of images, a failed calibrated gate
(tolerance tightened to min cosine ≥ 0.999999, which int8 cannot reach) failing the export in one line with nothing
written, or, with `--drop-failed-variants`, the bundle written without the failed variant and why recorded; the errors
for a missing or useless calibration source; a bundle whose IR weights are not listed refused.

Calibration sets are small (32 images, 16 held out) so the file stays fast; the tiny Fashion-FINE image graph only."""

import json

import pytest

pytest.importorskip("openvino", reason="the openvino extra is not installed: pip install 'fine-infer[openvino]'")
pytest.importorskip("nncf", reason="the openvino extra (nncf) is not installed")

import fine_infer  # noqa: E402
from fine_infer.bundle import read_bundle  # noqa: E402
from fine_infer.cli import main as cli_main  # noqa: E402
from fine_infer.compare import Tolerance  # noqa: E402
from fine_infer.errors import BundleError  # noqa: E402
from fine_infer.export import _variants  # noqa: E402
from fine_infer.tools.catalogue import generate  # noqa: E402

ARGS = ["export", "--arch", "fashion-fine", "--pretrained", "--graphs", "image", "--int8-static",
        "--calibration-size", "32", "--smooth-quant", "on", "--quiet"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal-images")
    for i, item in enumerate(generate(48, seed=23)):
        item.image.save(folder / f"{i:03d}.png")
    return folder


def test_calibration_folder_and_a_failed_gate_dropped(images, tmp_path, monkeypatch, capsys):
    tight = Tolerance(atol=None, min_cosine=0.999999, min_topk=0.9, k=10)
    monkeypatch.setitem(_variants.TOLERANCES, "int8-static", tight)
    out = tmp_path / "fail"
    assert cli_main([*ARGS, "--calibration", str(images), "--out", str(out)]) == 2
    msg = capsys.readouterr().err.strip()
    assert msg.startswith("fine-infer export: error: variant gates:") and "FAILED int8-static" in msg and "min cosine" in msg and "< 0.999999" in msg and "\n" not in msg
    assert "passed openvino-int8" in msg and "--drop-failed-variants" in msg and "--int8-static" in msg
    assert not out.exists()
    capsys.readouterr()
    kept = tmp_path / "kept"
    assert cli_main([*ARGS, "--calibration", str(images), "--out", str(kept), "--drop-failed-variants"]) == 0
    err = capsys.readouterr().err
    assert "warning: variant gates: passed openvino-int8; FAILED int8-static" in err
    b = read_bundle(kept)
    entry = b.manifest.graphs["image"]
    assert "int8-static" not in entry.variants and entry.variants["openvino-int8"] == "image.openvino-int8.xml"
    assert "int8-static" in b.manifest.validation["dropped_variants"]
    assert not (kept / "image.int8-static.onnx").exists()
    row = b.manifest.validation["graphs"]["image"]["variants"]["openvino-int8"]
    assert row["inputs"] == "held-out real" and "48 items" in row["calibration"]["data"]
    assert row["calibration"]["samples"] == 32 and row["calibration"]["held_out"] == 16
    s = fine_infer.load(kept, backend="openvino", variant="int8")
    assert s.embed_images([generate(1, seed=5)[0].image]).shape[0] == 1
    with pytest.raises(BundleError, match="no variant 'int8-static'.*--int8-static"):
        fine_infer.load(kept, backend="onnxruntime", variant="int8-static")
    # the IR's weights are part of the bundle: unlisted, the IR is refused, whatever is on disk
    m = json.loads((kept / "manifest.json").read_text())
    del m["files"]["image.openvino-int8.bin"]
    (kept / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="lists no file 'image.openvino-int8.bin'"):
        fine_infer.load(kept, backend="openvino", variant="int8", verify=False).embed_images(
            [generate(1, seed=5)[0].image])


def test_calibration_errors(tmp_path, capsys):
    text = tmp_path / "texts.txt"
    text.write_text("a red dress\na blue shirt\n")
    assert cli_main(["export", "--module", "x:y", "--int8-static", "--out", str(tmp_path / "a")]) == 2
    assert "--calibration DATA" in capsys.readouterr().err
    assert cli_main(["export", "--arch", "fashion-fine", "--graphs", "image", "--calibration", str(text), "--out",
                     str(tmp_path / "b")]) == 2
    assert "--calibration is the data of --int8-static" in capsys.readouterr().err
    assert cli_main([*ARGS, "--calibration", str(tmp_path / "missing"), "--out", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err
