"""Shared by the signing tests: one tiny exported bundle (copied per test) and elliptic-curve key pairs as PEM."""

import shutil

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A tiny triplet bundle (image graph + weights), exported once; tests copy it with :func:`copy_bundle`."""
    from fine_infer.export import export_arch

    out = tmp_path_factory.mktemp("signing") / "triplet"
    export_arch("triplet", out, "tiny")
    return out


@pytest.fixture
def copy_bundle(tiny_bundle, tmp_path):
    def copy(name: str = "b"):
        return shutil.copytree(tiny_bundle, tmp_path / name)

    return copy


def _key_pair(folder, name):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """``(private, public, other_public)``: a key pair and the public key of another pair, as PEM files."""
    pytest.importorskip("model_signing", reason="the sign extra is not installed: pip install 'fine-infer[sign]'")
    folder = tmp_path_factory.mktemp("keys")
    priv, pub = _key_pair(folder, "release")
    _, other = _key_pair(folder, "other")
    return priv, pub, other
