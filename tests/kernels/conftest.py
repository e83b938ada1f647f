"""Fixtures of the kernel tests. The seeds come from tests/conftest.py (a fresh, printed seed per test).

Most kernel tests run the Triton kernels on CPU tensors in the interpreter. tests/conftest.py sets
``TRITON_INTERPRET=1`` only where no CUDA device can run the kernels; on a GPU box the kernels are compiled for the GPU
in this process, so those tests cannot run in it: they are skipped with the command that runs them (an explicit
``TRITON_INTERPRET=1`` keeps the interpreter on a GPU box too). The GPU is checked by the ``gpu`` tests.
"""

from __future__ import annotations

import os

import pytest

# Modules whose tests (the gpu-marked ones aside) force the kernels on CPU tensors; single tests elsewhere take the
# `interpreter` fixture.
INTERPRETER_MODULES = {"test_attention.py", "test_maa_pool.py", "test_topk.py", "test_dispatch.py",
                       "test_zoo_kernels.py", "test_session_kernels.py"}
SKIP_REASON = ("runs the kernels on CPU tensors in the Triton interpreter, and this run compiles them for the GPU; "
               "run these with: TRITON_INTERPRET=1 pytest tests/kernels -m 'not gpu'")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def pytest_collection_modifyitems(config, items):
    if interpreting():
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.path.name in INTERPRETER_MODULES and "gpu" not in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def interpreter():
    """For a test that runs kernels on CPU tensors: skipped (with the reason) where this run compiles for a GPU."""
    if not interpreting():
        pytest.skip(SKIP_REASON)


@pytest.fixture
def poisoned_triton(interpreter):
    """Run on the Triton kernels (the interpreter on CPU) without autograd, every buffer a wrapper allocates
    NaN-poisoned: an element a kernel forgets to write fails the comparison. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("poisoned_triton")``."""
    import torch

    from fine_infer import kernels
    from fine_infer.kernels import _dispatch

    with _dispatch.poison_allocations(), kernels.use_backend("triton"), torch.no_grad():
        yield
