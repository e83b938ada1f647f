"""The bundle format: atomic writes, checksums, refusal to overwrite, clear errors on damage."""

import json
import os

import pytest

from fine_infer.bundle import FORMAT_VERSION, BundleWriter, GraphEntry, Manifest, read_bundle
from fine_infer.errors import BundleError
from fine_infer.specs import GraphSpec, TensorSpec

SPEC = GraphSpec("g", "custom", (TensorSpec("x", "float32", ("batch", 4)),), (TensorSpec("y", "float32", ("batch", 2)),))


def _write(dest, payload=b"model-bytes", force=False):
    with BundleWriter(dest, force=force) as w:
        w.path("g.onnx").write_bytes(payload)
        w.path("extra.txt").write_text("hello")
        return w.commit(Manifest(graphs={"g": GraphEntry(SPEC, "g.onnx", 20)}, files={}, source="test"))


def test_roundtrip_lists_every_file_with_sha256(tmp_path):
    b = _write(tmp_path / "b")
    again = read_bundle(tmp_path / "b")
    assert set(again.manifest.files) == {"g.onnx", "extra.txt"}
    assert again.manifest.graphs["g"].spec == SPEC
    assert again.manifest.format_version == FORMAT_VERSION
    assert b.manifest.files == again.manifest.files
    # no temp folders left beside the bundle
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_existing_output_refused_without_force_and_replaced_with_it(tmp_path):
    _write(tmp_path / "b", b"one")
    with pytest.raises(BundleError, match="already exists.*--force"):
        _write(tmp_path / "b", b"two")
    assert (tmp_path / "b" / "g.onnx").read_bytes() == b"one"
    _write(tmp_path / "b", b"two", force=True)
    assert (tmp_path / "b" / "g.onnx").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_force_never_replaces_a_folder_that_is_not_a_bundle(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):
        _write(tmp_path / "data", force=True)
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"


def test_failure_inside_writer_leaves_nothing_and_keeps_old_bundle(tmp_path):
    _write(tmp_path / "b", b"old")
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / "b", force=True) as w:
            w.path("g.onnx").write_bytes(b"half")
            raise RuntimeError("export crashed")
    assert (tmp_path / "b" / "g.onnx").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_file_is_a_clear_error(tmp_path, damage):
    _write(tmp_path / "b")
    f = tmp_path / "b" / "g.onnx"
    if damage == "flip":
        data = bytearray(f.read_bytes())
        data[3] ^= 0x01
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-2])
    else:
        os.unlink(f)
    with pytest.raises(BundleError, match="g.onnx"):
        read_bundle(tmp_path / "b")


def test_unknown_format_version_and_garbage_manifest(tmp_path):
    _write(tmp_path / "b")
    m = tmp_path / "b" / "manifest.json"
    data = json.loads(m.read_text())
    data["format_version"] = 99
    m.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format version 99"):
        read_bundle(tmp_path / "b")
    m.write_text("{not json")
    with pytest.raises(BundleError, match="damaged"):
        read_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="no manifest.json"):
        read_bundle(tmp_path)
