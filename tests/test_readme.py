"""The README as a newcomer runs it: every fenced ``bash`` and ``python`` block after the Quickstart, in order, in one
fresh folder, with the installed ``fine-infer``. A command marked ``# GPU only`` must fail cleanly on a CPU box: a
non-zero exit and one line on stderr. A block the README marks ``<!-- readme-test: skip (why) -->`` is an alternative
or needs another machine; the reason is shown in the test id.

One test per block, in README order, sharing the folder: a block that fails names its first line in the README.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.*?)\)\s*-->")
GPU_ONLY = "# GPU only"
BLOCK_TIMEOUT_S = 900


def readme_blocks() -> list[tuple[int, str, str, str | None]]:
    """(line number, language, code, skip reason) of every bash/python block after the Quickstart section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## ", text.index("## Quickstart") + 1)  # the Quickstart's two blocks are CI's own
    out = []
    for m in re.finditer(r"```(bash|python)\n(.*?)```", text[start:], flags=re.S):
        before = text[: start + m.start()].rstrip().splitlines()
        reason = SKIP.search(before[-1]) if before else None
        line = text[: start + m.start()].count("\n") + 1
        out.append((line, m.group(1), m.group(2), reason.group(1) if reason else None))
    return out


def _bash(code: str) -> str:
    """The block as a script: stop at the first failure, never leave a background server behind, and turn each
    ``# GPU only`` command into a check that it fails cleanly."""
    lines = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for line in code.splitlines():
        if GPU_ONLY in line and not line.lstrip().startswith("#"):
            cmd = line.split(GPU_ONLY)[0].rstrip()
            lines += [f"if {cmd} 2>gpu-only.err; then echo 'ran without a GPU: {cmd}' >&2; exit 1; fi",
                      "test \"$(grep -c . gpu-only.err)\" -eq 1 || { cat gpu-only.err >&2; exit 1; }"]
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def test_the_readme_has_a_walkthrough():
    assert len([b for b in BLOCKS if b[3] is None]) >= 6


@pytest.mark.parametrize("line, lang, code, skip", BLOCKS,
                         ids=[f"line{b[0]}-{b[1]}" + (f"-skipped: {b[3]}" if b[3] else "") for b in BLOCKS])
def test_readme_block_runs(folder, line, lang, code, skip):
    if skip:
        pytest.skip(f"README line {line}: {skip}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = ["bash", "-c", _bash(code)] if lang == "bash" else [sys.executable, "-c", code]
    r = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert r.returncode == 0, (f"README block at line {line} failed (exit {r.returncode}):\n{code}\n"
                               f"--- stdout ---\n{r.stdout[-3000:]}\n--- stderr ---\n{r.stderr[-3000:]}")
