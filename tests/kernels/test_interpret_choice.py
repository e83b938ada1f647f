"""tests/conftest.py runs the kernels in the Triton interpreter only where no CUDA device can run them: on a GPU box
``pytest -m gpu`` compiles the real kernels. The decision is checked here with stand-ins for the probes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def _load_root_conftest():
    """tests/conftest.py as a module of its own name (``conftest`` is this folder's): re-running its top level is
    harmless, TRITON_INTERPRET being set already."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_root_conftest", ROOT_CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


triton_interpret_value = _load_root_conftest().triton_interpret_value


def _never(*_):
    raise AssertionError("probed although the answer was already known")


@pytest.mark.parametrize("env,nodes,cuda,want", [
    ({"TRITON_INTERPRET": "1"}, _never, _never, None),  # explicit: kept as it is
    ({"TRITON_INTERPRET": "0"}, _never, _never, None),
    ({"CUDA_VISIBLE_DEVICES": ""}, _never, _never, "1"),  # GPUs hidden: interpret, torch not imported
    ({"CUDA_VISIBLE_DEVICES": "-1"}, _never, _never, "1"),
    ({}, lambda: False, _never, "1"),  # no NVIDIA device node (this CPU machine): torch not imported
    ({}, lambda: True, lambda: False, "1"),  # nodes but a CPU build of torch: interpret
    ({}, lambda: True, lambda: True, None),  # a usable GPU: compile the real kernels
    ({"CUDA_VISIBLE_DEVICES": "1"}, lambda: True, lambda: True, None),
])
def test_interpreter_only_without_a_usable_cuda_device(env, nodes, cuda, want):
    assert triton_interpret_value(env, nodes, cuda) == want


def test_this_run_decided_before_the_kernels_were_defined():
    """Here (no GPU) the run interprets; and the kernel modules were defined in that mode."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the kernels are compiled, not interpreted")
    assert os.environ["TRITON_INTERPRET"] == "1"
    pytest.importorskip("triton")
    from fine_infer.kernels import _attention

    assert _attention._fwd.interpreted


def test_conftest_leaves_the_variable_unset_where_a_gpu_is_usable(tmp_path):
    """The whole conftest in a fresh interpreter with the probes answering 'GPU present': TRITON_INTERPRET stays unset
    and torch is imported only by the second probe."""
    conftest = ROOT_CONFTEST
    code = f"""
import os, sys, types
sys.modules['torch'] = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True))
os.path.exists = lambda p: p == '/dev/nvidiactl'
src = open({str(conftest)!r}).read()
exec(compile(src, 'conftest.py', 'exec'), {{'__name__': 'conftest'}})
print('TRITON_INTERPRET' in os.environ)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "False"
