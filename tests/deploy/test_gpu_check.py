"""benchmarks/gpu_check.sh, run here with a short budget: its CPU steps pass, each GPU step fails at once with the
reason, every result lands in one folder and the exit status says that not everything passed. On a CUDA box the GPUs
are hidden from it (CUDA_VISIBLE_DEVICES=""), so this checks the same thing there; the real run is a person's."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CPU_STEPS = {"machine", "venv", "export", "triton-repo"}
GPU_STEPS = {"gpu-deps", "gpu-tests", "kernel-bench", "engines", "bench"}


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    env.update(VIRTUAL_ENV=sys.prefix, CUDA_VISIBLE_DEVICES="", GPU_CHECK_ARCH="triplet")
    return subprocess.run(["bash", str(SCRIPT), "--out", str(out), "--reuse-venv", *args], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def _summary(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "summary.tsv", newline="") as f:
        return {row["step"]: row for row in csv.DictReader(f, delimiter="\t")}


def test_cpu_steps_run_here_and_gpu_steps_fail_with_the_reason(tmp_path):
    out = tmp_path / "check"
    res = _run(out, "--skip", "aot-compile", "--budget", "400")  # the AOT compile has its own test
    assert res.returncode == 1, res.stdout + res.stderr[-2000:]
    rows = _summary(out)
    assert set(rows) == CPU_STEPS | GPU_STEPS | {"aot-compile"}
    for step in CPU_STEPS:
        assert rows[step]["status"] == "ok", (step, rows[step], (out / "summary.md").read_text())
    for step in GPU_STEPS:
        assert rows[step]["status"] == "FAILED" and rows[step]["detail"].startswith("needs a CUDA GPU: "), rows[step]
        assert int(rows[step]["seconds"]) <= 10  # refused at once, not after a time-out
    assert rows["aot-compile"]["status"] == "skipped"
    # every result in the one folder: logs per step, the bundle's export report, the Triton repository, the summary
    assert len(list(out.glob("[0-9][0-9]-*.log"))) == len(rows)
    assert json.loads((out / "export.json").read_text())
    assert (out / "triton-repo" / "README.md").is_file() and json.loads((out / "triton-repo.json").read_text())
    summary = (out / "summary.md").read_text()
    assert "| gpu-tests | gpu | FAILED |" in summary and "some steps FAILED" in res.stdout


def test_steps_past_the_budget_are_not_run(tmp_path):
    res = _run(tmp_path / "late", "--budget", "1", "--only", "machine,engines")
    rows = _summary(tmp_path / "late")
    assert res.returncode == 1 and "budget is spent" in rows["machine"]["detail"]
    assert rows["venv"]["status"] == "skipped"
