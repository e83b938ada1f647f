"""Every registered arch exports at the tiny preset, passes every gate, and runs from its bundle."""

import json

import numpy as np
import pytest

import fine_infer
from fine_infer.cli import main as cli_main
from fine_infer.errors import CheckpointError, ConfigError
from fine_infer.export import export_arch
from fine_infer.models import create, list_archs

ARCHS = ["attributes", "fashion-fine", "maaf", "raf", "triplet"]


def test_registry_holds_the_five_zoo_archs():
    assert list_archs() == ARCHS


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {arch: (root / arch, export_arch(arch, root / arch, "tiny")) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_export_passes_every_gate_with_figures(tiny_bundles, arch):
    out, report = tiny_bundles[arch]
    assert report.passed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == arch and manifest["validation"]["passed"]
    for name, g in report.graphs.items():
        assert g["checker"] == "passed"
        batches = sorted({c["batch"] for c in g["parity"]["checks"]})
        assert batches == [1, 3, 8]
        assert g["parity_summary"]["max_abs"] < 1e-4
        assert (out / g["file"]).is_file()


@pytest.mark.parametrize("arch", ARCHS)
def test_bundle_runs_on_onnxruntime_and_torch_alike(tiny_bundles, arch, rng):
    out, _ = tiny_bundles[arch]
    ort = fine_infer.load(out)
    pt = fine_infer.load(out, backend="torch")
    model = create(arch, "tiny")
    for name, entry in ort.manifest.graphs.items():
        feeds = {k: v.numpy() for k, v in model.example_inputs(name, 4).items()}
        if "pixels" in feeds:
            feeds["pixels"] = rng.standard_normal(feeds["pixels"].shape).astype(np.float32)
        a, b = ort.run(name, feeds), pt.run(name, feeds)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], atol=1e-4)
            if entry.spec.task != "classify":
                np.testing.assert_allclose(np.linalg.norm(a[k], axis=1), 1.0, atol=1e-5)
    assert set(ort.providers.values()) == {"CPUExecutionProvider"}
    assert set(pt.providers.values()) == {"torch-cpu"}


def test_end_to_end_tasks_from_raw_inputs(tiny_bundles, rng):
    images = [rng.integers(0, 256, (70, 50, 3), dtype=np.uint8) for _ in range(3)]
    ff = fine_infer.load(tiny_bundles["fashion-fine"][0])
    assert ff.embed_images(images).shape == (3, ff.manifest.embed_dim)
    assert ff.embed_texts(["a red striped dress", "shoes"]).shape == (2, ff.manifest.embed_dim)
    maaf = fine_infer.load(tiny_bundles["maaf"][0])
    q = maaf.compose(images[:2], ["make it blue", "with dots instead of stripes"])
    assert q.shape[0] == 2 and np.isfinite(q).all()
    attrs = fine_infer.load(tiny_bundles["attributes"][0]).classify(images)
    assert len(attrs) == 3 and all(abs(sum(h["scores"].values()) - 1) < 1e-5 for r in attrs for h in r.values())


def test_unknown_arch_and_missing_keys_are_clear_cli_errors(tmp_path, capsys):
    assert cli_main(["export", "--arch", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown arch 'nope'" in err and "fashion-fine" in err
    import torch

    state = create("triplet", "tiny").state_dict()
    dropped = sorted(state)[0]
    del state[dropped]
    torch.save(state, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match=f"missing keys.*{dropped}"):
        create("triplet", "tiny", checkpoint=tmp_path / "ckpt.pth")
    assert cli_main(["export", "--arch", "triplet", "--checkpoint", str(tmp_path / "ckpt.pth"),
                     "--out", str(tmp_path / "y")]) == 2
    assert dropped in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(ConfigError, match="unknown config field"):
        create("triplet", "tiny", not_a_field=1)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["fashion-fine", "maaf"])
def test_paper_preset_exports_and_passes_every_gate(tmp_path, arch):
    report = export_arch(arch, tmp_path / arch, "paper", include_weights=False)
    assert report.passed
    for g in report.graphs.values():
        assert g["parity_summary"]["max_abs"] < 1e-4
