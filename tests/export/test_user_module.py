"""`fine-infer export --module`: a user encoder with an attention block and a variable-length integer input; and user
encoders that declare tasks, tokenizer and image preprocessing (from the factory or CLI flags), whose bundles are
first-class (`fine-infer embed --text` / `--image` accept them; their inputs come from their own tokenizer and
preprocessing)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fine_infer
from fine_infer.bundle import read_bundle
from fine_infer.errors import BundleError, ConfigError
from fine_infer.export import GateFailure, export_module, load_factory, parse_dynamic_axes
from fine_infer.export import UserEncoder, UserGraph, declare, export_user  # declared tasks/tokenizer/preprocessing
from fine_infer.tokenization import BUILTIN_WORDS, word_tokenizer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _cli(*args, cwd=FIXTURES):
    env = {**os.environ, "PYTHONPATH": str(FIXTURES)}
    return subprocess.run([sys.executable, "-m", "fine_infer.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def user_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("user") / "bundle"
    r = _cli("export", "--module", "user_encoder:factory", "--dynamic-axis", "ids:1", "--dynamic-axis", "mask:1",
             "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_cli_module_export_passes_gates_and_reports_parity(user_bundle):
    out, report = user_bundle
    assert report["passed"]
    checks = report["graphs"]["model"]["parity"]["checks"]
    assert [c["batch"] for c in checks] == [1, 3, 8]
    assert len({c["sequence"] for c in checks}) > 1  # the sequence axis was varied, not only the batch
    assert all(c["max_abs"] < 1e-4 and c["topk_agreement"] >= 0.9 for c in checks)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["graphs"]["model"]["inputs"][0]["shape"] == ["batch", "sequence"]
    assert manifest["source"] == "user_encoder:factory"


def test_runtime_runs_the_user_bundle_at_new_lengths_like_pytorch(user_bundle, rng):
    out, _ = user_bundle
    sys.path.insert(0, str(FIXTURES))
    from user_encoder import factory

    model, _ = factory()
    session = fine_infer.load(out)
    for batch, length in ((1, 3), (5, 29)):
        ids = rng.integers(1, 100, (batch, length))
        mask = np.ones((batch, length), dtype=np.int64)
        mask[-1, length // 2 :] = 0
        got = session.run("model", {"ids": ids, "mask": mask})["output"]
        with torch.no_grad():
            want = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert session.providers == {"model": "CPUExecutionProvider"}


def test_tampered_bundle_is_refused_by_load_and_validate(tmp_path, user_bundle):
    out, _ = user_bundle
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.onnx does not match its checksum"):
        fine_infer.load(copy)
    r = _cli("validate", str(copy))
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "checksum" in r.stderr  # one line, no traceback


def test_existing_output_is_refused_and_kept(user_bundle):
    out, _ = user_bundle
    before = (out / "manifest.json").read_bytes()
    r = _cli("export", "--module", "user_encoder:factory", "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert (out / "manifest.json").read_bytes() == before


def test_failed_parity_gate_writes_nothing(tmp_path):
    sys.path.insert(0, str(FIXTURES))
    from user_encoder import factory

    model, example = factory()
    with pytest.raises(GateFailure, match="parity gate failed"):
        export_module(model, example, tmp_path / "b", dynamic_axes=parse_dynamic_axes(["ids:1", "mask:1"]), atol=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_bad_dynamic_axis_and_factory_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="NAME:DIM"):
        parse_dynamic_axes(["ids"])
    r = _cli("export", "--module", "no_such_module:factory", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "cannot import 'no_such_module'" in r.stderr
    assert not (tmp_path / "x").exists()


IMAGE_FLAGS = ["--image-size", "36", "--image-crop", "32", "--image-interpolation", "bilinear",
               "--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.25", "0.25", "0.25"]


@pytest.fixture(scope="module")
def dual_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("dual") / "bundle"
    r = _cli("export", "--module", "user_dual_encoder:factory", *IMAGE_FLAGS, "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_declared_module_bundle_has_tokenizer_preprocessing_and_tasks(dual_bundle):
    out, report = dual_bundle
    m = read_bundle(out).manifest
    assert {n: g.spec.task for n, g in m.graphs.items()} == {"text": "embed_text", "image": "embed_image"}
    assert [t.name for t in m.graphs["text"].spec.inputs] == ["input_ids", "attention_mask"]
    assert m.graphs["text"].spec.inputs[0].shape == ("batch", "sequence")  # made dynamic for the tokenizer
    assert m.tokenizer == "tokenizer.json" and m.text.tokenizer == "hf" and m.text.max_length == 16
    assert (m.image.size, m.image.crop, m.image.interpolation, m.image.mean) == (36, 32, "bilinear", (0.5,) * 3)
    assert m.config["export"]["normalized"] == ["image"]  # the image tower's output was not unit rows
    assert m.config["export"]["input_names"] == {"text": {"ids": "input_ids", "mask": "attention_mask"}}
    refs = m.validation["references"]["graphs"]
    assert refs["text"]["batches"] == [1, 3, 8] and refs["image"]["batches"] == [1, 3, 8]
    assert all(c["max_abs"] < 1e-5 for g in report["graphs"].values() for c in g["parity"]["checks"])


def test_embed_cli_accepts_text_and_image_and_matches_pytorch(dual_bundle, tmp_path, rng):
    out, _ = dual_bundle
    img = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(img)
    r_text = _cli("embed", str(out), "--text", "red striped dress", "long blue coat")
    r_image = _cli("embed", str(out), "--image", str(img))
    assert r_text.returncode == 0 and r_image.returncode == 0, r_text.stderr + r_image.stderr
    text_vecs = np.array(json.loads(r_text.stdout)["embeddings"])
    image_vecs = np.array(json.loads(r_image.stdout)["embeddings"])
    assert text_vecs.shape == (2, 16) and image_vecs.shape == (1, 16)
    np.testing.assert_allclose(np.linalg.norm(image_vecs, axis=1), 1.0, atol=1e-5)  # normalised by the export

    sys.path.insert(0, str(FIXTURES))
    from user_dual_encoder import factory

    spec = factory()
    session = fine_infer.load(out)
    ids, mask = session.tokenize(["red striped dress", "long blue coat"])
    with torch.no_grad():
        want_text = spec["graphs"]["text"]["module"](torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        pixels = torch.from_numpy(session.preprocess_images([str(img)]))
        want_image = torch.nn.functional.normalize(spec["graphs"]["image"]["module"](pixels), dim=-1).numpy()
    np.testing.assert_allclose(text_vecs, want_text, atol=1e-5)
    np.testing.assert_allclose(image_vecs, want_image, atol=1e-5)


def test_cli_flags_declare_task_tokenizer_and_names_on_a_plain_factory(tmp_path):
    tok = word_tokenizer(16, "red blue dress shirt long short striped".split())
    tok.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "b"
    r = _cli("export", "--module", "user_encoder:factory", "--task", "embed_text", "--input-names", "input_ids",
             "attention_mask", "--tokenizer", str(tmp_path / "tokenizer.json"), "--preprocess",
             '{"text": {"max_length": 12}}', "--dynamic-axis", "ids:1", "mask:1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    m = read_bundle(out).manifest
    assert m.graphs["model"].spec.task == "embed_text" and m.text.max_length == 12
    r = _cli("embed", str(out), "--text", "red dress")
    assert r.returncode == 0, r.stderr
    assert np.array(json.loads(r.stdout)["embeddings"]).shape == (1, 16)


def test_declarations_that_cannot_work_are_one_line_errors(tmp_path):
    r = _cli("export", "--module", "user_encoder:factory", "--task", "embed_text", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "must take inputs input_ids, attention_mask" in r.stderr
    assert r.stderr.strip().count("\n") == 0 and not (tmp_path / "a").exists()
    r = _cli("export", "--module", "user_encoder:factory", "--task", "embed_text", "--input-names", "input_ids",
             "attention_mask", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "needs a tokenizer" in r.stderr
    r = _cli("export", "--arch", "triplet", "--tokenizer", "x.json", "--out", str(tmp_path / "c"))
    assert r.returncode == 2 and "--tokenizer" in r.stderr and "--module" in r.stderr

    sys.path.insert(0, str(FIXTURES))
    from user_encoder import TinyTextEncoder

    big = word_tokenizer(16, BUILTIN_WORDS)  # ~200 words: ids past the module's 100-row embedding
    graph = UserGraph(TinyTextEncoder(), {"ids": torch.ones(2, 5, dtype=torch.int64),
                                          "mask": torch.ones(2, 5, dtype=torch.int64)})
    encoder = declare(UserEncoder({"t": graph}, tokenizer=big, text_max_length=16), tasks=["t=embed_text"],
                      input_names=["input_ids", "attention_mask"])
    with pytest.raises(ConfigError, match="fails on inputs made by the bundle's tokenizer"):
        export_user(encoder, tmp_path / "d")
    with pytest.raises(ConfigError, match="image preprocessing"):
        export_user(UserEncoder({"i": UserGraph(torch.nn.Identity(), {"pixels": torch.randn(1, 3, 8, 8)},
                                                task="embed_image")}), tmp_path / "e")
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()


def test_factory_forms_are_read_alike(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    enc = load_factory("user_encoder:factory")  # the (module, inputs) tuple of today's API
    assert list(enc.graphs) == ["model"] and enc.graphs["model"].task is None
    enc = load_factory("user_dual_encoder:factory")
    assert list(enc.graphs) == ["text", "image"] and enc.tokenizer is not None and enc.text_max_length == 16


def test_validate_gates_a_user_bundle_on_its_reference_outputs(user_bundle, tmp_path):
    import shutil

    from fine_infer.tools.validate import validate_bundle

    out, _ = user_bundle
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    report = validate_bundle(copy, backends=["onnxruntime"])
    assert report["passed"] and "the export's reference outputs" in report["summary"]
    assert report["graphs"]["model"]["references"]["batches"] == [1, 3, 8]
    gate = read_bundle(copy).manifest.validation["cpu_gates"]["onnxruntime"]
    assert gate["passed"] and gate["inputs"] == "recorded" and gate["graphs"]["model"]["max_abs"] < 1e-5


class _Cat(torch.nn.Module):
    """Joins two sequences along time: their other dims must agree, their lengths need not."""

    def forward(self, a, b):
        return torch.cat([a, b], dim=1).mean(dim=1)


def test_dynamic_axes_the_module_or_its_example_cannot_honour_are_one_line_errors(tmp_path):
    a, b = torch.randn(2, 5, 4), torch.randn(2, 7, 4)
    # both dim-1 axes default to the name "sequence", which ties them to one size: the example says otherwise
    with pytest.raises(ConfigError, match="dynamic axis 'sequence' is dim 1 of 'a' .size 5. and dim 1 of 'b' .size 7."):
        export_module(_Cat(), {"a": a, "b": b}, tmp_path / "x", dynamic_axes=parse_dynamic_axes(["a:1", "b:1"]))
    with pytest.raises(ConfigError, match="dynamic axis 'batch'"):
        export_module(_Cat(), {"a": a, "b": b}, tmp_path / "x", dynamic_axes=parse_dynamic_axes(["a:2=batch"]))
    # named apart they are fine, and the bundle runs at the example's own shapes
    report = export_module(_Cat(), {"a": a, "b": b}, tmp_path / "ok",
                           dynamic_axes=parse_dynamic_axes(["a:1=len_a", "b:1=len_b"]))
    assert report.graphs
    got = fine_infer.load(tmp_path / "ok").run("model", {"a": a.numpy(), "b": b.numpy()})
    np.testing.assert_allclose(next(iter(got.values())), _Cat()(a, b).numpy(), atol=1e-5)
    # a dim the module cannot vary (Linear's input features) made dynamic: one line, not a traceback
    with pytest.raises(ConfigError, match="fails on its example inputs or with a dynamic dim grown by one"):
        export_module(torch.nn.Linear(4, 3), {"x": a}, tmp_path / "y", dynamic_axes=parse_dynamic_axes(["x:2"]))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
