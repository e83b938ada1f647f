"""Signed bundles: an OpenSSF ``model-signing`` signature over every file of a bundle, the manifest included.

Checksums in the manifest catch damage, not an attacker who can rewrite the manifest too (a changed image mean loads,
validates and moves every embedding). A signature made with a release key and checked against its public key can:
:func:`sign_bundle` writes ``bundle.sig`` (a Sigstore bundle with a DSSE envelope, elliptic-curve key, no network)
into the bundle; :func:`verify_bundle` checks it, and ``fine_infer.load(path, public_key=...)`` refuses a bundle that
does not verify. The signature covers every file of the folder except ``bundle.sig`` itself (files git would ignore
included: a bundle has no such exemption); a symlink or an extra, missing or changed file fails. A bundle changed
after signing (``tune``, ``build-engine``, ``validate --backend`` rewrite the manifest) fails until it is signed
again, which replaces the old signature.

The signature proves what the folder held when it was checked; a process that can write the folder while it is being
loaded is out of reach of any check done before loading. ``model-signing`` is imported only here, and only when a
signature is made or checked (``pip install 'fine-infer[sign]'``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from fine_infer._atomic import fsync_dir, in_flight, remove_stale_temps_in, temp_name
from fine_infer.bundle.manifest import SIGNATURE
from fine_infer.bundle.paths import walk_files
from fine_infer.bundle.reader import read_bundle, sha256_file
from fine_infer.bundle.writer import on_commit
from fine_infer.errors import BackendUnavailableError, BundleError, ConfigError

CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model-signing accepts (P-256, P-384, P-521)


def _library() -> Any:
    try:
        from model_signing import hashing, signing, verifying
    except ImportError:
        raise BackendUnavailableError("signed bundles need the model-signing library: "
                                      "pip install 'fine-infer[sign]'") from None
    return hashing, signing, verifying


def _hashing_config(hashing: Any) -> Any:
    """Every file by sha256, symlinks refused, only the signature itself left out (no git-file exemption)."""
    return hashing.Config().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False) \
        .set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)


def _read_key(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def _check_curve(key: Any, path: str | Path, what: str) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) or key.curve.name not in CURVES:
        raise ConfigError(f"{path} is not an elliptic-curve {what} on P-256, P-384 or P-521 (what model-signing "
                          "signs with); make one with `openssl ecparam -name prime256v1 -genkey -noout`")


def check_private_key(key: str | Path, password: str | None = None) -> None:
    """Load the PEM private key ``key`` (a :class:`ConfigError` saying why it cannot sign)."""
    _library()
    from cryptography.hazmat.primitives import serialization

    data = _read_key(key, "private key")
    try:
        loaded = serialization.load_pem_private_key(data, password.encode() if password is not None else None)
    except TypeError as exc:  # encrypted without a password, or a password for a plain key
        hint = "" if password is not None else " (give its password: password=, or --password-env VAR)"
        raise ConfigError(f"private key {key}: {exc}{hint}") from None
    except ValueError as exc:
        raise ConfigError(f"{key} is not a PEM private key this can use ({exc}); a wrong password says so too") \
            from None
    _check_curve(loaded, key, "private key")


def _public_key(path: str | Path) -> str:
    """``path`` loaded as a PEM public key (:class:`ConfigError` if not); returns its fingerprint."""
    from cryptography.hazmat.primitives import serialization

    data = _read_key(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        hint = " (that is a private key: give the public key of the pair)" if b"PRIVATE KEY" in data else ""
        raise ConfigError(f"{path} is not a PEM public key{hint}: {exc}") from None
    _check_curve(key, path, "public key")
    spki = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()  # the key id model-signing records in the signature


def sign_bundle(path: str | Path, key: str | Path, *, password: str | None = None) -> Path:
    """Sign bundle ``path`` with the PEM elliptic-curve private key ``key``; returns the signature's path.

    Only a bundle that loads is signed: its manifest names and checksums are verified first and a file the manifest
    does not list is refused (what is signed is exactly what ``load`` reads). An existing signature is replaced
    atomically, so re-signing after ``tune`` or ``build-engine`` is how a changed bundle becomes valid again."""
    hashing, signing, _ = _library()
    check_private_key(key, password)
    folder = Path(path)
    remove_stale_temps_in(folder)  # first: read_bundle refuses any file the manifest does not list
    read_bundle(folder)  # names, checksums, and nothing unlisted: what is signed is exactly what load reads
    secret = password.encode() if password is not None else None  # cryptography's PEM loader takes bytes
    config = signing.Config().use_elliptic_key_signer(private_key=Path(key), password=secret) \
        .set_hashing_config(_hashing_config(hashing))
    with in_flight(folder / temp_name(SIGNATURE)) as tmp:  # written after hashing: never part of what is signed
        try:
            config.sign(folder, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, folder / SIGNATURE)
        finally:
            tmp.unlink(missing_ok=True)
    fsync_dir(folder)
    return folder / SIGNATURE


@contextlib.contextmanager
def signing_on_commit(key: str | Path, *, password: str | None = None) -> Iterator[None]:
    """Within the block, every bundle a :class:`~fine_infer.bundle.BundleWriter` commits (an export) is signed with
    ``key`` before it is renamed into place: a signing failure leaves nothing. The key is checked on entry."""
    check_private_key(key, password)
    with on_commit(lambda folder: sign_bundle(folder, key, password=password)):
        yield


def _signed_files(sig: bytes) -> dict[str, str] | None:
    """``{name: sha256}`` the (already verified) signature covers; None if it is not a per-file sha256 signature."""
    try:
        envelope = json.loads(sig)["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"]))
        predicate = statement["predicate"]
        if predicate["serialization"]["method"] != "files":
            return None
        return {r["name"]: r["digest"] for r in predicate["resources"] if r.get("algorithm") == "sha256"}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _changes(folder: Path, files: list[str], signed: dict[str, str]) -> str:
    now = [n for n in files if n != SIGNATURE]
    changed = [n for n in now if n in signed and sha256_file(folder / n) != signed[n]]
    added = [n for n in now if n not in signed]
    removed = [n for n in signed if n not in now]
    parts = [*(f"{n} changed" for n in changed), *(f"{n} added" for n in added), *(f"{n} removed" for n in removed)]
    return ", ".join(parts) or "the files differ from the signed ones"


def verify_bundle(path: str | Path, public_key: str | Path) -> str:
    """Check bundle ``path``'s signature against the PEM public key ``public_key``: one line on success, else a
    :class:`BundleError` saying why (unsigned, a file changed/added/removed since signing, another key, a forged
    signature, a symlink). Bad key files are :class:`ConfigError`. Checksums are :func:`read_bundle`'s job."""
    hashing, _, verifying = _library()
    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"bundle {folder} does not exist or is not a directory")
    fingerprint = _public_key(public_key)  # a bad key file is the caller's error, whatever the bundle holds
    sig = folder / SIGNATURE
    resign = f"sign it again: fine-infer sign {folder} --key KEY.pem"
    if sig.is_symlink() or not sig.is_file():
        raise BundleError(f"bundle {folder} is not signed: it has no {SIGNATURE} (sign it with "
                          f"`fine-infer sign {folder} --key KEY.pem`)")
    files = walk_files(folder)  # symlinks and special files refused, before anything is hashed
    from cryptography.exceptions import InvalidSignature

    config = verifying.Config().use_elliptic_key_verifier(public_key=Path(public_key)) \
        .set_hashing_config(_hashing_config(hashing))
    data = sig.read_bytes()  # read once: what is verified is what is parsed below
    try:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / SIGNATURE).write_bytes(data)
            config.verify(folder, Path(tmp) / SIGNATURE)
    except InvalidSignature:
        raise BundleError(f"bundle {folder}: its signature does not verify with {public_key} ({SIGNATURE} was "
                          "altered or forged)") from None
    except ValueError as exc:
        text = str(exc)
        if text.startswith("Key mismatch"):
            raise BundleError(f"bundle {folder} was not signed by the key {public_key} (its signature names "
                              "another key)") from None
        if text.startswith("Signature mismatch"):
            signed = _signed_files(data)
            what = _changes(folder, files, signed) if signed is not None else text
            raise BundleError(f"bundle {folder} was changed after it was signed: {what}; if you changed it "
                              f"yourself (tune, build-engine, validate --backend), {resign}") from None
        raise BundleError(f"bundle {folder}: its signature does not verify ({text})") from None
    except Exception as exc:  # noqa: BLE001 - an unreadable signature file, whatever the parser raised
        raise BundleError(f"bundle {folder}: {SIGNATURE} is damaged or not a model-signing signature "
                          f"({type(exc).__name__}: {exc}); {resign}") from None
    signed = _signed_files(data)
    if signed is None:
        raise BundleError(f"bundle {folder}: {SIGNATURE} is not a per-file sha256 signature; {resign}")
    uncovered = [n for n in files if n != SIGNATURE and n not in signed]
    if uncovered:  # a signature made elsewhere with ignore_paths: refuse what it does not cover
        raise BundleError(f"bundle {folder}: its signature does not cover {', '.join(uncovered[:5])}; {resign}")
    return f"{folder}: signature ok ({len(signed)} files, key sha256:{fingerprint[:16]})"
