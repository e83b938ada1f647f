"""The deployment flags of `fine-infer export` and running variants through `fine_infer.load(..., variant=...)`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fine_infer
from fine_infer.bundle import read_bundle
from fine_infer.tools.catalogue import generate, save_catalogue
from fine_infer.errors import BundleError, ConfigError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "fine_infer.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def variant_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-variants")
    r = _cli("export", "--arch", "triplet", "--preset", "tiny", "--out", str(root / "b"), "--fp16", "--int8",
             "--optimize", "cpu", "--lint", "--triton-repo", str(root / "repo"), "--json")
    assert r.returncode == 0, r.stderr
    return root, json.loads(r.stdout)


def test_export_flags_write_gated_variants_lint_and_a_triton_repo(variant_bundle):
    root, report = variant_bundle
    g = report["graphs"]["image"]
    assert set(g["variants"]) == {"fp16", "int8", "cpu-opt"}
    assert all(row["passed"] and row["summary"]["min_cosine"] >= 0.99 for row in g["variants"].values())
    assert set(g["lint"]) == {"fp32", "fp16"} and all("passes" in text for text in g["lint"].values())
    entry = read_bundle(root / "b").manifest.graphs["image"]  # checksums of every variant verified
    assert entry.variants == {v: f"image.{v}.onnx" for v in ("fp16", "int8", "cpu-opt")}
    assert (root / "repo" / "triplet_image" / "config.pbtxt").is_file()


def test_each_variant_runs_and_stays_close_to_fp32(variant_bundle, tmp_path):
    root, _ = variant_bundle
    save_catalogue(generate(8, seed=int(np.random.randint(1 << 30))), tmp_path)
    images = sorted(tmp_path.glob("*.png"))
    ref = fine_infer.load(root / "b").embed_images(images)
    for variant, min_cos in (("fp16", 0.999), ("int8", 0.99), ("cpu-opt", 0.99999)):
        session = fine_infer.load(root / "b", variant=variant)
        got = session.embed_images(images)
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= min_cos, (variant, cos.min())
        assert session.variant == variant and "variant=" + repr(variant) in repr(session)


def test_variant_errors_are_clear(variant_bundle):
    root, _ = variant_bundle
    with pytest.raises(BundleError, match="no variant 'bf16'; available: fp32, fp16, int8, cpu-opt"):
        fine_infer.load(root / "b", variant="bf16")
    with pytest.raises(ConfigError, match="torch backend runs the fp32 model"):
        fine_infer.load(root / "b", backend="torch", variant="int8")
    with pytest.raises(BundleError, match="no TensorRT engine"):
        fine_infer.load(root / "b", backend="tensorrt")
    r = _cli("embed", str(root / "b"), "--text", "red dress", "--variant", "int8")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    for axis in ("h=3,2,1", "h=-1,0,1"):  # a profile range must be 1 <= MIN <= OPT <= MAX
        r = _cli("lint", str(root / "b"), "--axis", axis)
        assert r.returncode == 2 and "must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX" in r.stderr, r.stderr


def test_a_failing_lint_gate_stops_the_export_and_writes_nothing(tmp_path):
    (tmp_path / "det_module.py").write_text(
        "import torch\n"
        "class Det(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.linalg.det(x)[:, None] * x.flatten(1)\n"
        "def factory():\n"
        "    return Det(), {'x': torch.randn(2, 3, 3)}\n"
    )
    env_path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "fine_infer.cli", "export", "--module", "det_module:factory", "--lint",
                        "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": env_path})
    assert r.returncode == 2 and "TensorRT lint of model.onnx failed" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))
