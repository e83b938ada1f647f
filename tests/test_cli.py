"""The command line as a user runs it: real processes, real files, one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fine_infer.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ff"
    r = run("export", "--arch", "fashion-fine", "--preset", "tiny", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "every gate passed" in r.stdout
    return out


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, module_rng):
    folder = tmp_path_factory.mktemp("imgs")
    for i in range(5):
        Image.fromarray(module_rng.integers(0, 256, (40 + i, 60, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_help_on_every_command():
    for cmd in ("export", "validate", "info", "embed", "index", "search", "demo", "catalogue", "eval", "lint",
                "build-engine", "triton-repo", "serve", "bench"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "usage: fine-infer " + cmd in r.stdout


def test_info_and_validate(bundle):
    r = run("info", str(bundle))
    assert r.returncode == 0 and "fashion-fine" in r.stdout and "graph    image" in r.stdout
    r = run("validate", str(bundle), "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["passed"] and set(rep["graphs"]) == {"image", "text"}
    assert all(g["max_abs"] < 1e-4 for g in rep["graphs"].values())


def test_embed_index_search_roundtrip(bundle, image_folder, tmp_path):
    r = run("embed", str(bundle), "--text", "a red dress", "--out", str(tmp_path / "t.npy"))
    assert r.returncode == 0, r.stderr
    vec = np.load(tmp_path / "t.npy")
    assert vec.shape[0] == 1 and abs(np.linalg.norm(vec) - 1) < 1e-5
    index = tmp_path / "cat.fidx"
    r = run("index", str(bundle), str(image_folder), "--out", str(index))
    assert r.returncode == 0, r.stderr
    r = run("index", str(bundle), str(image_folder), "--out", str(index))
    assert r.returncode == 2 and "already exists" in r.stderr
    # searching with an image of the catalogue finds that very image first
    r = run("search", str(index), "--image", str(image_folder / "img3.png"), "--k", "3", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)["hits"]
    assert len(hits) == 3 and hits[0]["path"].endswith("img3.png") and hits[0]["score"] > 0.999
    r = run("search", str(index), "--text", "a blue shirt", "--k", "10")
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) == 5


def test_bad_inputs_are_one_line_errors(bundle, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    for args, needle in (
        (("embed", str(bundle), "--image", str(bad)), "not a readable image"),
        (("embed", str(bundle), "--text", "   "), "text 0 is empty"),
        (("info", str(tmp_path)), "not a bundle"),
        (("embed", str(bundle), "--text", "dress " * 100), "tokens"),
    ):
        r = run(*args)
        assert r.returncode == 2, (args, r.stdout)
        assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_catalogue_command_writes_sample_images(tmp_path):
    out = tmp_path / "photos"
    r = run("catalogue", str(out), "--items", "3", "--size", "64", "--seed", "5")
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "catalogue.json").read_text())
    assert [e["id"] for e in doc["items"]] == [1_000_000, 1_000_001, 1_000_002]  # held-out ids by default
    for e in doc["items"]:
        with Image.open(out / e["file"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
        assert e["file"].startswith(f"{e['id']}-{e['category']}-{e['colour']}-{e['pattern']}")
    bad = run("catalogue", str(tmp_path / "none"), "--items", "0")
    assert bad.returncode != 0 and "--items" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "none").exists()


def test_export_refuses_an_existing_out_before_loading_anything(tmp_path):
    # the module cannot even be imported: the existing --out must be what the user hears about, at once
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    r = run("export", "--module", "no_such_package.mod:factory", "--out", str(tmp_path / "taken"))
    assert r.returncode == 2 and "already exists" in r.stderr and "no_such_package" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run("export", "--module", "no_such_package.mod:factory", "--out", str(tmp_path / "taken"), "--force")
    assert r.returncode == 2 and "is not a bundle" in r.stderr, r.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_export_says_where_it_is_and_records_where_the_weights_came_from(tmp_path):
    r = run("export", "--arch", "triplet", "--preset", "tiny", "--progress", "--out", str(tmp_path / "random"))
    assert r.returncode == 0, r.stderr
    steps = [line for line in r.stderr.splitlines() if " s  " in line]
    assert any("exporting to ONNX" in s for s in steps) and any("parity" in s for s in steps), r.stderr
    assert "random weights" in r.stderr  # said before the work, not discovered after
    manifest = json.loads((tmp_path / "random" / "manifest.json").read_text())
    assert manifest["weights_origin"] == {"kind": "random"}
    assert "random" in run("info", str(tmp_path / "random")).stdout
    r = run("eval", str(tmp_path / "random"), "--n", "202", "--no-reference")
    assert r.returncode == 0 and "random weights" in r.stderr and "chance-level" in r.stderr, r.stderr

    r = run("export", "--arch", "triplet", "--preset", "tiny", "--pretrained", "--no-recall-gate",
            "--out", str(tmp_path / "trained"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr  # not a terminal: no step lines; trained: no random-weights warning
    origin = json.loads((tmp_path / "trained" / "manifest.json").read_text())["weights_origin"]
    assert origin == {"kind": "shipped", "file": "triplet-tiny.safetensors"}
