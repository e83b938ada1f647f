"""Manifest file names stay inside the bundle (issue "Trust nothing from outside"): every name a manifest lists is a
plain relative POSIX path, checked when the manifest is parsed, before any file is looked at (the same error whether
or not an outside target exists); symlinks are refused; no writer writes or deletes outside the folder."""

import json
import os

import pytest

from fine_infer.bundle import (BundleWriter, GraphEntry, Manifest, commit_manifest, read_bundle, read_manifest,
                               sha256_file, update_manifest)
from fine_infer.errors import BundleError
from fine_infer.specs import GraphSpec, TensorSpec

SPEC = GraphSpec("g", "custom", (TensorSpec("x", "float32", ("batch", 4)),), (TensorSpec("y", "float32", ("batch", 2)),))
VICTIM_TEXT = "precious"

# (field as the error names it, how to plant a name there in manifest.json)
FIELDS = {
    "files": lambda d, name, digest: d["files"].__setitem__(name, digest),
    "graphs.g.file": lambda d, name, digest: d["graphs"]["g"].__setitem__("file", name),
    "graphs.g.variants.fp16": lambda d, name, digest: d["graphs"]["g"]["variants"].__setitem__("fp16", name),
    "tokenizer": lambda d, name, digest: d.__setitem__("tokenizer", name),
    "weights": lambda d, name, digest: d.__setitem__("weights", name),
    "validation.tune.file": lambda d, name, digest: d["validation"].__setitem__("tune", {"file": name}),
    "validation.references.file": lambda d, name, digest: d["validation"].__setitem__("references", {"file": name}),
    "validation.tensorrt.timing_cache":
        lambda d, name, digest: d["validation"].__setitem__("tensorrt", {"timing_cache": name}),
}
BAD_NAMES = ["../../victim.txt", "ABS", "sub/../../../victim.txt", "a\\..\\..\\victim.txt", "", ".", "./g.onnx",
             "a//b", "a/", "a\x00b", "C:/victim.txt"]


@pytest.fixture
def layout(tmp_path):
    """A bundle at tmp/x/b and a victim file at tmp/victim.txt (= b/../../victim.txt)."""
    dest = tmp_path / "x" / "b"
    with BundleWriter(dest) as w:
        w.path("g.onnx").write_bytes(b"model-bytes")
        w.path("extra.txt").write_text("hello")
        w.commit(Manifest(graphs={"g": GraphEntry(SPEC, "g.onnx", 20)}, files={}, source="test"))
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    return dest, victim


