"""A bundle from elsewhere is hostile (an attacker controls every file, the manifest and its checksums included):
whatever it holds, loading refuses it with one clear error, reads nothing outside it and nothing unchecked inside it,
and never allocates what a field merely claims. Each case below was found by attacking a real exported bundle."""

import hashlib
import io
import json
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import fine_infer
from fine_infer.bundle import read_bundle
from fine_infer.errors import BundleError, CheckpointError


def _rehash(bundle, manifest=None):
    """Write ``manifest`` (default: the bundle's own) with every listed file's sha256 recomputed, as an attacker would."""
    m = manifest if manifest is not None else json.loads((bundle / "manifest.json").read_text())
    if isinstance(m, dict) and isinstance(m.get("files"), dict):
        m["files"] = {n: hashlib.sha256((bundle / n).read_bytes()).hexdigest() for n in m["files"]}
    (bundle / "manifest.json").write_text(m if isinstance(m, str) else json.dumps(m))
    return bundle


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def test_a_file_the_manifest_does_not_list_is_refused(copy_bundle):
    # ONNX Runtime and OpenVINO read a graph's external data by name from beside it: an unlisted file would be run
    # unchecked, so a bundle is exactly what its manifest lists
    b = copy_bundle()
    (b / "w.bin").write_bytes(b"not checksummed")
    with pytest.raises(BundleError, match=r"holds files its manifest does not list \(w.bin\)"):
        read_bundle(b)
    (b / "w.bin").unlink()
    assert read_bundle(b).manifest.files


MANIFEST_CASES = {
    "a list": lambda m: [1, 2],
    "nested 100000 deep": lambda m: "[" * 100_000 + "]" * 100_000,
    "graphs a list": lambda m: {**m, "graphs": [1, 2]},
    "preprocess a list": lambda m: {**m, "preprocess": [1]},
    "format_version true": lambda m: {**m, "format_version": True},
    "image size 10**6": lambda m: {**m, "preprocess": {**m["preprocess"], "image": {
        **m["preprocess"]["image"], "size": 10**6, "crop": 10**6}}},
    "mean a string": lambda m: {**m, "preprocess": {**m["preprocess"], "image": {
        **m["preprocess"]["image"], "mean": "abc"}}},
    "mean NaN": lambda m: json.dumps(m).replace('"mean": [', '"mean": [NaN, '),
    "unknown interpolation": lambda m: {**m, "preprocess": {**m["preprocess"], "image": {
        **m["preprocess"]["image"], "interpolation": "zzz"}}},
    "text max_length 10**12": lambda m: {**m, "preprocess": {**m["preprocess"], "text": {
        "tokenizer": "hf", "max_length": 10**12}}},
    "dtype a number": lambda m: {**m, "graphs": {"image": {**m["graphs"]["image"], "inputs": [
        {**m["graphs"]["image"]["inputs"][0], "dtype": 5}]}}},
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_a_hostile_manifest_is_one_bundle_error(copy_bundle, case):
    b = copy_bundle()
    _rehash(b, MANIFEST_CASES[case](_manifest(b)))
    with pytest.raises(BundleError, match="damaged|format version"):
        fine_infer.load(b)


def test_a_hostile_manifest_is_one_line_from_the_cli(copy_bundle):
    b = copy_bundle()
    _rehash(b, MANIFEST_CASES["nested 100000 deep"](None))
    r = subprocess.run([sys.executable, "-m", "fine_infer.cli", "info", str(b)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "damaged" in r.stderr, r.stderr


def _npz(arrays_or_bytes):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in arrays_or_bytes.items():
            z.writestr(name + ".npy", data)
    return buf.getvalue()


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_references_are_read_only_from_a_checksummed_file_and_within_bounds(copy_bundle):
    from fine_infer.tools.validate import validate_bundle

    b = copy_bundle()
    m = _manifest(b)
    m["validation"]["references"]["file"] = "../../outside.npz"  # outside: refused when the manifest is parsed
    _rehash(b, m)
    with pytest.raises(BundleError, match="validation.references.file"):
        read_bundle(b)

    b = copy_bundle("unlisted")
    (b / "references.npz").rename(b / "refs2.npz")  # inside, but not a checksummed file
    m = _manifest(b)
    del m["files"]["references.npz"]
    m["validation"]["references"]["file"] = "refs2.npz"
    _rehash(b, m)
    with pytest.raises(BundleError, match="does not list|not among the bundle's checksummed files"):
        validate_bundle(b)

    head = io.BytesIO()  # an array header that declares 10**10 floats over 16 bytes of data
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (10**10,)})
    for name, content in (("declares_1e10_floats", _npz({"image/0/in/pixels": head.getvalue() + bytes(16)})),
                          ("zip_bomb", _npz({"image/0/in/pixels": _npy(np.zeros(80_000_000, np.float32))}))):
        b = copy_bundle(name)
        (b / "references.npz").write_bytes(content)
        _rehash(b)
        with pytest.raises(BundleError, match="does not hold the references"):
            validate_bundle(b)


def test_a_hostile_tune_result_is_one_bundle_error(copy_bundle):
    for i, content in enumerate(("[1]", "[" * 100_000 + "]" * 100_000,
                                 json.dumps({"kind": "fine-infer-tune", "paths": [1]}),
                                 json.dumps({"kind": "fine-infer-tune", "paths": {"onnxruntime/fp32": {"speedup": "x"}}}))):
        b = copy_bundle(f"b{i}")
        (b / "tune.x.json").write_text(content)
        m = _manifest(b)
        m["files"]["tune.x.json"] = ""
        m["validation"]["tune"] = {"file": "tune.x.json", "choice": "onnxruntime/fp32"}
        _rehash(b, m)
        with pytest.raises(BundleError, match="tune result"):
            fine_infer.load(b)


def test_a_malformed_tokenizer_file_is_a_bundle_error(tmp_path):
    from fine_infer.tokenization import load_tokenizer

    for content in ('{"version": "1.0", "trunc', "[]", "[" * 100_000 + "]" * 100_000):
        path = tmp_path / "tokenizer.json"
        path.write_text(content)
        with pytest.raises(BundleError, match="is not a readable tokenizer.json"):
            load_tokenizer(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_payload_checkpoint_is_refused_in_one_line_without_unsafe_advice(tmp_path):
    from fine_infer.models._checkpoint import load_state_dict_file

    marker = str(tmp_path / "PWNED")
    for name, data in (("raw.pt", pickle.dumps({"w": _Payload(marker)})),):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            load_state_dict_file(path)
        msg = str(info.value)
        assert "\n" not in msg and "weights_only=False" not in msg and "not a plain tensor checkpoint" in msg, msg
    assert not (tmp_path / "PWNED").exists()


def test_a_config_that_cannot_build_the_model_is_a_bundle_error(copy_bundle):
    pytest.importorskip("torch")
    b = copy_bundle()
    m = _manifest(b)
    key = next(k for k, v in m["config"].items() if type(v) is int)  # an integer field of the zoo config
    m["config"][key] = "two"
    _rehash(b, m)
    with pytest.raises(BundleError, match="its config cannot build"):
        fine_infer.load(b, backend="torch").embed_images([np.zeros((32, 32, 3), np.uint8)])


def test_a_temp_left_by_an_interrupted_write_is_refused_with_what_to_do(copy_bundle):
    from fine_infer._atomic import temp_name

    b = copy_bundle()
    (b / temp_name("manifest.json")).write_text("{}")  # a name of that form proves nothing about what it holds
    with pytest.raises(BundleError, match="temp files of an interrupted write: delete them"):
        read_bundle(b)
