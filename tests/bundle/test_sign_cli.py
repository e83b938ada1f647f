"""`fine-infer sign` / `fine-infer verify` as a release pipeline runs them: `python -m fine_infer.cli`, exit codes
(0 ok, 1 the bundle fails verification, 2 the command cannot run) and one-line messages."""

import json
import subprocess
import sys

from fine_infer.bundle import MANIFEST, SIGNATURE


def _cli(*args):
    p = subprocess.run([sys.executable, "-m", "fine_infer.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    return p.returncode, p.stdout.strip(), p.stderr.strip()


def test_sign_then_verify_then_tamper(copy_bundle, keys):
    priv, pub, other = keys
    b = copy_bundle()
    rc, out, err = _cli("verify", b, "--public-key", pub)
    assert rc == 1 and out == "" and len(err.splitlines()) == 1 and "is not signed" in err, err
    rc, out, err = _cli("sign", b, "--key", priv)
    assert rc == 0 and len(out.splitlines()) == 1 and SIGNATURE in out, (out, err)
    rc, out, err = _cli("verify", b, "--public-key", pub)
    assert rc == 0 and len(out.splitlines()) == 1 and "signature ok" in out, (out, err)
    rc, out, err = _cli("verify", b, "--public-key", other)
    assert rc == 1 and len(err.splitlines()) == 1 and "not signed by the key" in err, err
    d = json.loads((b / MANIFEST).read_text())
    d["preprocess"]["image"]["std"][1] = 0.3
    (b / MANIFEST).write_text(json.dumps(d))
    rc, out, err = _cli("verify", b, "--public-key", pub)
    assert rc == 1 and len(err.splitlines()) == 1 and "manifest.json changed" in err and "sign it again" in err, err


def test_usage_errors_exit_2(copy_bundle, keys, tmp_path):
    priv, pub, _ = keys
    b = copy_bundle()
    rc, out, err = _cli("sign", b, "--key", tmp_path / "missing.pem")
    assert rc == 2 and len(err.splitlines()) == 1 and "missing.pem" in err, err
    rc, out, err = _cli("verify", b, "--public-key", tmp_path / "missing.pub.pem")
    assert rc == 2 and len(err.splitlines()) == 1 and "missing.pub.pem" in err, err
    rc, out, err = _cli("sign", tmp_path / "nowhere", "--key", priv)
    assert rc == 2 and len(err.splitlines()) == 1 and "nowhere" in err, err
    assert not (b / SIGNATURE).exists()