def _plant(bundle, field, name, digest):
    m = bundle / "manifest.json"
    d = json.loads(m.read_text())
    FIELDS[field](d, name, digest)
    m.write_text(json.dumps(d))


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(BundleError) as info:
        fn(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize("field", list(FIELDS))
@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_name_outside_the_bundle_is_refused_at_parse_time_with_no_oracle(layout, field, bad):
    bundle, victim = layout
    name = str(victim) if bad == "ABS" else bad
    _plant(bundle, field, name, sha256_file(victim))  # a matching checksum: the attack of the issue
    msg = _error(read_bundle, bundle)
    assert field in msg and repr(name) in msg, msg
    assert _error(read_bundle, bundle, verify=False) == msg
    assert _error(read_manifest, bundle) == msg
    victim.unlink()  # the same error whether or not the outside file exists
    assert _error(read_bundle, bundle) == msg


def test_tune_does_not_delete_a_file_outside_the_bundle(layout):
    from fine_infer.runtime.choice import TUNE_KIND
    from fine_infer.tools.tune import write_tune

    bundle, victim = layout
    _plant(bundle, "validation.tune.file", "../../victim.txt", None)
    before = (bundle / "manifest.json").read_bytes()
    result = {"kind": TUNE_KIND, "choice": "onnxruntime", "reason": "test", "date": "now", "signature": {},
              "batch_sizes": [1]}
    msg = _error(write_tune, bundle, result)
    assert "validation.tune.file" in msg and "../../victim.txt" in msg
    assert victim.read_text() == VICTIM_TEXT
    assert (bundle / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in bundle.iterdir()) == ["extra.txt", "g.onnx", "manifest.json"]  # no tune file left
    _error(update_manifest, bundle, lambda m: [])
    assert victim.read_text() == VICTIM_TEXT


@pytest.mark.parametrize("stale", ["../../victim.txt", "ABS", "sub/../../../victim.txt"])
def test_commit_manifest_never_deletes_or_hashes_outside(layout, stale):
    bundle, victim = layout
    stale = str(victim) if stale == "ABS" else stale
    before = (bundle / "manifest.json").read_bytes()
    m = read_manifest(bundle)
    _error(commit_manifest, bundle, m, stale=[stale])
    assert victim.read_text() == VICTIM_TEXT
    _error(commit_manifest, bundle, m, added=[stale])
    assert (bundle / "manifest.json").read_bytes() == before  # refused before anything was written

    def drop(man):  # a mutate that un-lists a file outside: refused, nothing written or deleted
        return [stale]

    _error(update_manifest, bundle, drop)
    assert victim.read_text() == VICTIM_TEXT
    assert (bundle / "manifest.json").read_bytes() == before


def test_a_manifest_naming_a_file_outside_is_never_written(layout):
    bundle, victim = layout
    m = read_manifest(bundle)
    m.graphs["g"].variants["fp16"] = "../../victim.txt"
    before = (bundle / "manifest.json").read_bytes()
    assert "graphs.g.variants.fp16" in _error(commit_manifest, bundle, m)
    assert (bundle / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("target_exists", [True, False])
def test_a_symlink_inside_the_bundle_is_refused(layout, target_exists):
    bundle, victim = layout
    outside = victim.with_name("outside.txt")
    outside.write_text("hello")  # the same bytes as extra.txt, so its checksum matches
    (bundle / "extra.txt").unlink()
    (bundle / "extra.txt").symlink_to(outside)
    if not target_exists:
        outside.unlink()
    msg = _error(read_bundle, bundle)
    assert "extra.txt" in msg and "symlink" in msg
    assert str(outside) not in msg
    b = read_bundle(bundle, verify=False)  # unverified loads still never follow it
    assert _error(b.file, "extra.txt") == msg


def test_a_symlinked_folder_inside_the_bundle_is_refused(layout, tmp_path):
    bundle, victim = layout
    (tmp_path / "outdir").mkdir()
    (tmp_path / "outdir" / "victim.txt").write_text(VICTIM_TEXT)
    (bundle / "sub").symlink_to(tmp_path / "outdir")
    _plant(bundle, "files", "sub/victim.txt", sha256_file(victim))
    msg = _error(read_bundle, bundle)
    assert "sub" in msg and "symlink" in msg


def test_bundle_writer_refuses_names_outside_and_symlinks(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    for bad in ("../escape.txt", str(tmp_path / "abs.txt"), "a/../../b"):
        with BundleWriter(tmp_path / "b") as w:
            _error(w.path, bad)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "b").exists()
    with BundleWriter(tmp_path / "b") as w:
        w.path("g.onnx").write_bytes(b"x")
        os.symlink(outside, w.path("link.txt"))
        assert "symlink" in _error(w.commit, Manifest(graphs={"g": GraphEntry(SPEC, "g.onnx", 20)}, files={}))
    assert not (tmp_path / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside.txt"]


def test_nested_names_inside_the_bundle_still_work(tmp_path):
    with BundleWriter(tmp_path / "b") as w:
        w.path("sub").mkdir()
        w.path("sub/g.onnx").write_bytes(b"x")
        w.commit(Manifest(graphs={"g": GraphEntry(SPEC, "sub/g.onnx", 20)}, files={}))
    b = read_bundle(tmp_path / "b")
    assert b.file("sub/g.onnx").read_bytes() == b"x"
    assert set(b.manifest.files) == {"sub/g.onnx"}
