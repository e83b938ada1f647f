"""Signed bundles (OpenSSF model-signing, elliptic-curve keys): sign, verify, ``load(public_key=...)`` on a real tiny
bundle; every tamper case fails both verification and load, the manifest included; re-signing after tune passes."""

import hashlib
import json

import numpy as np
import pytest

import fine_infer
from fine_infer.bundle import MANIFEST, SIGNATURE, BundleWriter, read_bundle, read_manifest, sha256_file
from fine_infer.bundle.signing import sign_bundle, signing_on_commit, verify_bundle
from fine_infer.cli import main as cli_main
from fine_infer.errors import BundleError, ConfigError

IMAGE = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)


def _set_checksum(bundle, name):
    m = bundle / MANIFEST
    d = json.loads(m.read_text())
    d["files"][name] = sha256_file(bundle / name)
    m.write_text(json.dumps(d, indent=2))


def _flip_onnx_byte(b):
    data = bytearray((b / "image.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "image.onnx").write_bytes(bytes(data))
    _set_checksum(b, "image.onnx")  # checksums consistent: only the signature can tell


def _shift_mean(b):
    m = b / MANIFEST
    d = json.loads(m.read_text())
    d["preprocess"]["image"]["mean"][0] += 0.1
    m.write_text(json.dumps(d, indent=2))  # the manifest lists no checksum of itself


def _add_file(b):
    (b / "extra.txt").write_text("not signed")


def _add_git_file(b):
    (b / ".gitignore").write_text("*")  # model-signing ignores git files by default; a bundle does not


def _remove_weights(b):
    (b / "weights.safetensors").unlink()
    d = json.loads((b / MANIFEST).read_text())
    del d["files"]["weights.safetensors"]
    d["weights"] = None
    (b / MANIFEST).write_text(json.dumps(d, indent=2))


def _unsign(b):
    (b / SIGNATURE).unlink()


def _replace_signature(b):
    d = json.loads((b / SIGNATURE).read_text())
    d["dsseEnvelope"]["signatures"][0]["sig"] = d["dsseEnvelope"]["signatures"][0]["sig"][::-1]
    (b / SIGNATURE).write_text(json.dumps(d))


TAMPER = {  # how, what the error says
    "onnx-byte": (_flip_onnx_byte, "changed after it was signed: image.onnx changed"),
    "image-mean": (_shift_mean, "changed after it was signed: manifest.json changed"),
    "added-file": (_add_file, "extra.txt added"),
    "added-git-file": (_add_git_file, ".gitignore added"),
    "removed-file": (_remove_weights, "weights.safetensors removed"),
    "unsigned": (_unsign, "is not signed"),
    "forged-signature": (_replace_signature, "does not verify"),
}


@pytest.fixture
def signed(copy_bundle, keys):
    b = copy_bundle()
    sign_bundle(b, keys[0])
    return b


def test_signed_round_trip(signed, keys):
    _, pub, _ = keys
    assert (signed / SIGNATURE).is_file()
    assert SIGNATURE not in read_manifest(signed).files
    line = verify_bundle(signed, pub)
    assert "signature ok" in line and "\n" not in line
    plain = fine_infer.load(signed, backend="onnxruntime").embed_images([IMAGE])
    session = fine_infer.load(signed, backend="onnxruntime", public_key=pub)
    np.testing.assert_array_equal(session.embed_images([IMAGE]), plain)
    assert sorted(p.name for p in signed.iterdir()) == sorted([MANIFEST, SIGNATURE, *read_manifest(signed).files])


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampering_fails_verify_and_load(signed, keys, case):
    _, pub, _ = keys
    tamper, reason = TAMPER[case]
    tamper(signed)
    if case in ("onnx-byte", "image-mean", "removed-file"):
        read_bundle(signed)  # checksums alone do not see it: the attack of the issue
    with pytest.raises(BundleError) as info:
        verify_bundle(signed, pub)
    assert reason in str(info.value)
    if "changed after" in reason or "added" in reason or "removed" in reason:
        assert "sign it again" in str(info.value)
    with pytest.raises(BundleError) as again:
        fine_infer.load(signed, backend="onnxruntime", public_key=pub)
    assert str(again.value) == str(info.value)


def test_the_image_mean_attack_moves_embeddings_unless_a_key_is_given(signed, keys):
    _, pub, _ = keys
    before = fine_infer.load(signed, backend="onnxruntime").embed_images([IMAGE])
    _shift_mean(signed)
    after = fine_infer.load(signed, backend="onnxruntime").embed_images([IMAGE])  # no key: loads, silently moved
    assert np.abs(after - before).max() > 1e-3
    with pytest.raises(BundleError, match="manifest.json changed"):
        fine_infer.load(signed, backend="onnxruntime", public_key=pub)


def test_wrong_public_key_is_refused(signed, keys):
    _, _, other = keys
    with pytest.raises(BundleError, match="not signed by the key"):
        verify_bundle(signed, other)
    with pytest.raises(BundleError, match="not signed by the key"):
        fine_infer.load(signed, public_key=other)


def test_a_symlink_in_a_signed_bundle_is_refused(signed, keys, tmp_path):
    (tmp_path / "outside.txt").write_text("x")
    (signed / "link.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(BundleError, match="link.txt is a symlink"):
        verify_bundle(signed, keys[1])


def test_resign_after_tune(signed, keys):
    from fine_infer.tools import bench
    from fine_infer.tools.tune import tune_bundle, write_tune

    priv, pub, _ = keys
    result = tune_bundle(signed, batch_sizes=(1,), budget=bench.QUICK)
    name = write_tune(signed, result)
    with pytest.raises(BundleError) as info:
        verify_bundle(signed, pub)
    msg = str(info.value)
    assert "changed after it was signed" in msg and "manifest.json changed" in msg and f"{name} added" in msg
    assert "sign it again" in msg and "fine-infer sign" in msg
    old_sig = (signed / SIGNATURE).read_bytes()
    sign_bundle(signed, priv)  # re-signing replaces the old signature
    assert (signed / SIGNATURE).read_bytes() != old_sig
    assert "signature ok" in verify_bundle(signed, pub)
    s = fine_infer.load(signed, public_key=pub)
    assert s.embed_images([IMAGE]).shape[0] == 1
    assert name in read_manifest(signed).files
    assert sorted(p.name for p in signed.iterdir()) == sorted([MANIFEST, SIGNATURE, *read_manifest(signed).files])


def test_sign_refuses_a_bundle_that_would_not_load(copy_bundle, keys):
    priv = keys[0]
    b = copy_bundle()
    (b / "stray.bin").write_bytes(b"?")
    with pytest.raises(BundleError, match="does not list.*stray.bin"):
        sign_bundle(b, priv)
    (b / "stray.bin").unlink()
    (b / "image.onnx").write_bytes(b"damaged")
    with pytest.raises(BundleError, match="image.onnx does not match its checksum"):
        sign_bundle(b, priv)
    assert not (b / SIGNATURE).exists()
    assert sorted(p.name for p in b.iterdir()) == sorted([MANIFEST, *read_manifest(b).files])


def test_bad_keys_are_config_errors(signed, keys, tmp_path):
    priv, pub, _ = keys
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(ConfigError, match="garbage.pem"):
        sign_bundle(signed, garbage)
    with pytest.raises(ConfigError, match="garbage.pem"):
        verify_bundle(signed, garbage)
    with pytest.raises(ConfigError, match="missing.pem"):
        verify_bundle(signed, tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="private key"):
        verify_bundle(signed, priv)  # a private key where the public one belongs


def test_encrypted_key_with_password(copy_bundle, keys, tmp_path):
    from cryptography.hazmat.primitives import serialization

    priv, pub, _ = keys
    key = serialization.load_pem_private_key(priv.read_bytes(), None)
    enc = tmp_path / "enc.pem"
    enc.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"s3cret")))
    b = copy_bundle()
    with pytest.raises(ConfigError, match="password"):
        sign_bundle(b, enc)
    sign_bundle(b, enc, password="s3cret")
    assert "signature ok" in verify_bundle(b, pub)


