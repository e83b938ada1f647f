"""A bare ``import kernels`` / ``import export`` never resolves to this repository's folders (they are
``fine_infer.kernels`` and ``fine_infer.export``), even with Python started in the repository root, where the
current folder comes first on ``sys.path``; the editable install also lists the root. Checked in fresh interpreters."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["kernels", "export"])
def test_a_bare_import_from_the_repository_root_does_not_find_the_folder(name):
    r = _run(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
             f"try:\n    import {name}\nexcept ModuleNotFoundError as e:\n    print('missing', e)\n"
             f"else:\n    print('found', {name}.__file__)")
    assert r.returncode == 0, r.stderr
    kind, _, where = r.stdout.strip().partition(" ")
    if kind == "found":  # another package of that name is installed (transformers brings PyPI `kernels`): that one
        assert not Path(where).resolve().is_relative_to(ROOT / name), where
        assert importlib.util.find_spec(name) is not None
    else:
        assert kind == "missing" and f"fine_infer.{name}" in where, r.stdout


def test_the_package_names_still_work_from_the_repository_root():
    r = _run("import fine_infer.kernels as k, fine_infer.export as e; print(k.__name__, e.__name__, callable(k.maa_pool))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["fine_infer.kernels", "fine_infer.export", "True"]


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")
    r = _run("import sys; sys.path.insert(0, ''); from transformers import AutoConfig, BertConfig; print('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
