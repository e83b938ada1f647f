"""``sign`` and ``verify``: sign a finished bundle with a release key, check it against the public key.

A release pipeline runs ``export → validate --backend … → tune → (build-engine on the device) → sign``, then
``verify`` (or ``serve``/``load`` with ``--public-key``) wherever the bundle arrives. Exit codes of ``verify``: 0 the
signature holds, 1 the bundle fails it (unsigned, changed since signing, another key), 2 the command could not run
(a missing or unreadable key, the ``sign`` extra not installed). A thin layer over :mod:`fine_infer.bundle.signing`.
"""

from __future__ import annotations

import argparse
import os
import sys

from fine_infer.cli._args import AddCommand, add_bundle_arg
from fine_infer.errors import BundleError, ConfigError


def _password(var: str | None) -> str | None:
    if not var:
        return None
    value = os.environ.get(var)
    if value is None:
        raise ConfigError(f"--password-env {var}: the environment variable {var} is unset")
    return value


def cmd_sign(args: argparse.Namespace) -> int:
    """Sign a bundle with an elliptic-curve private key (PEM): writes BUNDLE/bundle.sig over every file of the
    bundle, the manifest included, replacing an older signature. Sign after the last change (tune, build-engine):
    any later change fails verification until the bundle is signed again."""
    from fine_infer.bundle.signing import sign_bundle

    sig = sign_bundle(args.bundle, args.key, password=_password(args.password_env))
    print(f"signed {args.bundle}: wrote {sig}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check a bundle's signature against a public key (PEM), then its checksums. Exit 0 when both hold, 1 when the
    bundle fails (unsigned, a file changed, added or removed since signing, another key), 2 on a bad key file."""
    from fine_infer.bundle import read_bundle
    from fine_infer.bundle.signing import verify_bundle

    try:
        line = verify_bundle(args.bundle, args.public_key)
        read_bundle(args.bundle)  # the signed manifest's names and checksums (a signature made elsewhere)
    except BundleError as exc:
        print(f"fine-infer verify: FAILED: {exc}", file=sys.stderr)
        return 1
    print(line + "; checksums ok")
    return 0


def register(add: AddCommand) -> None:
    """Register ``sign`` and ``verify``."""
    s = add("sign", cmd_sign, "sign a bundle with a release key (model-signing, elliptic-curve PEM)")
    add_bundle_arg(s)
    s.add_argument("--key", required=True, metavar="KEY.pem", help="the private key (P-256, P-384 or P-521, PEM)")
    s.add_argument("--password-env", metavar="VAR", help="read the password of an encrypted key from variable VAR")
    v = add("verify", cmd_verify, "check a bundle's signature against a public key (exit 1 when it fails)")
    add_bundle_arg(v)
    v.add_argument("--public-key", required=True, metavar="PUB.pem", help="the public key of the signing key pair")