def test_signing_on_commit_signs_before_the_rename_and_a_failure_leaves_nothing(tmp_path, keys, tiny_bundle):
    from fine_infer.bundle.writer import on_commit

    priv, pub, _ = keys
    m = read_manifest(tiny_bundle)

    def write(dest):
        with BundleWriter(dest) as w:
            for name in m.files:
                w.path(name).write_bytes((tiny_bundle / name).read_bytes())
            return w.commit(read_manifest(tiny_bundle))

    with signing_on_commit(priv):
        write(tmp_path / "signed")
    assert "signature ok" in verify_bundle(tmp_path / "signed", pub)

    def fail(folder):
        raise BundleError("signing failed")

    with on_commit(fail), pytest.raises(BundleError, match="signing failed"):
        write(tmp_path / "never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["signed"]


def test_export_with_sign_key(tmp_path, keys):
    priv, pub, _ = keys
    out = tmp_path / "t"
    argv = ["export", "--arch", "triplet", "--preset", "tiny", "--out", str(out), "--sign-key", str(priv)]
    assert cli_main(argv) == 0
    assert "signature ok" in verify_bundle(out, pub)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_export_with_a_bad_sign_key_fails_first_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.pem"
    bad.write_text("nope")
    out = tmp_path / "t"
    assert cli_main(["export", "--arch", "triplet", "--preset", "tiny", "--out", str(out), "--sign-key", str(bad)]) == 2
    assert "bad.pem" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pem"]


def test_serve_public_key_refuses_an_unsigned_bundle_before_listening(copy_bundle, keys, capsys):
    b = copy_bundle()
    assert cli_main(["serve", str(b), "--public-key", str(keys[1]), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "is not signed" in err and len(err.strip().splitlines()) == 1


def test_key_fingerprint_in_the_verify_line(signed, keys):
    from cryptography.hazmat.primitives import serialization

    _, pub, _ = keys
    spki = serialization.load_pem_public_key(pub.read_bytes()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert hashlib.sha256(spki).hexdigest()[:16] in verify_bundle(signed, pub)


def test_a_signature_that_leaves_files_out_is_refused(copy_bundle, keys):
    """Signed elsewhere with model-signing's ignore_paths: the files it leaves out could be anything."""
    from model_signing import hashing, signing

    priv, pub, _ = keys
    b = copy_bundle()
    cfg = hashing.Config().set_ignored_paths(paths=[SIGNATURE, "weights.safetensors"], ignore_git_paths=False)
    signing.Config().use_elliptic_key_signer(private_key=priv).set_hashing_config(cfg).sign(b, b / SIGNATURE)
    with pytest.raises(BundleError, match="does not cover weights.safetensors"):
        verify_bundle(b, pub)
