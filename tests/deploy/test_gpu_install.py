"""Installing on a GPU box, checked without a network (README "Installing on a GPU"; pyproject's GPU extras).

PyPI's ``tensorrt``, ``tensorrt-cuXX`` and ``tensorrt-cuXX-libs`` are stubs that download the real wheels from NVIDIA's
index at install time: offline or behind a mirror that install fails. The GPU extras therefore name the real wheels
(``tensorrt-cuXX-bindings`` and ``-libs``) for a CUDA 12 and a CUDA 13 box, and the README installs them with NVIDIA's
index, where pip takes the wheel over the stub; JetPack's TensorRT is the system's. Checked here: the extras' metadata,
``pip install --dry-run`` of the CUDA 12 extra against a local folder of stand-in wheels (``--no-index``), and pip's
choice of a wheel over a stub of the same version (and its failure with the stub alone).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
STUBS = {"tensorrt", "tensorrt-cu12", "tensorrt-cu13"}  # PyPI sdists that fetch from NVIDIA's index when installed


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def closure(extra: str) -> dict[str, Requirement]:
    """Every requirement an extra brings, its self-references (``fine-infer[a,b]``) followed."""
    extras, out, todo = _extras(), {}, [extra]
    seen = set()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        for text in extras[e]:
            req = Requirement(text)
            if req.name == "fine-infer":
                todo += sorted(req.extras)
            else:
                out[req.name] = req
    return out


@pytest.mark.parametrize("extra,cuda", [("gpu-cu12", "cu12"), ("gpu-cu13", "cu13"), ("tensorrt", "cu12")])
def test_gpu_extras_name_real_tensorrt_wheels_for_their_cuda(extra, cuda):
    reqs = closure(extra)
    trt = {n for n in reqs if n.startswith("tensorrt")}
    assert trt == {f"tensorrt-{cuda}-bindings", f"tensorrt-{cuda}-libs"}, trt
    assert not STUBS & set(reqs)
    for name in trt:  # TensorRT 10 and 11, nothing older or newer
        spec = reqs[name].specifier
        assert all(v in spec for v in ("10.0.1", "10.13.3.9", "11.4.0.106")), spec
        assert not any(v in spec for v in ("8.6.1", "9.3.0", "12.0.0")), spec
    if extra != "tensorrt":
        assert str(reqs["torch"].specifier) == "==2.13.0" and "triton" in reqs  # the kernels come along


def test_the_jetpack_extra_leaves_tensorrt_to_the_system():
    reqs = closure("gpu")
    assert not any(n.startswith("tensorrt") for n in reqs) and {"torch", "triton"} <= set(reqs)


def test_the_readme_installs_each_box_as_the_extras_say():
    text = (ROOT / "README.md").read_text()
    section = re.split(r"(?m)^#+ Installing on a GPU\s*$", text, maxsplit=1)[1]
    section = re.split(r"(?m)^## ", section, maxsplit=1)[0]
    extras = set(_extras())
    lines = {ln: set(m.split(",")) for ln in section.splitlines() for m in re.findall(r'"\.\[([a-z0-9,-]+)\]"', ln)}
    used = set().union(*lines.values())
    assert {"gpu-cu12", "gpu-cu13", "gpu"} <= used <= extras, used
    for line, names in lines.items():  # a TensorRT extra always comes with NVIDIA's index; the Jetson one never
        assert ("--extra-index-url https://pypi.nvidia.com" in line) == bool(names & {"gpu-cu12", "gpu-cu13"}), line
        if "gpu" in names:
            assert "--system-site-packages" in line, line
    assert "Jetson" in section and "gpu_check.sh" in section


def _wheel(folder: Path, name: str, version: str) -> None:
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as z:
        for k, v in files.items():
            z.writestr(k, v)


def _stub_sdist(folder: Path, name: str, version: str) -> None:
    """An sdist that, like NVIDIA's stubs, needs the network to build: here it just fails."""
    dist = name.replace("-", "_")
    setup = "raise SystemExit('stub: would download the real wheel from NVIDIA at install time')\n"
    with tarfile.open(folder / f"{dist}-{version}.tar.gz", "w:gz") as tar:
        pkg_info = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        for path, text in ((f"{dist}-{version}/setup.py", setup), (f"{dist}-{version}/PKG-INFO", pkg_info)):
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _dry_run(find_links: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--ignore-installed",
                           "--disable-pip-version-check", "--find-links", str(find_links), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_pip_takes_the_wheel_over_the_stub_and_fails_on_the_stub_alone(tmp_path):
    stub_only, both = tmp_path / "mirror", tmp_path / "nvidia"
    stub_only.mkdir(), both.mkdir()
    for folder in (stub_only, both):
        _stub_sdist(folder, "tensorrt-cu12-libs", "10.13.3.9")
    _wheel(both, "tensorrt-cu12-libs", "10.13.3.9")
    res = _dry_run(both, "--no-deps", "tensorrt-cu12-libs>=10,<12")
    assert res.returncode == 0 and "Would install tensorrt-cu12-libs-10.13.3.9" in res.stdout, res.stderr[-2000:]
    assert "tar.gz" not in res.stdout + res.stderr  # the stub was not even looked into
    res = _dry_run(stub_only, "--no-deps", "--no-build-isolation", "tensorrt-cu12-libs>=10,<12")
    assert res.returncode != 0 and "stub: would download" in res.stdout + res.stderr


def test_dry_run_of_the_cuda12_extra_resolves_to_real_wheels(tmp_path):
    """``pip install --dry-run -e ".[gpu-cu12]"`` against stand-in wheels of every dependency, no index at all."""
    pytest.importorskip("scikit_build_core")  # the build backend, for the project's own metadata (no isolation)
    names = {n: "2.13.0" if n == "torch" else "3.7.1" if n == "triton" else "10.13.3.9" if n.startswith("tensorrt")
             else "99.0" for n in closure("gpu-cu12")}
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        names.setdefault(Requirement(text).name, "99.0")
    for name, version in names.items():
        _wheel(tmp_path, name, version)
    report = tmp_path / "report.json"
    res = _dry_run(tmp_path, "--no-build-isolation", "--report", str(report), "-e", ".[gpu-cu12]")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    installs = {i["metadata"]["name"]: i["download_info"]["url"] for i in json.loads(report.read_text())["install"]}
    assert {"tensorrt-cu12-bindings", "tensorrt-cu12-libs", "torch", "triton"} <= set(installs)
    assert not STUBS & set(installs)
    assert all(url.endswith(".whl") for n, url in installs.items() if n != "fine-infer")
