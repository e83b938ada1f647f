"""`fine-infer export --module`: a user encoder with an attention block and a variable-length integer input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fine_infer
from fine_infer.errors import BundleError, ConfigError
from fine_infer.export import GateFailure, export_module, parse_dynamic_axes

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _cli(*args, cwd=FIXTURES):
    env = {**os.environ, "PYTHONPATH": str(FIXTURES)}
    return subprocess.run([sys.executable, "-m", "fine_infer.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


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
